"""The single-agent PPO recipe on each shipped env YAML for a fixed wall-clock budget.

    python benchmarks/ppo_single_agent.py                               # cartpole, pendulum, lunarlander, 300 s each
    python benchmarks/ppo_single_agent.py --envs cartpole --budget-s 120

Each run is ``python -m recipes.ppo --env <env>`` with the YAML as shipped plus the time budget
(evaluation time counts), an env-step cap that never binds and ``eval.every`` from the YAML. One
process per run, one after the other. Prints one line per run; writes
``benchmarks/results/ppo_single_agent.json`` with the provenance stamp.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance, write_json

ROOT = Path(__file__).resolve().parents[1]
#: env YAML -> the return a solved run reaches (the usual "solved" lines)
SOLVED = {"cartpole": 500.0, "pendulum": -200.0, "lunarlander": 200.0}


def run(env: str, budget_s: float, root: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "recipes.ppo", "--env", env, f"seed={seed}", f"run.time_budget_s={budget_s}",
           "train.env_steps=100000000", f"run.root={root}", "run.progress=false", "eval.stop_at_return=null"]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ppo on {env} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(next(line.split(": ", 1)[1] for line in proc.stdout.splitlines()
                        if line.startswith("run directory: ")))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum"]) for r in rows
             if "eval/episode_reward_sum" in r]
    reached = next(((t, s) for t, s, v in evals if v >= SOLVED[env]), None)
    return {"env": env, "command": " ".join(cmd[2:]), "evals": evals, "solved_at": SOLVED[env],
            "best_eval": max(v for *_, v in evals) if evals else math.nan,
            "final_eval": evals[-1][2] if evals else math.nan, "env_steps": int(evals[-1][1]) if evals else 0,
            "wall_clock_s": evals[-1][0] if evals else 0.0,
            "reached_s": reached[0] if reached else None, "reached_env_steps": reached[1] if reached else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(SOLVED), choices=list(SOLVED))
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ppo_single_agent.json")
    args = parser.parse_args()
    stamp = provenance()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for env in args.envs:
            r = run(env, args.budget_s, Path(tmp), args.seed)
            results.append(r)
            when = (f"reached {r['solved_at']:g} at {r['reached_s']:.0f} s / {r['reached_env_steps']} steps"
                    if r["reached_s"] is not None else f"did not reach {r['solved_at']:g}")
            print(f"{env:12s} best {r['best_eval']:8.1f} final {r['final_eval']:8.1f} after {r['env_steps']} steps "
                  f"in {r['wall_clock_s']:.0f} s; {when}", flush=True)
    write_json(args.out, {"benchmark": "ppo_single_agent", "budget_s": args.budget_s, "seed": args.seed,
                          "results": results, **stamp})


if __name__ == "__main__":
    main()
