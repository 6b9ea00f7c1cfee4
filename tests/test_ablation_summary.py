"""benchmarks/dreamer_ablation.py reads a run's logs into its table: the evaluations, the 50-episode
scores and, with ``optim.ema_decay``, the last iterate's beside the weight average's."""
import importlib
import json

from helpers import BENCHMARKS


def fake_run(tmp_path, *, average: bool, recheck: bool = False, action_repeat: int = 0):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if action_repeat:  # the run's stored config (only what the summary reads)
        (run_dir / "config.yaml").write_text(f"seed: 0\nenv:\n  name: LunarLander-v3\n  action_repeat: {action_repeat}\n")
    rows = []
    for i, (avg, last) in enumerate([(10.0, 30.0), (250.0, 190.0), (180.0, 220.0)]):
        row = {"time/total_s": 60.0 * (i + 1), "train/env_steps": 1000 * (i + 1), "train/updates": 10 * (i + 1),
               "eval/episode_reward_sum": avg}
        if average:
            row["eval/episode_reward_sum_last"] = last
        if recheck and i < 2:  # eval.recheck_episodes: the first two evaluations were new bests
            row.update({"eval/recheck_episode_reward_sum": avg - 20.0, "eval/recheck_episodes": 50.0})
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"episodes": 50, "final": {"episode_reward_sum": 170.0}, "best": {"episode_reward_sum": 205.0}}
    if average:
        result["final_last"] = {"episode_reward_sum": 160.0}
    (run_dir / "result.json").write_text(json.dumps(result))
    log = tmp_path / "job.log"
    log.write_text(f"run directory: {run_dir}\n")
    return {"variant": "v", "seed": 0, "overrides": [], "log": log, "returncode": 0}


def test_summary_keeps_the_last_iterate_beside_the_weight_average(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    out = ablation.summarise(fake_run(tmp_path, average=True), threshold=200.0, hold=150.0)
    assert out["best_eval"] == 250.0 and out["final_eval"] == 180.0 and out["reached_env_steps"] == 2000
    assert out["held"] and out["min_after_reach"] == 180.0
    assert (out["confirm_final"], out["confirm_best"], out["confirm_final_last"]) == (170.0, 205.0, 160.0)
    assert out["best_eval_last"] == 220.0 and out["final_eval_last"] == 220.0
    assert [v for _, _, v in out["evals_last"]] == [30.0, 190.0, 220.0]


def test_summary_without_a_weight_average_has_no_last_iterate_keys(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    out = ablation.summarise(fake_run(tmp_path, average=False), threshold=200.0, hold=150.0)
    assert out["best_eval"] == 250.0 and "evals_last" not in out and "confirm_final_last" not in out
    assert "rechecks" not in out and "best_recheck" not in out


def test_summary_lists_the_rechecked_evaluations(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    out = ablation.summarise(fake_run(tmp_path, average=False, recheck=True), threshold=200.0, hold=150.0)
    assert out["rechecks"] == [(1000, 10.0, -10.0, 50.0), (2000, 250.0, 230.0, 50.0)]
    assert out["best_recheck"] == 230.0 and out["best_eval"] == 250.0


def test_summary_counts_frames_of_repeated_actions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    out = ablation.summarise(fake_run(tmp_path, average=False, action_repeat=2), threshold=200.0, hold=150.0)
    assert (out["env_steps"], out["action_repeat"], out["frames"]) == (3000, 2, 6000)
    (tmp_path / "plain").mkdir()
    plain = ablation.summarise(fake_run(tmp_path / "plain", average=False), threshold=200.0, hold=150.0)
    assert (plain["action_repeat"], plain["frames"]) == (1, 3000)


def test_keep_at_copies_a_running_jobs_files_once(tmp_path, monkeypatch):
    """``--keep-at``: while a job runs, its checkpoint, ``best.pt`` and config are copied once its start is
    that many minutes past, into ``<run dir>/kept_<M>min``; the summary carries the scores under ``kept``."""
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert ablation.keep(run_dir, 1) is None  # nothing written yet: nothing kept
    for name, data in (("checkpoint.pt", b"ckpt"), ("best.pt", b"best"), ("config.yaml", b"seed: 0\n")):
        (run_dir / name).write_bytes(data)
    # a stand-in for the recipe: prints its run directory, then runs for ~4 s
    job = {"variant": "v", "seed": 0, "log": tmp_path / "logs" / "v_seed0.log",
           "cmd": [sys.executable, "-c", f"print('run directory: {run_dir}', flush=True); import time; time.sleep(4)"]}
    ablation.run_jobs([job], lanes=1, keep_at=(0.02, 5.0))  # 1.2 s (kept) and 5 min (the job ends first)
    dest = run_dir / "kept_0.02min"
    assert job["kept"] == {0.02: dest} and job["returncode"] == 0
    assert sorted(p.name for p in dest.iterdir()) == ["best.pt", "checkpoint.pt", "config.yaml"]
    assert (dest / "best.pt").read_bytes() == b"best"
    (tmp_path / "s").mkdir()
    summary = fake_run(tmp_path / "s", average=False)
    summary["scored"] = {"0.02": {"dir": str(dest), "env_steps": 64, "checkpoint": 12.0, "best": 15.0}}
    out = ablation.summarise(summary, threshold=200.0, hold=150.0)
    assert out["kept"] == {"0.02": {"dir": str(dest), "env_steps": 64, "checkpoint": 12.0, "best": 15.0}}


def test_an_interrupted_harness_stops_its_runs_and_keeps_what_ran(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which ``main`` turns into the same) while a job runs: the job's process is
    stopped and marked ``interrupted``, the job not started yet ``skipped``; ``run_jobs`` returns."""
    import os
    import signal
    import sys
    import threading

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    jobs = [{"variant": "v", "seed": s, "log": tmp_path / f"v_seed{s}.log",
             "cmd": [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]}
            for s in (0, 1)]
    # a test process started in the background by a non-interactive shell (nohup ... &) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: install it for this test
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        ablation.run_jobs(jobs, lanes=1)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    first, second = jobs
    assert first["interrupted"] and first["returncode"] not in (None, 0) and first["wall_s"] < 30
    assert "started" in first["log"].read_text()
    assert second.get("skipped") and "t0" not in second
    first["overrides"] = []
    out = ablation.summarise(first, threshold=200.0, hold=150.0)  # no run directory: an error row, marked
    assert out["interrupted"] and "error" in out


def test_table_counts_reached_and_held_and_dashes_what_is_missing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ablation = importlib.import_module("dreamer_ablation")
    base = {"variant": "v", "diagnostics_last_quarter": {"time/updates_per_s": 10.0}, "env_steps": 1000,
            "updates": 100, "final_eval": 150.0, "confirm_episodes": 50}
    results = [{**base, "seed": 0, "reached": True, "reached_s": 600.0, "held": True, "best_eval": 210.0,
                "confirm_final": 205.0, "confirm_best": 201.0},
               {**base, "seed": 1, "reached": False, "reached_s": None, "held": False, "best_eval": 190.0,
                "confirm_final": None, "confirm_best": None},
               {"variant": "v", "seed": 2, "error": "boom"}]
    args = SimpleNamespace(hold=150.0, no_stop=True, threads=1)
    lines = ablation.table(results, ["v"], args, 200.0, 60.0).splitlines()
    assert lines[0].startswith("| variant |") and "50-episode re-score" in lines[0]
    row = lines[2]
    assert row.startswith("| v | 0, 1 | 60 min | 1 | 1/2; held >= 150: 1/2 | 10.0, - | 200.0 | 150.0 | ")
    assert "| 205.0 / 201.0 |" in row  # the mean over the runs that have the figure
    assert len(lines) == 3  # the failed run has no row of its own
