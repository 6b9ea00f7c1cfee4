"""MAPPO on the four tuned VMAS scenarios, each under a wall-clock budget: the table in docs/multi_agent.md.

For every scenario YAML in ``recipes/configs/mappo_vmas/`` (navigation, reverse_transport,
wheel, buzz_wire) runs the recipe with its default settings, stopping at the YAML's iteration
count or when the budget is spent (``run.time_budget_s``), whichever comes first. Scenarios run
one after the other. Prints a markdown table (training and deterministic-eval episode reward
SUM at the end, best eval, iterations, frames, wall-clock), writes JSON and one PNG of the
curves against wall-clock time.

    python benchmarks/vmas_scenarios.py --budget-min 10          # ~35 min on the 2-core machine
    python benchmarks/vmas_scenarios.py --scenarios wheel --budget-min 2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from recipes.mappo_vmas import main as mappo_main
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

SCENARIOS = ["navigation", "reverse_transport", "wheel", "buzz_wire"]


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _f(value) -> float:
    return float(value) if value is not None else math.nan


def run(scenario: str, budget_s: float, root: Path, threads: int, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    run_dir = mappo_main([
        "--env", scenario, f"run.time_budget_s={budget_s}", f"run.root={root}", f"threads={threads}",
        "run.progress=false", *overrides,
    ])
    wall = time.perf_counter() - t0
    records = _read(run_dir)
    evals = [r["eval/episode_reward_sum"] for r in records if "eval/episode_reward_sum" in r]
    last = records[-1]
    return {
        "scenario": scenario,
        "run_dir": str(run_dir),
        "iterations": int(last["train/iteration"]),
        "frames": int(last["train/frames"]),
        "train_s": last["time/total_s"],
        "wall_s": wall,
        "final_train_reward_sum": _f(last.get("train/episode_reward_sum")),
        "final_eval_reward_sum": _f(evals[-1]) if evals else math.nan,
        "best_eval_reward_sum": max(map(_f, evals)) if evals else math.nan,
        "curve": [
            {"t": r["time/total_s"], "iteration": r["train/iteration"], "train": r.get("train/episode_reward_sum"),
             "eval": r.get("eval/episode_reward_sum")}
            for r in records
        ],
    }


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        curve = res["curve"]
        ax.plot([c["t"] / 60 for c in curve], [_f(c["train"]) for c in curve], label="train")
        ev = [(c["t"] / 60, _f(c["eval"])) for c in curve if c["eval"] is not None]
        if ev:
            ax.plot(*zip(*ev), "o--", ms=3, label="eval (deterministic)")
        ax.set_title(res["scenario"])
        ax.set_xlabel("training wall-clock (min)")
        ax.set_ylabel("episode reward sum")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS)
    parser.add_argument("--budget-min", type=float, default=10.0, help="wall-clock budget per scenario (minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vmas_scenarios")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every scenario")
    args = parser.parse_args()
    stamp = provenance(torch_threads_runs=args.threads)  # before the runs: the code they ran
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for scenario in args.scenarios:
        print(f"== {scenario}: budget {args.budget_min:g} min ==", flush=True)
        res = run(scenario, args.budget_min * 60, args.root, args.threads, args.overrides)
        results.append(res)
        print(f"{scenario}: {res['iterations']} iterations, {res['frames']} frames, {res['train_s'] / 60:.1f} min; "
              f"train reward sum {res['final_train_reward_sum']:.3f}, eval {res['final_eval_reward_sum']:.3f} "
              f"(best eval {res['best_eval_reward_sum']:.3f})", flush=True)
        write_json(args.out.with_suffix(".json"), {"budget_min": args.budget_min, "results": results, **stamp},
                   announce=False)
    print()
    print("| scenario | iterations (frames) | training time | train episode reward sum (last iter) | "
          "eval episode reward sum (last / best) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['iterations']} ({r['frames']:,}) | {r['train_s'] / 60:.1f} min | "
              f"{r['final_train_reward_sum']:.3f} | {r['final_eval_reward_sum']:.3f} / {r['best_eval_reward_sum']:.3f} |")
    plot(args.out.with_suffix(".png"), results)
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
