"""Crash safety of a run directory: SIGKILL at random moments and during checkpoint writes, then
``--resume`` (benchmarks/crash_resume.py, 3 cycles of the real recipe in subprocesses), and the two
pieces it relies on: :func:`clean_after_crash` and the ``checkpoint.prev.pt`` fallback."""
import json
import os
from pathlib import Path

import pytest

from torchrl_dreamer.checkpoint import (
    CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CheckpointError, load_resume_state, save_checkpoint,
)
from torchrl_dreamer.runtime import clean_after_crash

from helpers import BENCHMARKS


@pytest.fixture
def crash_resume(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import crash_resume

    return crash_resume


@pytest.mark.smoke
@pytest.mark.slow
def test_kill_and_resume_three_cycles(crash_resume, tmp_path):
    """One random kill, one during a checkpoint write, one more random kill after which
    ``checkpoint.pt`` is garbled (the resume must fall back to ``checkpoint.prev.pt``); then the last
    resume runs to its end. ``crash_cycles`` checks the run directory after every kill (see its
    docstring); the asserts below repeat the main ones on its records."""
    lines = []
    result = crash_resume.crash_cycles(3, root=tmp_path, seed=0, corrupt_every=3, log=lines.append)
    assert result["failures"] == [], "\n".join(lines)
    assert result["ok"]
    cycles, final, summary = result["cycles"], result["final"], result["summary"]
    assert [c["kind"] for c in cycles] == ["random", "write", "random"]
    assert cycles[1]["write_seen"] is not None  # the kill landed while a checkpoint temp file existed
    assert [c["fallback"] for c in cycles] == [False, False, True]
    assert [c["resume_fallback_warning"] for c in cycles] == [False, False, True]
    assert summary["fallbacks"] == 1 and summary["kills_random"] == 2 and summary["kills_write"] == 1
    # counters, clock and replay never go backwards; one stream offset step per resume that saved
    restores = [c["restore"] for c in cycles] + [final]
    for before, after in zip(restores, restores[1:]):
        for key in ("env_steps", "updates", "elapsed_s", "replay_rows", "stream_offset"):
            assert after[key] >= before[key], (key, before, after)
        if after["env_steps"] > before["env_steps"]:
            assert after["stream_offset"] == before["stream_offset"] + crash_resume.NUM_ENVS
            assert after["elapsed_s"] > before["elapsed_s"]
    assert all(r["replay_rows"] >= r["env_steps"] for r in restores)
    # every temporary file a kill left was removed by the next resume, and nothing else
    assert all(c["stray_removed"] == sorted(c["tmp_left"]) for c in cycles)
    assert final["rc"] == 0 and final["tmp_files"] == [] and not final["lock_left"] and final["curves_png"]
    run_dir = Path(result["run_dir"])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batch = crash_resume.BATCH
    assert steps == list(range(batch, final["env_steps"] + 1, batch))  # each step exactly once, no gap
    assert not any(".tmp" in p.name for p in run_dir.iterdir()) and not (run_dir / ".lock").exists()
    assert (run_dir / "curves.png").is_file()


def test_clean_after_crash_removes_temp_files_and_later_metrics_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    temps = [".checkpoint.pt.tmp-123", ".checkpoint.prev.pt.tmp-123", ".metrics.jsonl.tmp-77", "config.yaml.tmp",
             ".best.pt.tmp-5"]
    for name in temps:
        (run / name).write_bytes(b"half written")
    (run / CHECKPOINT_NAME).write_bytes(b"kept")
    # rows in the logger's own format and some that a re-serialisation would change
    kept = ['{"step": 16, "wall_time": 0.024, "loss/x": 0.30000000000000004}',
            '{"step":32,"loss/x":1e-07,  "train/episode_reward_sum": "nan"}']
    later = ['{"step": 48, "loss/x": 1.5}', '{"step": 64, "loss/x": 2.5}']
    (run / "metrics.jsonl").write_text("\n".join(kept + later) + '\n{"step": 80, "loss/x": 3.')  # torn last line

    notes = clean_after_crash(run, 32)
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT_NAME, "metrics.jsonl"]
    assert (run / CHECKPOINT_NAME).read_bytes() == b"kept"
    assert (run / "metrics.jsonl").read_bytes() == ("\n".join(kept) + "\n").encode()  # byte-identical
    assert sum(n.startswith("removed ") for n in notes) == len(temps)
    assert any("dropped 2 row(s) logged after step 32" in n and "1 unreadable" in n for n in notes)

    # nothing left to clean: the file is not rewritten
    before = os.stat(run / "metrics.jsonl")
    assert clean_after_crash(run, 32) == []
    after = os.stat(run / "metrics.jsonl")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # without a checkpoint step only torn lines go
    (run / "metrics.jsonl").write_text("\n".join(kept + later) + "\n{\"st")
    clean_after_crash(run, None)
    assert (run / "metrics.jsonl").read_text() == "\n".join(kept + later) + "\n"


def test_keep_previous_checkpoint_and_fallback(tmp_path, capsys):
    run = tmp_path / "run"
    path = run / CHECKPOINT_NAME
    save_checkpoint(path, {"env_steps": 16, "updates": 1}, keep_previous=True)
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT_NAME]  # no previous one yet
    save_checkpoint(path, {"env_steps": 32, "updates": 2}, keep_previous=True)
    assert sorted(p.name for p in run.iterdir()) == sorted([CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME])  # no temp
    state, source = load_resume_state(run, required=("env_steps",))
    assert (state["env_steps"], source.name) == (32, CHECKPOINT_NAME)
    assert "warning" not in capsys.readouterr().err

    # a torn latest checkpoint: the previous one, with a warning that names both
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    state, source = load_resume_state(run, required=("env_steps",))
    assert (state["env_steps"], source.name) == (16, PREVIOUS_CHECKPOINT_NAME)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and str(path) in err and PREVIOUS_CHECKPOINT_NAME in err

    # garbage bytes, and a missing latest one, fall back the same way
    path.write_bytes(os.urandom(256))
    assert load_resume_state(run)[1].name == PREVIOUS_CHECKPOINT_NAME
    path.unlink()
    assert load_resume_state(run)[1].name == PREVIOUS_CHECKPOINT_NAME
    assert "checkpoint.pt is missing" in capsys.readouterr().err

    # both unreadable: one error that names both files
    path.write_bytes(b"\x00garbage")
    (run / PREVIOUS_CHECKPOINT_NAME).write_bytes(b"also garbage")
    with pytest.raises(CheckpointError) as info:
        load_resume_state(run)
    message = str(info.value)
    assert str(path) in message and str(run / PREVIOUS_CHECKPOINT_NAME) in message
    assert "no readable checkpoint" in message


def test_save_after_a_fallback_keeps_the_good_previous_checkpoint(tmp_path, capsys):
    """A run resumed from ``checkpoint.prev.pt`` (``checkpoint.pt`` unreadable) saves again: the
    unreadable file must not be rotated into ``checkpoint.prev.pt`` in place of the good one."""
    run = tmp_path / "run"
    path = run / CHECKPOINT_NAME
    save_checkpoint(path, {"env_steps": 16}, keep_previous=True)
    save_checkpoint(path, {"env_steps": 32}, keep_previous=True)
    for garbage in (path.read_bytes()[:-100], b"\x00garbage" * 50):  # torn, then not a checkpoint at all
        path.write_bytes(garbage)
        state, source = load_resume_state(run)
        assert (state["env_steps"], source.name) == (16, PREVIOUS_CHECKPOINT_NAME)
        save_checkpoint(path, {"env_steps": 48}, keep_previous=True)  # the resumed run's first save
        assert load_resume_state(run)[0]["env_steps"] == 48
        path.unlink()  # the new one lost as well: the good previous one is still there
        assert load_resume_state(run)[0]["env_steps"] == 16
        save_checkpoint(path, {"env_steps": 32}, keep_previous=False)
    capsys.readouterr()
