"""Dreamer past one process: env frames/s and learner updates/s against collector workers and backends,
learning curves against the single-process run, and a paper estimate for 8 and 64 workers.

    python benchmarks/scaling.py                                   # throughput: CartPole + pixel CartPole
    python benchmarks/scaling.py --envs cartpole --budget-s 60     # one env, shorter
    python benchmarks/scaling.py --learning --seeds 0 1 2 --minutes 10   # curves: direct vs 2 process workers

**Throughput.** For every ``(backend, workers, sync)`` of ``--setups`` the Dreamer recipe runs the env's
own YAML (``model.compile=false``: compile time would swamp a short run; ``replay.prefill=1024`` so that
a short run leaves prefill; ``env.num_envs`` per worker as in the YAML) for ``--budget-s`` seconds of
training. Rates are taken after prefill (random actions,
no updates) between the first and the last log row: env frames/s received by the learner and
learner updates/s over the same wall clock.

**Learning** (``--learning``): the CartPole YAML (as shipped, compiled update) with the direct
collector and with ``--learning-setup`` (default 2 async process workers), same seeds and wall-clock
budget; the evaluation curves are stored and summarised (final and best evaluation per seed).

**Estimate.** With ``k`` workers on ``k`` free cores a worker keeps its one-worker rate ``f1`` (frames/s of
one process worker collecting without a learner, ``--worker-rate``; else the learner-bound rate of the
``process:1`` run); the learner consumes at most ``U * batch * seq_len /
train_ratio`` frames/s (``U``: its updates/s at that batch), so ``frames/s(k) ~ min(k * f1, learner
cap)`` (the env rate also lower-bounds nothing else: network, Ray's object store and the weight
pushes are not modelled). Cost: ``(k + learner cores) x --usd-per-core-hour``.

Writes ``benchmarks/results/scaling.json`` (with the provenance stamp) and ``scaling.png``.
The machine this ran on has 2 cores: learner and workers share them, so more workers than one
cannot add frames/s here; the per-worker figures are what the estimate scales.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

SETUPS = ["direct:1:sync", "process:1:sync", "process:2:sync", "process:2:async", "ray:2:sync"]


def parse_setup(text: str) -> tuple[str, int, bool]:
    backend, workers, mode = text.split(":")
    return backend, int(workers), mode == "sync"


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def collector_args(backend: str, workers: int, sync: bool) -> list[str]:
    return [f"collector.backend={backend}", f"collector.num_workers={workers}", f"collector.sync={str(sync).lower()}"]


def throughput(env: str, setup: str, budget_s: float, root: Path, seed: int) -> dict:
    from recipes import dreamer

    backend, workers, sync = parse_setup(setup)
    t0 = time.perf_counter()
    run_dir = dreamer.main(["--env", env, f"seed={seed}", "model.compile=false", "eval.every=0", "replay.prefill=1024",
                            "train.env_steps=100000000", f"run.time_budget_s={budget_s}", f"run.root={root}",
                            "run.progress=false", "run.tensorboard=false", "run.log_every=200",
                            *collector_args(backend, workers, sync)])
    wall = time.perf_counter() - t0
    rows = [r for r in read_rows(run_dir) if "train/env_steps" in r]
    trained = [r for r in rows if r.get("diag/random_actions") == 0.0]
    first, last = (trained[0], trained[-1]) if len(trained) >= 2 else (rows[0], rows[-1])
    dt = max(last["time/total_s"] - first["time/total_s"], 1e-9)
    return {"env": env, "setup": setup, "backend": backend, "workers": workers, "sync": sync,
            "frames_per_s": (last["train/env_steps"] - first["train/env_steps"]) / dt,
            "updates_per_s": (last["train/updates"] - first["train/updates"]) / dt,
            "learner_updates_per_s_while_updating": last.get("time/updates_per_s", math.nan),
            "policy_lag": last.get("diag/policy_version_lag", 0.0), "measured_s": dt, "wall_s_with_startup": wall,
            "env_steps": last["train/env_steps"], "run_dir": str(run_dir)}


def worker_rate(env: str, workers: int, batches: int = 30) -> dict:
    """Env frames/s of ``workers`` process workers collecting with the acting policy and no learner
    (what a worker can deliver when the learner does not hold it back)."""
    import functools

    import torch

    from recipes import dreamer
    from torchrl_dreamer.cli import parse_recipe_args
    from torchrl_dreamer.collectors import (CollectorConfig, WeightPusher, acting_copy, make_collector,
                                            shutdown_quietly)
    from torchrl_dreamer.config import to_object

    cfg = to_object(parse_recipe_args(["--env", env, "model.compile=false"], schema=dreamer.DreamerConfig,
                                      config_dir=dreamer.CONFIG_DIR, description="", default_env="cartpole").cfg)
    learner_env = dreamer.make_env_from_config(cfg, num_envs=cfg.env.num_envs, seed=0)
    agent, policy = dreamer.build_agent(cfg, learner_env)
    learner_env.close()
    cc = CollectorConfig(backend="process", num_workers=workers, sync=True)
    per_worker = cfg.env.num_envs * cfg.train.steps_per_collect
    collector = make_collector(cc, make_env=functools.partial(dreamer.worker_env, cfg, policy.primer_specs(), 0),
                               policy=acting_copy(policy, cc), frames_per_worker=per_worker,
                               total_frames=per_worker * workers * (batches + 10), learner_threads=torch.get_num_threads())
    try:
        WeightPusher(collector, policy, cc).initial_push()  # the actor's own actions, not prefill
        it = iter(collector)
        for _ in range(3):  # warm-up
            next(it)
        t0, frames = time.perf_counter(), 0
        for _ in range(batches):
            frames += next(it).numel()
        rate = frames / (time.perf_counter() - t0)
    finally:
        shutdown_quietly(collector)
    return {"env": env, "workers": workers, "collect_only_frames_per_s": rate}


def learning(setup: str, seed: int, minutes: float, root: Path) -> dict:
    from recipes import dreamer

    backend, workers, sync = parse_setup(setup)
    run_dir = dreamer.main(["--env", "cartpole", f"seed={seed}", "eval.every=2500", "train.env_steps=100000000",
                            f"run.time_budget_s={minutes * 60}", f"run.root={root}", "run.progress=false",
                            "run.tensorboard=false", *collector_args(backend, workers, sync)])
    curve = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum"]) for r in read_rows(run_dir)
             if "eval/episode_reward_sum" in r]
    return {"setup": setup, "seed": seed, "curve": curve, "final": curve[-1][2] if curve else math.nan,
            "best": max((c[2] for c in curve), default=math.nan),
            "first_475_s": next((c[0] for c in curve if c[2] >= 475), None)}


def estimate(results: list[dict], env: str, usd_per_core_hour: float, rates: list[dict] = ()) -> dict:
    """Frames/s and cost for 8 and 64 workers from the one-worker process figures (see the docstring)."""
    from recipes import dreamer
    from torchrl_dreamer.cli import parse_recipe_args
    from torchrl_dreamer.config import to_object

    one = next((r for r in results if r["env"] == env and r["backend"] == "process" and r["workers"] == 1), None)
    direct = next((r for r in results if r["env"] == env and r["backend"] == "direct"), None)
    if one is None or direct is None:
        return {}
    rate = next((r["collect_only_frames_per_s"] for r in rates if r["env"] == env and r["workers"] == 1), None)
    if rate is not None:  # a worker's own rate, without the learner holding it back
        one = {**one, "frames_per_s": rate}
    cfg = to_object(parse_recipe_args(["--env", env], schema=dreamer.DreamerConfig, config_dir=dreamer.CONFIG_DIR,
                                      description="", default_env="cartpole").cfg)
    per_update = cfg.replay.batch_size * cfg.replay.seq_len / cfg.replay.train_ratio  # env frames one update pays for
    learner_ups = direct["learner_updates_per_s_while_updating"]
    cap = learner_ups * per_update
    out = {"env": env, "one_worker_frames_per_s": one["frames_per_s"], "learner_updates_per_s": learner_ups,
           "learner_frame_cap_per_s": cap, "train_ratio": cfg.replay.train_ratio, "rows": []}
    for k in (1, 2, 8, 64):
        frames = min(k * one["frames_per_s"], cap)
        cores = k + max(cfg.threads, 1)
        out["rows"].append({"workers": k, "frames_per_s": frames, "learner_bound": k * one["frames_per_s"] > cap,
                            "cores": cores, "usd_per_hour": cores * usd_per_core_hour,
                            "usd_per_million_frames": cores * usd_per_core_hour / (frames * 3600 / 1e6)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["cartpole", "cartpole_pixels"])
    parser.add_argument("--setups", nargs="+", default=SETUPS, help="backend:workers:sync|async")
    parser.add_argument("--budget-s", type=float, default=90.0, help="training seconds per throughput run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning", action="store_true", help="also the learning-curve comparison")
    parser.add_argument("--learning-setup", default="process:2:async")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per learning run")
    parser.add_argument("--usd-per-core-hour", type=float, default=0.04)
    parser.add_argument("--worker-rate", action="store_true",
                        help="also time 1 and 2 process workers collecting without a learner (feeds the estimate)")
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling")
    args = parser.parse_args()
    from torchrl_dreamer.collectors import ray_available

    stamp = provenance()  # before the runs: the code they ran
    setups = [s for s in args.setups if not s.startswith("ray") or ray_available()]
    skipped = sorted(set(args.setups) - set(setups))
    if skipped:
        print(f"skipped (Ray not installed): {', '.join(skipped)}", flush=True)
    results = []
    for env in args.envs:
        for setup in setups:
            r = throughput(env, setup, args.budget_s, args.root, args.seed)
            results.append(r)
            print(f"{env:16s} {setup:16s} {r['frames_per_s']:8.1f} env frames/s {r['updates_per_s']:7.2f} updates/s "
                  f"(learner {r['learner_updates_per_s_while_updating']:.2f} while updating; lag "
                  f"{r['policy_lag']:.1f}; startup+run {r['wall_s_with_startup']:.0f} s)", flush=True)
    rates = []
    if args.worker_rate:
        for env in args.envs:
            for workers in (1, 2):
                r = worker_rate(env, workers)
                rates.append(r)
                print(f"{env:16s} collect only, {workers} process worker(s): {r['collect_only_frames_per_s']:8.1f} "
                      "env frames/s", flush=True)
    estimates = [e for e in (estimate(results, env, args.usd_per_core_hour, rates) for env in args.envs) if e]
    for e in estimates:
        print(f"estimate {e['env']}: one worker {e['one_worker_frames_per_s']:.0f} frames/s, learner cap "
              f"{e['learner_frame_cap_per_s']:.0f} frames/s at train_ratio {e['train_ratio']:.0f}")
        for row in e["rows"]:
            print(f"  {row['workers']:3d} workers: {row['frames_per_s']:9.0f} frames/s"
                  f"{' (learner-bound)' if row['learner_bound'] else ''}, {row['cores']} cores, "
                  f"${row['usd_per_hour']:.2f}/h, ${row['usd_per_million_frames']:.3f} per million frames")
    curves = []
    if args.learning:
        for setup in ["direct:1:sync", args.learning_setup]:
            for seed in args.seeds:
                c = learning(setup, seed, args.minutes, args.root)
                curves.append(c)
                print(f"learning {setup:16s} seed {seed}: final {c['final']:.1f}, best {c['best']:.1f}, first >= 475 at "
                      f"{c['first_475_s'] if c['first_475_s'] is not None else '-'} s", flush=True)
    summary = {**stamp, "budget_s": args.budget_s, "throughput": results, "worker_rates": rates, "estimates": estimates,
               "learning": curves, "learning_minutes": args.minutes if args.learning else None,
               "usd_per_core_hour": args.usd_per_core_hour,
               "note": "2-core machine: learner and workers share the cores; per-worker rates feed the estimate"}
    write_json(args.out.with_suffix(".json"), summary, announce=False)
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if summary["learning"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    envs = sorted({r["env"] for r in summary["throughput"]})
    for env in envs:
        rows = [r for r in summary["throughput"] if r["env"] == env]
        ax.bar([f"{env}\n{r['setup']}" for r in rows], [r["frames_per_s"] for r in rows])
    ax.set_ylabel("env frames/s received by the learner")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    if summary["learning"]:
        ax = axes[0][1]
        for c in summary["learning"]:
            ax.plot([p[0] / 60 for p in c["curve"]], [p[2] for p in c["curve"]], label=f"{c['setup']} s{c['seed']}",
                    linestyle="-" if c["setup"].startswith("direct") else "--")
        ax.set_xlabel("minutes")
        ax.set_ylabel("eval episode reward sum")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
