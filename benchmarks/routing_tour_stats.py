"""Where a routing Dreamer checkpoint loses length on CVRP: too many routes, customers grouped into
the wrong routes, or routes driven in a bad order.

    python benchmarks/routing_tour_stats.py runs/dreamer_routing/cvrp20/<stamp> --out NAME

Decodes the run's dev set greedily (as the recipe evaluates; same seed, same tours) and compares each
tour with the dev set's reference solution:

* **routes**: depot-to-depot trips per instance, against the reference's and against the lower bound
  ``ceil(total demand / capacity)``; the mean vehicle fill per route; and how many returns to the
  depot were voluntary (some unvisited customer would still have fitted), with the capacity left;
* **sequencing loss**: each route of the policy re-ordered by 2-opt (same customers, same route): what
  driving the policy's own routes in a better order would save;
* **grouping loss**: what is left of the gap after that: which customers share a route (and how many
  routes there are).

Prints one table and writes ``benchmarks/results/<--out>.json`` (or to ``--out`` itself when it is a path) with the provenance stamp.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from provenance import provenance, write_result  # noqa: E402
from recipes import dreamer_routing as R  # noqa: E402
from envs.routing import load_dev_set  # noqa: E402
from torchrl_dreamer.checkpoint import load_checkpoint  # noqa: E402
from torchrl_dreamer.plots import _routes  # noqa: E402



def routes_of(sequence) -> list[list[int]]:
    """Node sequence (0 = depot, customers 1..n) -> the non-empty customer lists between depot visits
    (the tour plots' own splitting)."""
    return _routes(sequence)


def depot_returns(sequence, demand: np.ndarray, capacity: float) -> tuple[int, int, list[float]]:
    """``(returns before the last, voluntary ones, capacity left at each voluntary one / capacity)``: a
    return is voluntary when some unvisited customer would still have fitted in the vehicle."""
    left, open_ = capacity, set(range(1, len(demand) + 1))
    returns, voluntary, spare = 0, 0, []
    seq = [int(x) for x in sequence]
    for k, node in enumerate(seq):
        if node == 0:
            if open_ and k > 0:
                returns += 1
                if any(demand[c - 1] <= left + 1e-9 for c in open_):
                    voluntary += 1
                    spare.append(left / capacity)
            left = capacity
        else:
            open_.discard(node)
            left -= demand[node - 1]
    return returns, voluntary, spare


def route_length(route: list[int], xy: np.ndarray) -> float:
    path = [0, *route, 0]
    return float(sum(np.linalg.norm(xy[a] - xy[b]) for a, b in zip(path[:-1], path[1:])))


def two_opt(route: list[int], xy: np.ndarray) -> list[int]:
    """2-opt on a depot-to-depot route until no reversal shortens it."""
    best = list(route)
    improved = True
    while improved:
        improved = False
        path = [0, *best, 0]
        for i in range(1, len(path) - 2):
            for j in range(i + 1, len(path) - 1):
                a, b, c, d = xy[path[i - 1]], xy[path[i]], xy[path[j]], xy[path[j + 1]]
                delta = (np.linalg.norm(a - c) + np.linalg.norm(b - d)) - (np.linalg.norm(a - b) + np.linalg.norm(c - d))
                if delta < -1e-9:
                    path[i:j + 1] = path[i:j + 1][::-1]
                    improved = True
        best = path[1:-1]
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a routing Dreamer run directory (config.yaml, checkpoint.pt)")
    parser.add_argument("--checkpoint", default="checkpoint.pt", help="file in the run directory (or best.pt)")
    parser.add_argument("--out", default="routing_tour_stats", help="a name (benchmarks/results/<name>.json) or a path (with a folder, or ending in .json)")
    args = parser.parse_args(argv)
    stamp = provenance()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(R.DreamerRoutingConfig),
                                              OmegaConf.load(args.run_dir / "config.yaml")))
    if cfg.env.problem != "cvrp" or not cfg.env.dev_set:
        raise SystemExit("routing_tour_stats: needs a CVRP run with env.dev_set")
    state = load_checkpoint(args.run_dir / args.checkpoint, map_location="cpu")
    agent, _, _ = R.build(cfg)
    R.load_weights(agent, R.evaluated_weights(state))  # the weight average when the run kept one
    data = load_dev_set(cfg.env.dev_set, cfg.env.problem, cfg.env.size)
    n = data["locs"].shape[0]
    with torch.no_grad():
        lengths, sequences = R.decode_dev(agent, cfg, data, keep=n)
    ref_cost = data["ref_cost"].double().numpy()
    rows = []
    for i in range(n):
        xy = np.concatenate([data["depot"][i:i + 1].numpy(), data["locs"][i].numpy()]).astype(np.float64)
        demand = data["demand"][i].numpy().astype(np.float64)
        capacity = float(data["capacity"][i]) if data["capacity"].ndim else float(data["capacity"])
        mine, ref = routes_of(sequences[i]), routes_of(data["ref_actions"][i].tolist())
        length = float(lengths[i])
        resequenced = sum(route_length(two_opt(r, xy), xy) for r in mine)
        returns, voluntary, spare = depot_returns(sequences[i], demand, capacity)
        ref_returns, ref_voluntary, ref_spare = depot_returns(data["ref_actions"][i].tolist(), demand, capacity)
        rows.append({
            "returns": returns, "voluntary_returns": voluntary, "spare_at_voluntary": spare,
            "ref_returns": ref_returns, "ref_voluntary_returns": ref_voluntary, "ref_spare_at_voluntary": ref_spare,
            "gap_pct": (length / ref_cost[i] - 1) * 100,
            "gap_after_2opt_pct": (resequenced / ref_cost[i] - 1) * 100,
            "routes": len(mine), "ref_routes": len(ref), "min_routes": math.ceil(demand.sum() / capacity - 1e-9),
            "fill": demand.sum() / (len(mine) * capacity),
            "ref_fill": demand.sum() / (len(ref) * capacity),
            "recomputed_length_error": abs(sum(route_length(r, xy) for r in mine) - length),
        })
    mean = lambda key, rs=rows: statistics.fmean(r[key] for r in rs) if rs else float("nan")  # noqa: E731
    extra = [r for r in rows if r["routes"] > r["ref_routes"]]
    same = [r for r in rows if r["routes"] <= r["ref_routes"]]
    summary = {
        "instances": n, "iteration": state.get("iteration"), "episodes": state.get("episodes"),
        "gap_pct": mean("gap_pct"), "gap_after_2opt_pct": mean("gap_after_2opt_pct"),
        "sequencing_loss_pct": mean("gap_pct") - mean("gap_after_2opt_pct"),
        "routes": mean("routes"), "ref_routes": mean("ref_routes"), "min_routes": mean("min_routes"),
        "fill": mean("fill"), "ref_fill": mean("ref_fill"),
        "share_more_routes_than_ref": len(extra) / n,
        "gap_pct_more_routes": mean("gap_pct", extra), "gap_pct_same_routes": mean("gap_pct", same),
        "gap_after_2opt_pct_same_routes": mean("gap_after_2opt_pct", same),
        "voluntary_share_of_returns": sum(r["voluntary_returns"] for r in rows) / max(1, sum(r["returns"] for r in rows)),
        "spare_capacity_at_voluntary": statistics.fmean(x for r in rows for x in r["spare_at_voluntary"])
        if any(r["spare_at_voluntary"] for r in rows) else float("nan"),
        "ref_voluntary_share_of_returns": sum(r["ref_voluntary_returns"] for r in rows)
        / max(1, sum(r["ref_returns"] for r in rows)),
        "ref_spare_capacity_at_voluntary": statistics.fmean(x for r in rows for x in r["ref_spare_at_voluntary"])
        if any(r["ref_spare_at_voluntary"] for r in rows) else float("nan"),
        "max_recomputed_length_error": max(r["recomputed_length_error"] for r in rows),
    }
    s = summary
    print(f"{args.run_dir / args.checkpoint}: {n} dev instances, greedy")
    print("| gap | after 2-opt of each route | routes (reference / lower bound) | fill (reference) | "
          "more routes than the reference | gap: more routes / same | voluntary returns (capacity left) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {s['gap_pct']:.2f}% | {s['gap_after_2opt_pct']:.2f}% | {s['routes']:.2f} ({s['ref_routes']:.2f} / "
          f"{s['min_routes']:.2f}) | {s['fill']:.3f} ({s['ref_fill']:.3f}) | {100 * s['share_more_routes_than_ref']:.0f}% | "
          f"{s['gap_pct_more_routes']:.2f}% / {s['gap_pct_same_routes']:.2f}% | "
          f"{100 * s['voluntary_share_of_returns']:.0f}% ({s['spare_capacity_at_voluntary']:.2f}); reference "
          f"{100 * s['ref_voluntary_share_of_returns']:.0f}% ({s['ref_spare_capacity_at_voluntary']:.2f}) |")
    result = {"run_dir": str(args.run_dir), "checkpoint": args.checkpoint, "summary": summary, "per_instance": rows,
              **stamp}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
