"""Dreamer and PPO side by side on the same single-agent envs, each for the same wall-clock budget.

    python benchmarks/dreamer_vs_ppo.py                        # masked grid + CartPole, 300 s per run
    python benchmarks/dreamer_vs_ppo.py --envs custom --budget-s 120

Each run is the recipe's command line as a user would type it (``python -m recipes.<algo> --env
<env>``: the shipped YAML for that env, or the neutral ``custom`` YAML for the masked-grid example
``envs/masked_grid.py``) plus the benchmark's own overrides: the time budget
(``run.time_budget_s``; evaluation and compile time count), an env-step cap high enough never to
bind, evaluation every ``eval.every`` env steps. One process per run, one after the other (one
core each: ``threads=1``).

References: on the masked grid, the shortest-path policy (``envs.masked_grid.scripted_action``)
and a uniformly random allowed action, measured here on the same number of episodes; on CartPole
the maximum return (500) and a random policy.

Prints one line per run and a table; writes ``benchmarks/results/dreamer_vs_ppo.json`` (with the
provenance stamp) and ``dreamer_vs_ppo.png`` (evaluation return over wall-clock seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from provenance import provenance, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: env YAML -> (extra overrides for every algorithm, {algo: extra overrides}, eval every N env steps)
ENVS = {
    "custom": (["eval.episodes=50"], {"dreamer": [], "dreamer_reward_scale": ["env.reward_scale=10"], "ppo": []},
               {"dreamer": 2000, "dreamer_reward_scale": 2000, "ppo": 10_000}),
    # the whole budget for both (the CartPole YAMLs stop at their target return otherwise)
    "cartpole": (["eval.stop_at_return=null"], {"dreamer": [], "ppo": []}, {"dreamer": 2500, "ppo": 10_000}),
}


def references(env: str, episodes: int = 2000, seed: int = 123) -> dict[str, float]:
    """Mean episode return of the scripted and the random policy (masked grid), or CartPole's bounds."""
    if env == "cartpole":
        return {"max": 500.0, "random": 22.0}
    from envs.masked_grid import make_env, scripted_action

    out = {}
    for name in ("scripted", "random"):
        env_ = make_env(num_envs=200, max_steps=0, device="cpu", seed=seed)
        gen = torch.Generator().manual_seed(seed)
        td, running, done_returns = env_.reset(), torch.zeros(200), []
        while len(done_returns) < episodes:
            if name == "scripted":
                td["action"] = scripted_action(td["observation"])
            else:
                td["action"] = torch.multinomial(td["action_mask"].float(), 1, generator=gen).squeeze(-1)
            td, nxt = env_.step_and_maybe_reset(td)
            running += td["next", "reward"].squeeze(-1)
            d = td["next", "done"].squeeze(-1)
            done_returns += running[d].tolist()
            running[d] = 0
            td = nxt
        out[name] = sum(done_returns[:episodes]) / episodes
    return out


def run(env: str, algo: str, budget_s: float, root: Path, seed: int) -> dict:
    common, per_algo, every = ENVS[env]
    module = "recipes.ppo" if algo == "ppo" else "recipes.dreamer"
    cmd = [sys.executable, "-m", module, "--env", env, f"seed={seed}", f"run.time_budget_s={budget_s}",
           "train.env_steps=100000000", f"eval.every={every[algo]}", f"run.root={root / algo}", "run.progress=false",
           "threads=1", *common, *per_algo[algo]]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{algo} on {env} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(next(line.split(": ", 1)[1] for line in proc.stdout.splitlines()
                        if line.startswith("run directory: ")))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum"]) for r in rows
             if "eval/episode_reward_sum" in r]
    extra = {k: rows[-1][k] for k in ("train/updates", "diag/imagined_mask_accuracy") if k in rows[-1]}
    return {"env": env, "algo": algo, "command": " ".join(cmd[2:]), "evals": evals,
            "best_eval": max(v for *_, v in evals) if evals else math.nan,
            "final_eval": evals[-1][2] if evals else math.nan,
            "env_steps": int(evals[-1][1]) if evals else 0, "wall_clock_s": evals[-1][0] if evals else 0.0, **extra}


def plot(results: list[dict], refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({r["env"] for r in results})
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for r in (r for r in results if r["env"] == env):
            ax.plot([t for t, *_ in r["evals"]], [v for *_, v in r["evals"]], marker=".", label=r["algo"])
        for name, value in refs[env].items():
            ax.axhline(value, ls="--", lw=0.8, color="grey")
            ax.text(0, value, f" {name}", va="bottom", fontsize=8, color="grey")
        ax.set_title(env)
        ax.set_xlabel("wall-clock seconds (training + evaluation)")
        ax.set_ylabel("eval episode reward sum")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "dreamer_vs_ppo.json")
    args = parser.parse_args()
    stamp = provenance(torch_threads_runs=1)  # taken before the runs: the code they ran
    results, refs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for env in args.envs:
            refs[env] = references(env)
            print(f"{env}: references {refs[env]}", flush=True)
            for algo in ENVS[env][1]:
                r = run(env, algo, args.budget_s, Path(tmp), args.seed)
                results.append(r)
                print(f"{env:9s} {algo:21s} best {r['best_eval']:8.3f} final {r['final_eval']:8.3f} "
                      f"env steps {int(r['env_steps']):7d} in {r['wall_clock_s']:6.0f} s", flush=True)
    print("\n| env | algorithm | best eval | final eval | env steps | seconds | reference |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ref = ", ".join(f"{k} {v:.3g}" for k, v in refs[r["env"]].items())
        print(f"| {r['env']} | {r['algo']} | {r['best_eval']:.3f} | {r['final_eval']:.3f} | {r['env_steps']} | "
              f"{r['wall_clock_s']:.0f} | {ref} |")
    record = {"benchmark": "dreamer_vs_ppo", "budget_s": args.budget_s, "seed": args.seed, "references": refs,
              "results": results, **stamp}
    write_json(args.out, record, announce=False)
    plot(results, refs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
