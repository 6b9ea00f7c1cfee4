"""Dreamer ablations: variants x seeds of one env YAML under a wall-clock budget, side by side.

Each (variant, seed) is one ``python -m recipes.dreamer --env <env>`` process with the variant's
overrides on top of the env YAML (``--variant yaml=`` is the YAML itself), evaluating every
``--eval-every`` env steps (10 episodes, mode actions, counted in the wall clock). ``--lanes N`` runs N
processes at once, each with ``threads=--threads`` (lanes x threads <= cores, or the timings lie).
By default a run stops at the env's target (as ``dreamer_cartpole.py``); ``--no-stop`` runs the
whole budget and reports whether the policy *stays* above ``--hold`` after first reaching the
target. Every run ends by re-scoring its final weights and ``best.pt`` on ``eval.confirm_episodes``
fresh episodes (``result.json``); with ``eval.recheck_episodes`` the JSON also lists each
rechecked evaluation with its pooled score (``rechecks``, ``best_recheck``). ``--keep-at 60`` copies each run's checkpoint, ``best.pt`` and
config that many minutes after its process started (into ``<run dir>/kept_60min``; the checkpoint is the one
last written, every ``run.checkpoint_every`` env steps) and scores both copies on the same number of fresh
episodes after the runs end, so a 120-minute run also reports its state at 60 minutes. Prints a markdown
table, writes JSON and a PNG of the curves. Stopped early (Ctrl-C, or ``kill`` of this process), it stops
its runs and still writes both, with the stopped runs marked ``interrupted`` (killing one run's recipe
process instead stops that run only).

    python benchmarks/dreamer_ablation.py --env lunarlander --minutes 60 --seeds 0 1 --lanes 2 \\
        --variant yaml= --variant tiny=model.size=tiny
    python benchmarks/dreamer_ablation.py --env cartpole --seeds 0 1 2 3 4 5 6 7 --lanes 2 --variant yaml=
    python benchmarks/dreamer_ablation.py --env cartpole --no-stop --hold 450 --seeds 0 1 2 --lanes 2 --variant yaml=
    python benchmarks/dreamer_ablation.py --env lunarlander --minutes 120 --env-steps 2000000 --keep-at 60 \
        --no-stop --seeds 0 1 --lanes 2 --variant yaml=
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dreamer_cartpole import TARGETS  # noqa: E402 (env yaml: threshold, minutes, env steps, eval every)
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = ("diag/continue_accuracy", "diag/continue_prob_at_terminal", "diag/imagined_cont_mean", "diag/actor_entropy", "diag/return_scale",
               "diag/value_mean", "loss/continue", "loss/reward", "time/updates_per_s", "time/env_steps_per_s")
KEPT_FILES = ("checkpoint.pt", "best.pt", "config.yaml")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant needs NAME=override,override,... (got {text!r})")
    return name, [o for o in overrides.split(",") if o]


def command(env: str, seed: int, overrides: list[str], args, threshold: float, minutes: float, steps: int,
            eval_every: int, root: Path) -> list[str]:
    stop = [] if args.no_stop else [f"eval.stop_at_return={threshold}"]
    return [sys.executable, "-m", "recipes.dreamer", "--env", env, f"seed={seed}", f"threads={args.threads}",
            f"train.env_steps={steps}", f"eval.every={eval_every}", f"run.time_budget_s={minutes * 60}",
            f"run.root={root}", "run.progress=false", *stop, *args.overrides, *overrides]


def run_dir_of(log: Path) -> Path | None:
    """The run directory a recipe's log names (``run directory: ...``), once it has printed it."""
    m = re.search(r"run directory: (\S+)", log.read_text(errors="replace")) if log.exists() else None
    return Path(m.group(1)) if m else None


def keep(run_dir: Path, minutes: float) -> Path | None:
    """Copies the run's checkpoint, ``best.pt`` and config (those that exist) to ``<run_dir>/kept_<minutes>min``;
    ``None`` if there is no checkpoint yet. The recipe writes its checkpoints atomically, so a copy is
    always one whole file."""
    if not (run_dir / "checkpoint.pt").is_file():
        return None
    dest = run_dir / f"kept_{minutes:g}min"
    dest.mkdir(exist_ok=True)
    for name in KEPT_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    return dest


def score_kept(env: str, dest: Path, episodes: int, threads: int) -> dict:
    """``--evaluate`` on each kept file (fresh episodes, as the recipe's own evaluation of a checkpoint):
    ``{"env_steps", "checkpoint", "best"}`` (episode reward sums; ``None`` where a file or its score is missing)."""
    out = {"dir": str(dest), "env_steps": None, "checkpoint": None, "best": None}
    for name, key, record in (("checkpoint.pt", "checkpoint", "eval.json"), ("best.pt", "best", "eval_best.json")):
        if not (dest / name).is_file():
            continue
        subprocess.run([sys.executable, "-m", "recipes.dreamer", "--env", env, "--evaluate", str(dest / name),
                        f"eval.episodes={episodes}", f"threads={threads}", "run.progress=false"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if (dest / record).is_file():
            scored = json.loads((dest / record).read_text())
            out[key] = scored.get("eval/episode_reward_sum")
            if key == "checkpoint":
                out["env_steps"] = scored.get("env_steps")
    return out


def run_jobs(jobs: list[dict], lanes: int, keep_at: tuple[float, ...] = ()) -> None:
    """Runs every job's command, ``lanes`` at a time; stdout+stderr to the job's log file. ``keep_at``:
    minutes after each job's start at which :func:`keep` copies its files (``job["kept"]``: minutes -> folder).

    Interrupted (Ctrl-C, or SIGTERM with :func:`main`'s handler), it stops the running jobs, marks them
    ``interrupted`` and the ones not started ``skipped``, and returns: the caller still writes what ran."""
    pending, running = list(jobs), []
    try:
        _run_jobs(pending, running, lanes, keep_at)
    except KeyboardInterrupt:
        print("interrupted: stopping the running jobs; the results so far are written", flush=True)
        for job, proc, fh in running:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fh.close()
            job["returncode"], job["wall_s"] = proc.returncode, time.perf_counter() - job["t0"]
            job["interrupted"] = True
        for job in pending:
            job["skipped"] = True


def _run_jobs(pending: list[dict], running: list, lanes: int, keep_at: tuple[float, ...]) -> None:
    while pending or running:
        while pending and len(running) < lanes:
            job = pending.pop(0)
            job["log"].parent.mkdir(parents=True, exist_ok=True)
            fh = open(job["log"], "w")
            job["t0"] = time.perf_counter()
            print(f"start {job['variant']} seed {job['seed']}: {' '.join(job['cmd'][2:])}", flush=True)
            running.append((job, subprocess.Popen(job["cmd"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT), fh))
        time.sleep(2)
        for job, _, _ in running:
            for minutes in keep_at:
                if minutes not in job.setdefault("kept", {}) and time.perf_counter() - job["t0"] >= minutes * 60:
                    run_dir = run_dir_of(job["log"])
                    dest = keep(run_dir, minutes) if run_dir is not None else None
                    if dest is not None:
                        job["kept"][minutes] = dest
                        print(f"kept  {job['variant']} seed {job['seed']} at {minutes:g} min: {dest}", flush=True)
        for item in list(running):
            job, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                job["returncode"], job["wall_s"] = proc.returncode, time.perf_counter() - job["t0"]
                print(f"done  {job['variant']} seed {job['seed']}: exit {proc.returncode} after "
                      f"{job['wall_s'] / 60:.1f} min", flush=True)
                running.remove(item)


def summarise(job: dict, threshold: float, hold: float) -> dict:
    text = job["log"].read_text(errors="replace")
    run_dir = run_dir_of(job["log"])
    out = {"variant": job["variant"], "seed": job["seed"], "overrides": job["overrides"],
           "returncode": job.get("returncode"), "log": str(job["log"]),
           **({"interrupted": True} if job.get("interrupted") else {})}
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return {**out, "error": text.strip().splitlines()[-1] if text.strip() else "no output"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum"]) for r in rows
             if isinstance(r.get("eval/episode_reward_sum"), (int, float))]
    # optim.ema_decay: the evaluations above are the weight average's, these the last iterate's
    evals_last = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum_last"]) for r in rows
                  if isinstance(r.get("eval/episode_reward_sum_last"), (int, float))]
    # eval.recheck_episodes: the evaluations that were rechecked, with the pooled score over all their episodes
    rechecks = [(r["train/env_steps"], r["eval/episode_reward_sum"], r["eval/recheck_episode_reward_sum"],
                 r.get("eval/recheck_episodes")) for r in rows
                if isinstance(r.get("eval/recheck_episode_reward_sum"), (int, float))]
    first = next((i for i, (_, _, v) in enumerate(evals) if v >= threshold), None)
    after = [v for _, _, v in evals[first + 1:]] if first is not None else []
    tail = rows[len(rows) * 3 // 4:]
    diag = {}
    for key in DIAGNOSTICS:
        vals = [r[key] for r in tail if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        diag[key] = statistics.fmean(vals) if vals else None
    repeat = 1  # env.action_repeat: env steps here are agent steps of this many frames
    if (run_dir / "config.yaml").exists():
        env_cfg = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("env") or {}
        repeat = int(env_cfg.get("action_repeat", 1))
    result = {}
    if (run_dir / "result.json").exists():
        result = json.loads((run_dir / "result.json").read_text())
    return {**out, "run_dir": str(run_dir), "evals": evals, "reached": first is not None,
            "reached_s": evals[first][0] if first is not None else None,
            "reached_env_steps": evals[first][1] if first is not None else None,
            "evals_after_reach": len(after), "min_after_reach": min(after) if after else None,
            "held": (all(v >= hold for v in after) if first is not None else False),
            "best_eval": max(v for _, _, v in evals) if evals else None,
            "final_eval": evals[-1][2] if evals else None,
            "total_s": rows[-1].get("time/total_s"), "env_steps": rows[-1].get("train/env_steps"),
            "updates": rows[-1].get("train/updates"), "action_repeat": repeat,
            "frames": rows[-1].get("train/env_steps") * repeat if rows[-1].get("train/env_steps") else None,
            "confirm_final": result.get("final", {}).get("episode_reward_sum"),
            "confirm_best": result.get("best", {}).get("episode_reward_sum"),
            "confirm_episodes": result.get("episodes"), "diagnostics_last_quarter": diag,
            **({"kept": job["scored"]} if job.get("scored") else {}),
            **({"rechecks": rechecks, "best_recheck": max(v for _, _, v, _ in rechecks)} if rechecks else {}),
            **({"evals_last": evals_last, "best_eval_last": max(v for _, _, v in evals_last),
                "final_eval_last": evals_last[-1][2],
                "confirm_final_last": result.get("final_last", {}).get("episode_reward_sum")} if evals_last else {})}


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[dict], variants: list[str], args, threshold: float, minutes: float) -> str:
    lines = [f"| variant | seeds | budget | threads | reached {threshold:g} | minutes to it (each seed) | best eval "
             f"(mean) | final eval (mean) | {results[0].get('confirm_episodes') or 50}-episode re-score: final / best "
             f"(mean) | updates/s | env steps (mean) | updates (mean) |" if results else "",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in variants:
        rs = [r for r in results if r["variant"] == name and "error" not in r]
        if not rs:
            continue
        mean = lambda key: statistics.fmean([r[key] for r in rs if r.get(key) is not None]) if any(  # noqa: E731
            r.get(key) is not None for r in rs) else None
        reached = sum(r["reached"] for r in rs)
        times = ", ".join(_fmt(r["reached_s"] / 60 if r["reached"] else None) for r in rs)
        held = f"; held >= {args.hold:g}: {sum(r['held'] for r in rs)}/{len(rs)}" if args.no_stop else ""
        ups = [r["diagnostics_last_quarter"]["time/updates_per_s"] for r in rs
               if r["diagnostics_last_quarter"].get("time/updates_per_s")]
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {minutes:g} min | {args.threads} | "
                     f"{reached}/{len(rs)}{held} | {times} | {_fmt(mean('best_eval'))} | {_fmt(mean('final_eval'))} | "
                     f"{_fmt(mean('confirm_final'))} / {_fmt(mean('confirm_best'))} | "
                     f"{_fmt(statistics.fmean(ups) if ups else None)} | {_fmt(mean('env_steps'), ',.0f')} | "
                     f"{_fmt(mean('updates'), ',.0f')} |")
    return "\n".join(lines)


def plot(path: Path, results: list[dict], variants: list[str], threshold: float, env: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants), 3.8), squeeze=False)
    for ax, name in zip(axes[0], variants):
        for r in (r for r in results if r["variant"] == name and r.get("evals")):
            t, _, v = zip(*r["evals"])
            line, = ax.plot([x / 60 for x in t], v, "o-", ms=2, label=f"seed {r['seed']}")
            if r.get("evals_last"):  # optim.ema_decay: the last iterate, dotted, beside its weight average
                t, _, v = zip(*r["evals_last"])
                ax.plot([x / 60 for x in t], v, ":", lw=0.8, color=line.get_color(), label=f"seed {r['seed']} last iterate")
        ax.axhline(threshold, color="k", ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("wall clock (min)")
        ax.set_ylabel("eval episode reward sum")
        ax.legend(fontsize=7)
    fig.suptitle(f"DreamerV3 on {env}: ablation (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cartpole", choices=sorted(TARGETS))
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=override,override,... (repeatable); 'yaml=' is the env YAML unchanged")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget per run")
    parser.add_argument("--env-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--lanes", type=int, default=1, help="runs at once (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-stop", action="store_true", help="run the whole budget (stays-solved check)")
    parser.add_argument("--hold", type=float, default=None, help="with --no-stop: the level every evaluation after "
                                                                 "the first reach must keep (default: the target)")
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks/ablation"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-at", type=float, nargs="+", default=[], metavar="MIN",
                        help="copy each run's checkpoint and best.pt this many minutes after its start, and score "
                             "them on --keep-episodes fresh episodes after the runs")
    parser.add_argument("--keep-episodes", type=int, default=50)
    parser.add_argument("overrides", nargs="*", help="overrides for every variant")
    args = parser.parse_args()
    threshold, minutes, steps, eval_every = TARGETS[args.env]
    minutes, steps = args.minutes or minutes, args.env_steps or steps
    eval_every = args.eval_every or eval_every
    args.hold = threshold if args.hold is None else args.hold
    if any(m <= 0 or m >= minutes for m in args.keep_at):
        parser.error(f"--keep-at: minutes must lie inside the budget (0, {minutes:g})")
    if args.lanes * args.threads > (os.cpu_count() or 1):
        print(f"warning: {args.lanes} lanes x {args.threads} threads > {os.cpu_count()} cores: timings will lie",
              flush=True)
    variants = [parse_variant(v) for v in (args.variant or ["yaml="])]
    stamp = provenance(torch_threads_runs=args.threads, lanes=args.lanes)
    root = args.root.resolve()
    jobs = [{"variant": name, "seed": seed, "overrides": ov, "log": root / "logs" / f"{name}_seed{seed}.log",
             "cmd": command(args.env, seed, ov, args, threshold, minutes, steps, eval_every, root / name)}
            for seed in args.seeds for name, ov in variants]
    signal.signal(signal.SIGTERM, _interrupt)  # `kill <harness>` stops the runs and still writes the JSON
    run_jobs(jobs, args.lanes, tuple(args.keep_at))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for job in jobs:  # after every run has ended, so the scoring does not share the cores with a timed run
        job["scored"] = {f"{m:g}": score_kept(args.env, dest, args.keep_episodes, args.threads)
                         for m, dest in job.get("kept", {}).items()}
    results = [summarise(job, threshold, args.hold) for job in jobs if not job.get("skipped")]
    skipped = [f"{job['variant']} seed {job['seed']}" for job in jobs if job.get("skipped")]
    if skipped:
        print(f"not run (interrupted before they started): {', '.join(skipped)}")
    names = [n for n, _ in variants]
    for r in results:
        if "error" in r:
            print(f"{r['variant']} seed {r['seed']}: FAILED ({r['error']}); log {r['log']}")
        else:
            diag = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in r["diagnostics_last_quarter"].items()
                             if v is not None)
            print(f"{r['variant']} seed {r['seed']} (last quarter of the log): {diag}")
    print()
    print(table(results, names, args, threshold, minutes))
    for r in results:
        if r.get("interrupted"):
            print(f"{r['variant']} seed {r['seed']}: interrupted after {_fmt((r.get('total_s') or 0) / 60)} min "
                  f"(its figures are those of the run so far)")
    for r in results:
        for m, k in r.get("kept", {}).items():
            print(f"{r['variant']} seed {r['seed']} kept at {m} min ({_fmt(k['env_steps'], ',.0f')} env steps), "
                  f"{args.keep_episodes} fresh episodes: checkpoint {_fmt(k['checkpoint'])}, best.pt {_fmt(k['best'])}")
    out = args.out or Path(__file__).parent / "results" / f"dreamer_ablation_{args.env}"
    write_json(out.with_suffix(".json"), {
        "env": args.env, "threshold": threshold, "budget_min": minutes, "budget_env_steps": steps,
        "eval_every": eval_every, "no_stop": args.no_stop, "hold": args.hold, "common_overrides": args.overrides,
        "variants": {n: ov for n, ov in variants}, "keep_at": args.keep_at, "runs": results, **stamp}, announce=False)
    plot(out.with_suffix(".png"), results, names, threshold, args.env)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
