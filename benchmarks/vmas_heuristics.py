"""Scripted reference policies on the tuned VMAS scenarios, through the MAPPO recipe's own evaluation.

For each scenario YAML of ``recipes/configs/mappo_vmas/`` this builds the evaluation env exactly as
``python -m recipes.mappo_vmas --evaluate`` does (``eval.num_envs`` envs, seed + 20000, the YAML's
``max_steps`` and scenario kwargs) and scores every reference policy of
``baselines/vmas_heuristics.py`` with ``recipes.mappo_vmas.evaluate`` (one full horizon, the mean
episode reward SUM over the episodes that ended in it). ``--repeats`` runs that evaluation with
several seeds and reports mean and standard deviation. Prints a markdown table, writes JSON and a
PNG (one bar chart per scenario).

    python benchmarks/vmas_heuristics.py                       # ~2 min on the 2-core machine
    python benchmarks/vmas_heuristics.py --scenarios buzz_wire --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from baselines.vmas_heuristics import reference_policy
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

POLICIES = {
    "wheel": ["do_nothing", "random", "wheel", "wheel_push"],
    "buzz_wire": ["do_nothing", "random", "buzz_wire"],
    "reverse_transport": ["do_nothing", "random", "reverse_transport"],
}


def scenario_config(scenario: str, overrides: list[str]):
    from recipes import mappo_vmas
    from torchrl_dreamer.cli import parse_recipe_args
    from torchrl_dreamer.config import to_object

    args = parse_recipe_args(["--env", scenario, *overrides], schema=mappo_vmas.MAPPOConfig,
                             config_dir=mappo_vmas.CONFIG_DIR, description="", default_env="navigation")
    return to_object(args.cfg)


def score(scenario: str, rule: str, repeats: int, overrides: list[str]) -> dict:
    from recipes import mappo_vmas

    cfg = scenario_config(scenario, overrides)
    values, episodes = [], []
    t0 = time.perf_counter()
    for r in range(repeats):
        env = mappo_vmas.make_env_from_config(cfg, num_envs=cfg.eval.num_envs, seed=cfg.seed + 20_000 + 1000 * r)
        torch.manual_seed(cfg.seed + r)
        metrics = mappo_vmas.evaluate(reference_policy(rule, env), env, cfg.env.max_steps)
        env.close()
        values.append(metrics["eval/episode_reward_sum"])
        episodes.append(metrics.get("eval/episodes_finished", float("nan")))
    return {"scenario": scenario, "policy": rule, "repeats": repeats, "num_envs": cfg.eval.num_envs,
            "max_steps": cfg.env.max_steps, "kwargs": dict(cfg.env.kwargs),
            "mean": statistics.fmean(values), "std": statistics.pstdev(values) if repeats > 1 else 0.0,
            "values": values, "episodes": episodes, "seconds": time.perf_counter() - t0}


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = [r for r in results if r["scenario"] == scenario]
        ax.bar([r["policy"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(scenario)
        ax.set_ylabel("eval episode reward sum")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=3, help="evaluations with different env seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vmas_heuristics.json")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every scenario")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamp = provenance(torch_threads_runs=args.threads)
    results = []
    for scenario in args.scenarios:
        for rule in POLICIES[scenario]:
            res = score(scenario, rule, args.repeats, args.overrides)
            results.append(res)
            print(f"{scenario:18s} {rule:18s} episode reward sum {res['mean']:8.3f} +- {res['std']:.3f} "
                  f"({args.repeats} x {res['num_envs']} envs, {res['seconds']:.0f} s)", flush=True)
    write_json(args.out, {"repeats": args.repeats, "results": results, **stamp}, announce=False)
    print("\n| scenario | policy | eval episode reward sum (mean +- sd over repeats) |\n|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['policy']} | {r['mean']:.3f} +- {r['std']:.3f} |")
    plot(args.out.with_suffix(".png"), results)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
