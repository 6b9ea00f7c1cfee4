"""DreamerV3 + pointer actor on TSP20 (or CVRP20, ...) for a fixed wall-clock budget.

Same output as ``benchmarks/routing_ppo.py`` (greedy dev-set gap over time, training
instances/s, JSON + PNG), plus Dreamer's own health checks: the imagined invalid-action rate, the
value and lambda-target range over time (no explosion, no NaN), and learned vs known reward.

    python benchmarks/routing_dreamer.py --env tsp20 --budget-min 60                   # the env's YAMLs as they are
    python benchmarks/routing_dreamer.py --env tsp20 --budget-min 60 --reward known    # exact leg lengths
    python benchmarks/routing_dreamer.py --env tsp20 --budget-min 30 --reward both     # learned, then known
    python benchmarks/routing_dreamer.py --env cvrp20 --budget-min 60

``--reward`` left out keeps what the YAMLs say (``ac.known_reward``: learned for TSP, exact for the
CVRP20 YAML); ``learned`` / ``known`` override it.

If ``benchmarks/results/routing_ppo_<env>.json`` exists, the PNG draws the PPO curve beside
Dreamer's so the two are compared on the same dev set and axes.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from recipes import dreamer_routing
from torchrl_dreamer.config import load_config, to_object
from torchrl_dreamer.plots import read_metrics
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)

RESULTS = Path(__file__).parent / "results"


def run(env: str, reward: str, budget_min: float, threads: int, root: Path, overrides: list[str]) -> dict:
    """One run; ``reward``: ``"yaml"`` (as the YAMLs say), ``"learned"`` or ``"known"`` (override)."""
    choice = [] if reward == "yaml" else [f"ac.known_reward={'true' if reward == 'known' else 'false'}"]
    run_dir = dreamer_routing.main(["--env", env, *choice,
                                    f"run.time_budget_s={budget_min * 60}", "train.iterations=100000000",
                                    f"threads={threads}", f"run.root={root}", "run.progress=false", *overrides])
    records = read_metrics(run_dir)
    curve = [(r["time/total_s"], r["train/episodes"], r["eval/gap_pct"]) for r in records if "eval/gap_pct" in r]
    # with optim.ema_decay > 0, eval/gap_pct is the weight average's and eval/gap_pct_last the last iterate's
    last = [(r["time/total_s"], r["train/episodes"], r["eval/gap_pct_last"]) for r in records if "eval/gap_pct_last" in r]
    ranges = [(r["time/total_s"], r.get("diag/value_min", math.nan), r.get("diag/value_max", math.nan),
               r.get("diag/lambda_return_min", math.nan), r.get("diag/lambda_return_max", math.nan))
              for r in records if "eval/gap_pct" in r]
    trained = [r for r in records if r.get("train/updates", 0) > 0 and r.get("diag/prefill", 1.0) == 0.0]
    invalid = max((r.get("diag/imagined_invalid_action_rate", 0.0) for r in records), default=0.0)
    non_finite = sum(1 for r in records for v in r.values() if isinstance(v, float) and not math.isfinite(v))
    cfg = to_object(load_config(dreamer_routing.DreamerRoutingConfig, [run_dir / "config.yaml"], []))
    per_iter = cfg.train.episodes_per_iter
    reward = "known" if cfg.ac.known_reward else "learned"  # what the run used (an override may set it)
    # decode + updates, like the PPO benchmark's rollout + update (dev-set evaluation excluded)
    throughput = (statistics.median(per_iter / (r["time/collect_s"] + r["time/update_s"]) for r in trained)
                  if trained else math.nan)
    tours = [(r["time/total_s"], r.get("train/tour_length"), r.get("diag/imagined_tour_length_model"),
              r.get("diag/imagined_tour_length_exact"), r.get("diag/imagined_mask_accuracy"))
             for r in records if "diag/imagined_tour_length_model" in r]
    print(f"\n[{env}, {reward} reward] training minutes | instances | greedy dev gap % | value min..max | "
          f"lambda-target min..max")
    if last:
        print("(greedy dev gap: the weight average's; the last iterate's in brackets)")
    last_gap = {n: g for _, n, g in last}
    for (t, n, gap), (_, vmin, vmax, lmin, lmax) in zip(curve, ranges):
        shown = f"{gap:7.2f}" + (f" ({last_gap[n]:.2f})" if n in last_gap else "")
        print(f"{t / 60:8.1f} | {int(n):9d} | {shown} | {vmin:8.2f}..{vmax:6.2f} | {lmin:8.2f}..{lmax:6.2f}")
    if tours:
        t, real, model, exact, acc = tours[-1]
        print(f"last diagnostic: real tour {real:.3f}, imagined tour (model reward) {model:.3f}, "
              f"same imagined tours exact {exact:.3f}, learned visited-head accuracy {acc:.3f}")
    print(f"imagined invalid-action rate, max over the run: {invalid}; non-finite logged values: {non_finite}")
    print(f"training throughput: {throughput:.0f} instances/s (median over iterations after prefill: decode + "
          f"updates; {threads} threads)")
    return {"env": env, "reward": reward, "budget_min": budget_min, "run_dir": str(run_dir),
            "instances_per_s_median": throughput, "curve": curve, "value_ranges": ranges, "tour_diagnostics": tours,
            "final_greedy_gap_pct": curve[-1][2] if curve else math.nan,
            "best_greedy_gap_pct": min(c[2] for c in curve) if curve else math.nan,
            "curve_last_iterate": last, "final_greedy_gap_pct_last_iterate": last[-1][2] if last else None,
            "max_imagined_invalid_action_rate": invalid, "non_finite_logged_values": non_finite,
            "updates": records[-1].get("train/updates") if records else 0, "overrides": overrides}


def plot(env: str, results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        ax.plot([c[0] / 60 for c in res["curve"]], [c[2] for c in res["curve"]], "o-", ms=3,
                label=f"Dreamer ({res['reward']} reward)" + (", weight average" if res.get("curve_last_iterate") else ""))
        if res.get("curve_last_iterate"):
            ax.plot([c[0] / 60 for c in res["curve_last_iterate"]], [c[2] for c in res["curve_last_iterate"]], "x:",
                    ms=3, label=f"Dreamer ({res['reward']} reward), last iterate")
        t = [r[0] / 60 for r in res["value_ranges"]]
        bx.plot(t, [r[1] for r in res["value_ranges"]], "-", label=f"value min ({res['reward']})")
        bx.plot(t, [r[2] for r in res["value_ranges"]], "-", label=f"value max ({res['reward']})")
        bx.plot(t, [r[3] for r in res["value_ranges"]], ":", label=f"lambda-target min ({res['reward']})")
    ppo = RESULTS / f"routing_ppo_{env}.json"
    if ppo.is_file():
        curve = json.loads(ppo.read_text())["curve"]
        ax.plot([c[0] / 60 for c in curve], [c[2] for c in curve], "s-", ms=2, color="grey", label="PPO (same dev set)")
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("greedy gap to reference (%)")
    ax.set_yscale("log")
    ax.set_title(f"{env} dev set")
    ax.legend(fontsize=8)
    bx.set_xlabel("training wall-clock (min)")
    bx.set_title("critic values and lambda-targets (imagination)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="tsp20", help="tsp20 | cvrp20 | tsp50 | cvrp50")
    parser.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget per run")
    parser.add_argument("--reward", default="yaml", choices=["yaml", "learned", "known", "both"],
                        help="imagined reward: as the YAMLs say (default), or override: learned head, exact legs, both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/routing_dreamer_<env>)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (recorded in the JSON)")
    args = parser.parse_args()
    stamp = provenance(torch_threads_runs=args.threads)  # before the runs: the code they ran
    rewards = ["learned", "known"] if args.reward == "both" else [args.reward]
    results = [run(args.env, r, args.budget_min, args.threads, args.root, args.overrides) for r in rewards]
    out = args.out or RESULTS / f"routing_dreamer_{args.env}{'' if args.reward == 'yaml' else '_' + args.reward}"
    record = {"runs": results} if len(results) > 1 else results[0]
    write_json(out.with_suffix(".json"), {**record, **stamp}, announce=False)
    plot(args.env, results, out.with_suffix(".png"))
    if len(results) > 1:
        print("\nreward   | final greedy gap % | best greedy gap % | instances/s")
        for res in results:
            print(f"{res['reward']:8s} | {res['final_greedy_gap_pct']:18.2f} | {res['best_greedy_gap_pct']:17.2f} | "
                  f"{res['instances_per_s_median']:.0f}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
