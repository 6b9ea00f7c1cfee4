"""PPO + pointer network on TSP20 (or CVRP20, TSP50, CVRP50) for a fixed wall-clock budget.

Prints the greedy dev-set gap over time and the training throughput (instances/s), then
evaluates the final checkpoint with multi-start decoding and x8 augmentation; writes JSON and a
PNG of the gap curve.

    python benchmarks/routing_ppo.py --env tsp20 --budget-min 30
    python benchmarks/routing_ppo.py --env cvrp20 --budget-min 30
    python benchmarks/routing_ppo.py --env cvrp20 --budget-min 30 --config recipes/configs/ppo_routing/multistart20.yaml
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from recipes.ppo_routing import PPORoutingConfig, evaluate_checkpoint
from recipes.ppo_routing import main as ppo_main
from torchrl_dreamer.config import load_config, to_object
from torchrl_dreamer.plots import read_metrics
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="tsp20", help="tsp20 | cvrp20 | tsp50 | cvrp50")
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--config", action="append", default=[],
                        help="extra YAML layer(s) for the recipe, e.g. recipes/configs/ppo_routing/multistart20.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    stamp = provenance(torch_threads_runs=args.threads)  # before the run: the code it ran
    out = args.out or Path(__file__).parent / "results" / f"routing_ppo_{args.env}"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = ppo_main(["--env", args.env, f"run.time_budget_s={args.budget_min * 60}", "train.iterations=1000000",
                        f"threads={args.threads}", f"run.root={args.root}", "run.progress=false",
                        *[a for c in args.config for a in ("--config", c)], *args.overrides])
    records = read_metrics(run_dir)
    curve = [(r["time/total_s"], r["train/instances"], r["eval/gap_pct"]) for r in records if "eval/gap_pct" in r]
    last = [r.get("eval/gap_pct_last") for r in records if "eval/gap_pct" in r]  # ppo.ema_decay > 0
    has_ema = any(g is not None for g in last)
    print("\ntraining minutes | instances | greedy dev gap %" + (" (EMA weights) | last iterate %" if has_ema else ""))
    for (t, n, gap), g_last in zip(curve, last):
        print(f"{t / 60:8.1f} | {int(n):9d} | {gap:6.2f}" + (f" | {g_last:6.2f}" if has_ema else ""))
    # median: robust to the odd iteration slowed by something else running on the machine
    throughput = statistics.median(r["time/instances_per_s"] for r in records)
    cfg = to_object(load_config(PPORoutingConfig, [run_dir / "config.yaml"], []))
    k = cfg.ppo.rollouts_per_instance  # with k > 1 an "instance" above is one rollout; k share a problem
    results = {"env": args.env, "budget_min": args.budget_min, "threads": args.threads, "configs": args.config,
               "overrides": args.overrides,
               "run_dir": str(run_dir),
               "instances_per_s_median": throughput, "rollouts_per_instance": k,
               "distinct_instances_per_s_median": throughput / k, "curve": curve, "final_greedy_gap_pct": curve[-1][2],
               "best_greedy_gap_pct": min(c[2] for c in curve)}
    if has_ema:
        results["curve_gap_pct_last_iterate"] = last
    for multistart, augment in ((False, 8), (True, 1), (True, 8)):
        cfg = to_object(load_config(PPORoutingConfig, [run_dir / "config.yaml"],
                                    [f"eval.multistart={str(multistart).lower()}", f"eval.augment={augment}"]))
        res = evaluate_checkpoint(cfg, run_dir)
        key = f"gap_pct_{'multistart' if multistart else 'greedy'}_x{augment}"
        results[key] = res["gap_pct"]
        print(f"final checkpoint, {'multi-start' if multistart else 'greedy'} x{augment} augmentation: "
              f"gap {res['gap_pct']:.2f}% (decode {res['decode_s']:.1f} s for the dev set)")
    print(f"training throughput: {throughput:.0f} instances/s (median over iterations, rollout + update; "
          f"{args.threads} threads)" + (f"; {k} rollouts per problem: {throughput / k:.1f} distinct problems/s"
                                        if k > 1 else ""))
    write_json(out.with_suffix(".json"), {**results, **stamp}, announce=False)
    plot_curve(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


TARGETS = {"tsp20": 3.0, "cvrp20": 8.0}  # greedy dev gap (%) within 30 minutes (issue targets)


def plot_curve(results: dict, path: Path) -> None:
    """Greedy dev gap over wall clock (EMA weights and last iterate when both were logged) with the
    env's target line. Also usable on a saved JSON: ``plot_curve(json.load(f), Path("x.png"))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, env = results["curve"], results["env"]
    minutes = [c[0] / 60 for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    last = results.get("curve_gap_pct_last_iterate")
    if last:
        ax.plot(minutes, last, "-", color="tab:gray", alpha=0.5, lw=1, label="last iterate")
    ax.plot(minutes, [c[2] for c in curve], "o-", ms=3, label="EMA weights" if last else "greedy gap")
    if env in TARGETS:
        ax.axhline(TARGETS[env], ls="--", color="tab:red", lw=1, label=f"target {TARGETS[env]:g}%")
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("greedy gap to reference (%)")
    ax.set_yscale("log")
    ax.set_title(f"PPO + pointer network, {env} dev set (final {curve[-1][2]:.2f}%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
