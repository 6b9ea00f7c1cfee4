"""Dreamer learning benchmark: wall-clock and env steps until the evaluation mean reaches a threshold.

    python benchmarks/dreamer_cartpole.py --seeds 0 1 2                   # CartPole-v1 >= 475, 15 min / 50k steps
    python benchmarks/dreamer_cartpole.py --env lunarlander               # >= 200 within 60 minutes
    python benchmarks/dreamer_cartpole.py --env pendulum                  # >= -200 within 60 minutes
    python benchmarks/dreamer_cartpole.py --env cartpole_pixels           # what it reaches in 30 minutes

Each seed runs the recipe's *default* config for that env (``recipes/configs/dreamer/<env>.yaml``)
with only the benchmark's own overrides: evaluation every ``--eval-every`` env steps (10
episodes, mode actions; evaluation time counts in the wall clock), stop at the threshold, the
env-step and time budgets. Prints a line per evaluation, writes ``benchmarks/results/
dreamer_<env>.json`` and a PNG of the evaluation curves.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from recipes import dreamer
from torchrl_dreamer.plots import read_metrics
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

TARGETS = {  # env yaml: (threshold, minutes, env steps, eval every)
    "cartpole": (475.0, 15.0, 50_000, 2500),
    "lunarlander": (200.0, 60.0, 1_000_000, 10_000),
    "pendulum": (-200.0, 60.0, 200_000, 5000),
    "cartpole_pixels": (475.0, 30.0, 200_000, 5000),
}


def run_seed(env: str, seed: int, threshold: float, minutes: float, steps: int, eval_every: int, root: Path,
             extra: list[str]) -> dict:
    run_dir = dreamer.main(["--env", env, f"seed={seed}", f"train.env_steps={steps}", f"eval.every={eval_every}",
                            f"eval.stop_at_return={threshold}", f"run.time_budget_s={minutes * 60}",
                            f"run.root={root}", "run.progress=false", *extra])
    evals = [(r["time/total_s"], r["train/env_steps"], r["eval/episode_reward_sum"]) for r in read_metrics(run_dir)
             if "eval/episode_reward_sum" in r]
    reached = next(((t, s, v) for t, s, v in evals if v >= threshold), None)
    return {"seed": seed, "run_dir": str(run_dir), "evals": evals,
            "reached": reached is not None,
            "wall_clock_s": reached[0] if reached else None, "env_steps": reached[1] if reached else None,
            "best_eval": max(v for _, _, v in evals) if evals else math.nan,
            "final_eval": evals[-1][2] if evals else math.nan,
            "total_s": evals[-1][0] if evals else None, "total_env_steps": evals[-1][1] if evals else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cartpole", choices=sorted(TARGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=None, help="override the wall-clock budget")
    parser.add_argument("--env-steps", type=int, default=None, help="override the env-step budget")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra config overrides (reported in the JSON)")
    args = parser.parse_args()
    stamp = provenance()  # before the runs: the code they ran
    threshold, minutes, steps, eval_every = TARGETS[args.env]
    minutes = args.minutes or minutes
    steps = args.env_steps or steps
    eval_every = args.eval_every or eval_every
    out = args.out or Path(__file__).parent / "results" / f"dreamer_{args.env}"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        r = run_seed(args.env, seed, threshold, minutes, steps, eval_every, args.root, list(args.overrides))
        results.append(r)
        for t, s, v in r["evals"]:
            print(f"seed {seed}: {t / 60:6.2f} min | {int(s):7d} env steps | eval return {v:8.1f}")
        verdict = (f"reached {threshold} after {r['wall_clock_s'] / 60:.1f} min and {int(r['env_steps'])} env steps"
                   if r["reached"] else f"did NOT reach {threshold} within {minutes:.0f} min / {steps} env steps "
                                        f"(best {r['best_eval']:.1f}, final {r['final_eval']:.1f})")
        print(f"seed {seed}: {verdict}", flush=True)
    summary = {"env": args.env, "threshold": threshold, "budget_min": minutes, "budget_env_steps": steps,
               "eval_every": eval_every, "overrides": args.overrides, "seeds": results,
               "all_reached": all(r["reached"] for r in results), **stamp}
    write_json(out.with_suffix(".json"), summary, announce=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        t, s, v = zip(*r["evals"]) if r["evals"] else ((), (), ())
        axes[0].plot([x / 60 for x in t], v, "o-", ms=3, label=f"seed {r['seed']}")
        axes[1].plot(s, v, "o-", ms=3, label=f"seed {r['seed']}")
    for ax, xlabel in zip(axes, ("wall clock (min)", "env steps")):
        ax.axhline(threshold, color="k", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval episode reward sum (10 episodes)")
        ax.legend(fontsize=8)
    fig.suptitle(f"DreamerV3 on {args.env} (2-core CPU)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
