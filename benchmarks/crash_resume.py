"""Crash/resume cycles of the Dreamer recipe: ``kill -9`` at random moments and during checkpoint
writes, then ``--resume``, over and over, checking the run directory after every crash.

    python benchmarks/crash_resume.py                           # 12 cycles -> benchmarks/results/crash_resume.json
    python benchmarks/crash_resume.py --cycles 20 --seed 3 --out /tmp/crash.json
    python benchmarks/crash_resume.py --corrupt-every 4         # also garble checkpoint.pt every 4th cycle

The recipe runs as a real subprocess (``python -m recipes.dreamer --env cartpole`` with tiny eager
networks, one thread, ``run.checkpoint_every`` and ``run.log_every`` = one collector batch of
2 envs x 8 steps = 16 env steps, so a checkpoint is written after every batch). Each cycle kills it
with SIGKILL, alternating between

* ``random``: a uniformly random moment (``--kill-window`` seconds) after the process wrote its first
  checkpoint (its first new one, for a resumed process);
* ``write``: during a checkpoint write (after 0-2 completed ones of the process, drawn at random):
  the run directory is polled every ~1 ms for the process's
  ``.checkpoint.pt.tmp-<pid>`` (or ``.checkpoint.prev.pt.tmp-<pid>``) and the kill is sent as soon as
  one appears (a random kill if none shows within ``--write-timeout`` s); ``write_hit`` says whether the
  temporary file was really still there once the process was dead,

and restarts it with ``--resume <run dir>`` (the same overrides). After the last cycle the resumed run
is given a reachable ``train.env_steps`` (the restored step + ``--final-batches`` batches) and finishes.

Checked after every kill (the state the resume starts from, read like the recipe reads it with
``load_resume_state``) and at the end:

* a readable checkpoint exists (``checkpoint.pt``, or ``checkpoint.prev.pt`` with the resume's
  ``warning:`` line on stderr: counted as a fallback; both sides must agree);
* counters never go backwards: ``env_steps``, ``updates`` and the training clock ``elapsed_s`` of the
  restored checkpoint are >= the previous cycle's, the clock grows whenever the step does and stays
  below the wall time of all processes so far;
* replay: ``len(replay) >= env_steps`` (a row per transition plus one per finished episode); the rows
  the previous restore held are unchanged (a prefix); the writer's ``stream_offset`` grows by
  ``env.num_envs`` per resume that wrote a checkpoint, and the rows written since the previous
  restore use only the new stream ids, none seen before;
* once a resumed process has started (its ``run directory:`` line, printed after the clean-up), no
  ``*.tmp-*`` file of an earlier process remains, the lock holds its pid, the files it reported
  removing are those the kill left, and the ``metrics.jsonl`` rows it dropped are those logged after
  the restored step; at each kill the ``metrics.jsonl`` steps so far are unique and contiguous;
* after a fallback resume (``--corrupt-every``), ``checkpoint.prev.pt`` is still readable once the
  resumed process has written its first new checkpoint;
* at the end: the run exits 0 at the target step, no ``*.tmp-*`` and no ``.lock`` remain,
  ``metrics.jsonl`` has every multiple of the batch size from the first to the last logged step
  exactly once, its ``time/total_s`` never decreases, and ``curves.png`` exists.

Prints one line per cycle and a summary; writes JSON with the per-cycle records and provenance (git
commit, dirty flag, versions, CPU, threads, argv, date). Exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from provenance import provenance, write_json  # benchmarks/provenance.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchrl_dreamer.checkpoint import (  # noqa: E402
    CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_resume_state,
)

NUM_ENVS, STEPS_PER_COLLECT = 2, 8
BATCH = NUM_ENVS * STEPS_PER_COLLECT  # env steps per collector batch = log and checkpoint interval
# the recipe tests' tiny settings (tests/helpers.py DREAMER_TINY), a train ratio of 4 (4 updates
# per batch once the prefill is done), no evaluation before the end, short episodes
TINY = [
    "model.size=tiny", "model.deter=32", "model.hidden=16", "model.units=16", "model.stoch=4", "model.classes=4",
    "model.blocks=2", "model.cnn_depth=4", "replay.batch_size=2", "replay.seq_len=8", "replay.train_ratio=4",
    "replay.prefill=40", f"env.num_envs={NUM_ENVS}", f"train.steps_per_collect={STEPS_PER_COLLECT}",
    "eval.episodes=2", "eval.every=0", "env.max_episode_steps=30", "run.progress=false", "run.tensorboard=false",
    "ac.horizon=3", "threads=1", "optim.warmup_steps=0", "model.compile=false",
    f"run.log_every={BATCH}", f"run.checkpoint_every={BATCH}",
]
NEVER_DONE = 10_000_000  # train.env_steps until the last resume: no run finishes before its kill
REQUIRED = ("agent", "env_steps", "updates", "replay")
CKPT_TMP = (f".{CHECKPOINT_NAME}.tmp-", f".{PREVIOUS_CHECKPOINT_NAME}.tmp-")


class _Proc:
    """One recipe process, its output files and its start time."""

    def __init__(self, args: list[str], log_dir: Path, index: int) -> None:
        self.stdout_path = log_dir / f"proc{index:02d}.out"
        self.stderr_path = log_dir / f"proc{index:02d}.err"
        env = {**os.environ, "TORCHRL_DREAMER_TRACEBACK": "1", "PYTHONUNBUFFERED": "1"}
        self.args = args
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # a session of its own: the SIGKILL goes to its process group (the recipe and anything it spawned)
            self.popen = subprocess.Popen([sys.executable, "-m", "recipes.dreamer", *args], cwd=ROOT, stdout=out,
                                          stderr=err, env=env, start_new_session=True)
        self.pid = self.popen.pid
        self.t_start = time.perf_counter()
        self.t_end: float | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self.t_end = time.perf_counter()

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.t_end = time.perf_counter()
        return rc

    def wall_s(self) -> float:
        return (self.t_end or time.perf_counter()) - self.t_start

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def run_dir(self) -> Path | None:
        match = re.search(r"^run directory: (.+)$", self.stdout(), re.M)
        return Path(match.group(1).strip()) if match else None


def _tmp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".tmp"))


def _metrics_steps(run_dir: Path) -> tuple[list[int], int]:
    """Steps of ``metrics.jsonl`` in file order, and the number of unreadable (torn) lines."""
    path = run_dir / "metrics.jsonl"
    steps, torn = [], 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                torn += 1
    return steps, torn


def _steps_problems(steps: list[int], where: str) -> list[str]:
    """Duplicates, gaps or steps off the batch grid in ``metrics.jsonl``."""
    problems = []
    dupes = sorted({s for s in steps if steps.count(s) > 1})
    if dupes:
        problems.append(f"{where}: metrics.jsonl has duplicate steps {dupes[:10]}")
    if steps != sorted(steps):
        problems.append(f"{where}: metrics.jsonl steps are not in increasing order")
    if steps:
        expected = list(range(steps[0], max(steps) + 1, BATCH))
        if sorted(set(steps)) != expected or steps[0] % BATCH:
            missing = sorted(set(expected) - set(steps))
            problems.append(f"{where}: metrics.jsonl steps are not every multiple of {BATCH} from {steps[0]} to "
                            f"{max(steps)} (missing {missing[:10]}, off-grid {sorted(set(steps) - set(expected))[:10]})")
    return problems


def _summary(state: dict[str, Any], source: Path) -> dict[str, Any]:
    """What the checks need from a checkpoint: counters, the replay rows' ids and the writer state."""
    replay = state["replay"]
    storage = replay["_storage"]
    n = int(storage.get("_len", 0))
    rows = storage.get("_storage") or {}
    writer = state.get("writer") or {}
    return {
        "file": source.name, "env_steps": int(state["env_steps"]), "updates": int(state["updates"]),
        "elapsed_s": float(state.get("elapsed_s", float("nan"))), "replay_rows": n,
        "stream_offset": int(writer.get("stream_offset", -1)),
        # kept for the next cycle's prefix and stream checks, not written to the JSON
        "_stream": rows["stream"][:n].clone() if n else torch.zeros(0, dtype=torch.long),
        "_step": rows["step"][:n].clone() if n else torch.zeros(0, dtype=torch.long),
        "_obs": rows["observation"][:n].clone() if n else torch.zeros(0),
    }


def _public(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if summary is None else {k: v for k, v in summary.items() if not k.startswith("_")}


def _read_resume_state(run_dir: Path) -> tuple[dict[str, Any] | None, str, str]:
    """The state a ``--resume`` starts from (read as the recipe reads it), its warning, or the error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            state, path = load_resume_state(run_dir, map_location="cpu", required=REQUIRED)
    except (CheckpointError, FileNotFoundError) as exc:
        return None, err.getvalue(), str(exc)
    return _summary(state, path), err.getvalue(), ""


def _check_restore(cur: dict[str, Any], prev: dict[str, Any] | None, wall_total_s: float, where: str) -> list[str]:
    """Counters, clock and replay of the restored state ``cur`` against the previous restore ``prev``."""
    f = []
    n, steps = cur["replay_rows"], cur["env_steps"]
    if steps % BATCH:
        f.append(f"{where}: env_steps {steps} is not a multiple of the batch {BATCH}")
    if n < steps:
        f.append(f"{where}: replay holds {n} rows < env_steps {steps}")
    if not 0 < cur["elapsed_s"] <= wall_total_s:
        f.append(f"{where}: elapsed_s {cur['elapsed_s']:.3f} not in (0, {wall_total_s:.3f}] (wall time of all processes)")
    stream = cur["_stream"]
    if n and int(stream.max()) >= cur["stream_offset"] + NUM_ENVS:
        f.append(f"{where}: stream id {int(stream.max())} >= stream_offset {cur['stream_offset']} + {NUM_ENVS}")
    if prev is None:
        if cur["stream_offset"] != 0:
            f.append(f"{where}: the first run's stream_offset is {cur['stream_offset']}, expected 0")
        return f
    for key in ("env_steps", "updates", "elapsed_s", "replay_rows", "stream_offset"):
        if cur[key] < prev[key]:
            f.append(f"{where}: {key} went backwards: {prev[key]} -> {cur[key]}")
    advanced = steps > prev["env_steps"]
    if advanced and not cur["elapsed_s"] > prev["elapsed_s"]:
        f.append(f"{where}: env_steps grew {prev['env_steps']} -> {steps} but elapsed_s did not "
                 f"({prev['elapsed_s']:.3f} -> {cur['elapsed_s']:.3f})")
    if not advanced and (cur["replay_rows"], cur["updates"], cur["stream_offset"]) != (
            prev["replay_rows"], prev["updates"], prev["stream_offset"]):
        f.append(f"{where}: same env_steps {steps} as the previous restore but a different replay/updates/offset")
    want_offset = prev["stream_offset"] + (NUM_ENVS if advanced else 0)
    if cur["stream_offset"] != want_offset:
        f.append(f"{where}: stream_offset {cur['stream_offset']}, expected {want_offset} (previous "
                 f"{prev['stream_offset']} + {NUM_ENVS} per resume that wrote a checkpoint)")
    m = prev["replay_rows"]
    if n >= m:
        same = (torch.equal(cur["_stream"][:m], prev["_stream"]) and torch.equal(cur["_step"][:m], prev["_step"])
                and torch.equal(cur["_obs"][:m], prev["_obs"]))
        if not same:
            f.append(f"{where}: the {m} replay rows of the previous restore changed")
        new = stream[m:]
        old_ids = set(prev["_stream"].tolist())
        if new.numel():
            if int(new.min()) < cur["stream_offset"]:
                f.append(f"{where}: rows written after the resume use old stream ids (min {int(new.min())} < "
                         f"offset {cur['stream_offset']})")
            if old_ids & set(new.tolist()):
                f.append(f"{where}: rows written after the resume reuse stream ids {sorted(old_ids & set(new.tolist()))}")
    return f


def _wait_for(cond: Callable[[], bool], proc: _Proc, timeout: float, poll: float = 0.005) -> bool:
    """Polls ``cond`` until it holds (True), the process exits or the timeout passes (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if cond():
            return True
        if not proc.alive():
            return cond()
        time.sleep(poll)
    return False


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _garble(path: Path) -> None:
    """Replaces ``path`` by garbage bytes (a new file renamed over it: a hard link shared with
    ``checkpoint.prev.pt`` stays intact)."""
    tmp = path.with_name("garbage-" + path.name)
    tmp.write_bytes(b"\x00not a checkpoint" * 64)
    os.replace(tmp, path)


def crash_cycles(n_cycles: int, *, root: str | os.PathLike, seed: int = 0, kill_window_s: float = 1.5,
                 write_timeout_s: float = 30.0, start_timeout_s: float = 120.0, final_batches: int = 4,
                 corrupt_every: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the recipe, kills it ``n_cycles`` times (odd cycles: at a random moment after a new
    checkpoint; even cycles: during a checkpoint write), resuming after each kill, then lets the last
    resume finish. With ``corrupt_every`` = k > 0, every k-th cycle whose killed process wrote a new
    checkpoint also garbles ``checkpoint.pt`` (the resume must fall back to ``checkpoint.prev.pt``).

    Returns ``{"ok", "failures", "cycles", "final", "summary", "run_dir", "settings"}``; ``failures``
    lists every failed check (empty when all passed)."""
    rng = random.Random(seed)
    root = Path(root)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*TINY, f"run.root={root / 'runs'}", f"seed={seed}"]
    failures: list[str] = []
    cycles: list[dict[str, Any]] = []
    procs: list[_Proc] = []
    t0 = time.perf_counter()

    def start(args: list[str]) -> _Proc:
        proc = _Proc(args, log_dir, len(procs))
        procs.append(proc)
        return proc

    def fail(msg: str) -> None:
        failures.append(msg)
        log(f"  FAILED: {msg}")

    def died(proc: _Proc, where: str) -> None:
        tail = "\n    ".join(proc.stderr().strip().splitlines()[-8:])
        fail(f"{where}: the recipe exited by itself (rc {proc.popen.returncode}) before the kill:\n    {tail}")

    proc = start(["--env", "cartpole", *overrides, f"train.env_steps={NEVER_DONE}"])
    if not _wait_for(lambda: proc.run_dir() is not None, proc, start_timeout_s):
        died(proc, "start") if not proc.alive() else proc.kill()
        return _result(False, failures + ["the first run never printed its run directory"], cycles, None, None, t0)
    run_dir = proc.run_dir()
    restored: dict[str, Any] | None = None  # the state the running process started from (None: fresh run)
    summary = {"kills_random": 0, "kills_write": 0, "write_seen": 0, "write_hit": 0, "fallbacks": 0,
               "corrupted": 0, "stray_files_removed": 0, "metrics_rows_dropped": 0, "lock_takeovers": 0}

    for cycle in range(1, n_cycles + 1):
        kind = "random" if cycle % 2 else "write"
        rec: dict[str, Any] = {"cycle": cycle, "kind": kind, "pid": proc.pid,
                               "started_from_step": None if restored is None else restored["env_steps"]}
        where = f"cycle {cycle}"
        ckpt = run_dir / CHECKPOINT_NAME
        before = _stat(ckpt) if restored is not None else None
        new_checkpoint = lambda: _stat(ckpt) is not None and _stat(ckpt) != before  # noqa: E731
        if kind == "random":
            if _wait_for(new_checkpoint, proc, start_timeout_s) and proc.alive():
                delay = rng.uniform(0.0, kill_window_s)
                rec["kill_delay_s"] = round(delay, 4)
                time.sleep(delay)
            elif proc.alive():
                fail(f"{where}: no new checkpoint within {start_timeout_s:.0f} s; killing anyway")
        else:
            # let 0-2 checkpoints of this process complete first, so that the kills hit its first write
            # (right after the restore) as well as later ones
            skip = rng.randint(0, 2)
            rec["writes_before_kill"] = skip
            for _ in range(skip):
                if not _wait_for(new_checkpoint, proc, start_timeout_s):
                    break
                before = _stat(ckpt)
            names = [run_dir / f"{prefix}{proc.pid}" for prefix in CKPT_TMP]
            seen = None
            deadline = time.perf_counter() + write_timeout_s
            while seen is None and time.perf_counter() < deadline and proc.alive():
                time.sleep(0.001)
                seen = next((p for p in names if os.path.exists(p)), None)
            if seen is not None:
                proc.kill()  # at once: the write is under way
            elif proc.alive():  # no write within the timeout: a random kill instead
                rec["fallback_random_kill"] = True
                time.sleep(rng.uniform(0.0, kill_window_s))
            rec["write_seen"] = seen.name if seen is not None else None
        if proc.t_end is None:
            if not proc.alive():
                died(proc, where)
                cycles.append(rec)
                break
            proc.kill()
        if proc.popen.returncode != -signal.SIGKILL:  # it had ended by itself just before the kill
            died(proc, where)
            cycles.append(rec)
            break
        rec["kill_after_s"] = round(proc.wall_s(), 3)
        summary["kills_" + kind] += 1

        # --- the run directory as the kill left it -------------------------------------------------
        left = _tmp_files(run_dir)
        rec["tmp_left"] = left
        rec["write_hit"] = any(name.startswith(CKPT_TMP) and name.endswith(f"-{proc.pid}") for name in left)
        summary["write_seen"] += bool(rec.get("write_seen"))
        summary["write_hit"] += rec["write_hit"]
        older = [name for name in left if not name.endswith(f"-{proc.pid}")]
        if older and proc.run_dir() is not None:
            fail(f"{where}: temporary files of earlier processes survived the resume's clean-up: {older}")
        steps, torn = _metrics_steps(run_dir)
        rec["metrics_last_step_at_kill"] = steps[-1] if steps else None
        for problem in _steps_problems(steps, f"{where} (at the kill)"):
            fail(problem)
        lock = run_dir / ".lock"
        if not lock.is_file() or not lock.read_text().startswith(f"{proc.pid} "):
            fail(f"{where}: the killed process's lock is not in {lock}")
        try:
            latest = load_checkpoint(ckpt)
            rec["latest_step_at_kill"] = int(latest["env_steps"])
            del latest
        except (CheckpointError, FileNotFoundError) as exc:
            rec["latest_step_at_kill"] = None
            fail(f"{where}: {CHECKPOINT_NAME} unreadable after a SIGKILL (renames are atomic): {exc}")

        corrupt = bool(corrupt_every) and cycle % corrupt_every == 0 and (
            rec["latest_step_at_kill"] is not None and (restored is None or rec["latest_step_at_kill"] > restored["env_steps"])
            and (run_dir / PREVIOUS_CHECKPOINT_NAME).is_file())
        if corrupt:
            _garble(ckpt)
            summary["corrupted"] += 1
        rec["corrupted"] = corrupt

        # --- the state the resume starts from --------------------------------------------------------
        cur, warning, error = _read_resume_state(run_dir)
        if cur is None:
            fail(f"{where}: no readable checkpoint to resume from: {error}")
            cycles.append(rec)
            break
        rec["restore"] = _public(cur)
        rec["fallback"] = cur["file"] == PREVIOUS_CHECKPOINT_NAME
        if rec["fallback"] != corrupt:
            fail(f"{where}: resume state from {cur['file']} although checkpoint.pt was "
                 f"{'garbled' if corrupt else 'left intact'} (warning: {warning.strip()!r})")
        wall_total = sum(p.wall_s() for p in procs)
        for problem in _check_restore(cur, restored, wall_total, where):
            fail(problem)
        expected_dropped = sum(1 for s in steps if s > cur["env_steps"])

        # --- resume -------------------------------------------------------------------------------
        last = cycle == n_cycles
        target = cur["env_steps"] + final_batches * BATCH if last else NEVER_DONE
        at_resume = _stat(ckpt)
        proc = start(["--resume", str(run_dir), *overrides, f"train.env_steps={target}"])
        rec["resume_pid"] = proc.pid
        if not _wait_for(lambda: proc.run_dir() is not None, proc, start_timeout_s):
            err = proc.stderr().strip().splitlines()[-8:]
            fail(f"{where}: the resume did not start (rc {proc.popen.poll()}): " + " | ".join(err))
            if proc.alive():
                proc.kill()
            cycles.append(rec)
            break
        # the resume has cleaned up (run_dir printed after open_run_dir): nothing older may remain
        stray = [name for name in _tmp_files(run_dir) if not name.endswith(f"-{proc.pid}")]
        if stray:
            fail(f"{where}: after the resume started, temporary files of earlier processes remain: {stray}")
        if proc.alive() and not (run_dir / ".lock").read_text().startswith(f"{proc.pid} "):
            fail(f"{where}: the resumed process does not hold {run_dir / '.lock'}")
        err = proc.stderr()
        resume_warned = bool(re.search(r"^warning: .*previous checkpoint", err, re.M))
        removed = sorted(re.findall(r"^note: removed (\S+) \(left by an interrupted write\)", err, re.M))
        dropped = re.search(r"^note: metrics.jsonl: dropped (\d+) row\(s\)(?: and (\d+) unreadable)?", err, re.M)
        n_dropped = int(dropped.group(1)) if dropped else 0
        n_torn = int(dropped.group(2) or 0) if dropped else 0
        rec.update(resume_fallback_warning=resume_warned, stray_removed=removed, metrics_rows_dropped=n_dropped,
                   lock_taken_over="note: taking over the lock" in err)
        if resume_warned != rec["fallback"]:
            fail(f"{where}: the resume {'printed' if resume_warned else 'did not print'} the fallback warning, "
                 f"but the checkpoint to resume from is {cur['file']}")
        if removed != sorted(left):
            fail(f"{where}: the resume removed {removed}, the kill left {sorted(left)}")
        if (n_dropped, n_torn) != (expected_dropped, torn):
            fail(f"{where}: the resume dropped {n_dropped} metrics row(s) and {n_torn} torn line(s), expected "
                 f"{expected_dropped} (logged after step {cur['env_steps']}) and {torn}")
        if not rec["lock_taken_over"]:
            fail(f"{where}: the resume did not report taking over the dead process's lock")
        if rec["fallback"]:
            # resumed from checkpoint.prev.pt: the first new save must keep that good checkpoint as the
            # previous one (two readable checkpoints again), not rotate the unreadable checkpoint.pt into it
            if _wait_for(lambda: _stat(ckpt) != at_resume, proc, start_timeout_s, poll=0.002):
                try:
                    rec["prev_step_after_first_save"] = int(load_checkpoint(run_dir / PREVIOUS_CHECKPOINT_NAME)["env_steps"])
                except (CheckpointError, FileNotFoundError) as exc:
                    rec["prev_step_after_first_save"] = None
                    fail(f"{where}: after the fallback resume's first save, {PREVIOUS_CHECKPOINT_NAME} is unreadable "
                         f"(the garbled {CHECKPOINT_NAME} took the place of the good one): {exc}")
        summary["fallbacks"] += rec["fallback"]
        summary["stray_files_removed"] += len(removed)
        summary["metrics_rows_dropped"] += n_dropped
        summary["lock_takeovers"] += rec["lock_taken_over"]
        cycles.append(rec)
        hit = (f" write #{rec['writes_before_kill'] + 1}: {rec['write_seen']}" if rec.get("write_seen")
               else " (no write seen: random kill)") \
            if kind == "write" else f" +{rec['kill_delay_s']:.2f}s"
        log(f"cycle {cycle:2d} kill={kind:<6}{hit:<36} at {rec['kill_after_s']:5.1f}s | restart at step "
            f"{cur['env_steps']:4d} updates {cur['updates']:4d} clock {cur['elapsed_s']:5.2f}s rows {cur['replay_rows']:4d} "
            f"streams {cur['stream_offset']:2d}+ from {cur['file']}{' (FALLBACK)' if rec['fallback'] else ''} | "
            f"removed {removed or '-'} | dropped {n_dropped} metrics row(s)")
        restored = cur

    # --- the last resume runs to its end ------------------------------------------------------------
    final = None
    if len(cycles) == n_cycles and "stray_removed" in cycles[-1]:  # every cycle got as far as its resume
        final = {"pid": proc.pid}
        rc = proc.wait(timeout=start_timeout_s + 60)
        final["rc"] = rc
        final["wall_s"] = round(proc.wall_s(), 3)
        if rc != 0:
            tail = " | ".join(proc.stderr().strip().splitlines()[-8:])
            fail(f"final: the last resume exited with {rc}: {tail}")
        else:
            final.update(_final_checks(run_dir, restored, sum(p.wall_s() for p in procs), target, fail))
            log(f"final      resumed from step {restored['env_steps']} and finished at step {final.get('env_steps')} "
                f"(rc 0, {final['wall_s']:.1f}s): metrics rows {final.get('metrics_rows')} steps "
                f"{final.get('first_step')}..{final.get('last_step')} every {BATCH}, no duplicates/gaps: "
                f"{final.get('metrics_ok')}; tmp files {final.get('tmp_files')}; lock left: {final.get('lock_left')}; "
                f"curves.png: {final.get('curves_png')}")
    for p in procs:
        if p.alive():
            p.kill()
    summary["cycles"] = len(cycles)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["failures"] = len(failures)
    log(f"summary    {summary['cycles']} cycles ({summary['kills_random']} random kills, {summary['kills_write']} during a "
        f"checkpoint write, {summary['write_seen']} of them seen), {summary['write_hit']} kill(s) left a checkpoint "
        f"temp file, "
        f"{summary['fallbacks']} fallback(s) to {PREVIOUS_CHECKPOINT_NAME} ({summary['corrupted']} garbled), "
        f"{summary['stray_files_removed']} stray file(s) removed, {summary['metrics_rows_dropped']} metrics row(s) "
        f"dropped and logged again, {summary['lock_takeovers']} stale lock(s) taken over; {len(procs)} processes in "
        f"{summary['wall_s']:.0f}s; {'all checks passed' if not failures else f'{len(failures)} check(s) FAILED'}")
    return _result(not failures and final is not None, failures, cycles, final, summary, t0, run_dir=run_dir,
                   settings={"n_cycles": n_cycles, "seed": seed, "kill_window_s": kill_window_s,
                             "write_timeout_s": write_timeout_s, "final_batches": final_batches,
                             "corrupt_every": corrupt_every, "batch_env_steps": BATCH, "overrides": overrides})


def _final_checks(run_dir: Path, restored: dict[str, Any], wall_total: float, target: int,
                  fail: Callable[[str], None]) -> dict:
    out: dict[str, Any] = {}
    try:
        state = load_checkpoint(run_dir)
    except (CheckpointError, FileNotFoundError) as exc:
        fail(f"final: the checkpoint is unreadable: {exc}")
        return out
    cur = _summary(state, run_dir / CHECKPOINT_NAME)
    out.update(_public(cur))
    for problem in _check_restore(cur, restored, wall_total, "final"):
        fail(problem)
    if cur["env_steps"] != target:
        fail(f"final: the run ended at env_steps {cur['env_steps']}, expected train.env_steps={target}")
    tmp = _tmp_files(run_dir)
    out["tmp_files"] = tmp
    out["lock_left"] = (run_dir / ".lock").exists()
    out["curves_png"] = (run_dir / "curves.png").is_file()
    if tmp:
        fail(f"final: temporary files remain: {tmp}")
    if out["lock_left"]:
        fail("final: the lock file remains after the run ended")
    if not out["curves_png"]:
        fail("final: curves.png is missing")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [int(r["step"]) for r in rows]
    problems = _steps_problems(steps, "final")
    for problem in problems:
        fail(problem)
    out.update(metrics_rows=len(rows), first_step=steps[0] if steps else None, last_step=steps[-1] if steps else None,
               metrics_ok=not problems)
    if steps and (steps[0] != BATCH or steps[-1] != cur["env_steps"]):
        fail(f"final: metrics.jsonl runs from step {steps[0]} to {steps[-1]}, expected {BATCH} to {cur['env_steps']}")
    clock = [float(r["time/total_s"]) for r in rows]
    if any(b < a for a, b in zip(clock, clock[1:])):
        fail("final: time/total_s decreases somewhere in metrics.jsonl (the training clock went backwards)")
    if clock and cur["elapsed_s"] < clock[-1]:
        fail(f"final: checkpoint elapsed_s {cur['elapsed_s']:.3f} < the last logged time/total_s {clock[-1]:.3f}")
    return out


def _result(ok: bool, failures: list[str], cycles: list[dict], final: dict | None, summary: dict | None, t0: float,
            run_dir: Path | None = None, settings: dict | None = None) -> dict[str, Any]:
    return {"ok": ok, "failures": failures, "summary": summary, "cycles": cycles, "final": final,
            "run_dir": str(run_dir) if run_dir else None, "settings": settings,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=12, help="kill/resume cycles (default 12)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crash_resume.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and of the recipe")
    parser.add_argument("--kill-window", type=float, default=1.5,
                        help="random kills land uniformly in this many seconds after a new checkpoint")
    parser.add_argument("--write-timeout", type=float, default=30.0,
                        help="seconds to wait for a checkpoint write before a random kill instead")
    parser.add_argument("--corrupt-every", type=int, default=0,
                        help="also garble checkpoint.pt every N-th cycle (0 = never; tests the fallback)")
    parser.add_argument("--root", type=Path, default=None, help="where the run goes (default: a temporary directory)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crash_resume-")))
        result = crash_cycles(args.cycles, root=root, seed=args.seed, kill_window_s=args.kill_window,
                              write_timeout_s=args.write_timeout, corrupt_every=args.corrupt_every)
    result["provenance"] = provenance(torch_threads_runs=1)
    write_json(args.out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
