"""Routing pieces both routing recipes (PPO and Dreamer) share: the problem config, the evaluation
record (one key set for both algorithms, printed and written as ``eval.json``) and the tours picture.

Loading and checking dev sets is :func:`envs.routing.load_dev_set` (the envs package owns the
bundled sets); this module only formats and draws, so the library needs nothing from ``envs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Choice, doc
from .plots import plot_tours

__all__ = ["Problem", "RoutingEnvConfig", "ROUTING_EVAL_KEYS", "routing_eval_record", "decoding_name", "dev_tours_title",
           "plot_decoded_tours"]


class Problem(Choice):
    """The routing problem: travelling salesman or capacitated vehicle routing."""
    tsp = "tsp"
    cvrp = "cvrp"


@dataclass
class RoutingEnvConfig:
    problem: Problem = doc(Problem.tsp, "Travelling salesman (tsp) or capacitated vehicle routing (cvrp).")
    size: int = doc(20, "Nodes (TSP) or customers (CVRP) per instance.")
    capacity: int = doc(0, "CVRP vehicle capacity (0 = Kool et al.: 20->30, 50->40, 100->50).")
    dev_set: str = doc("", "Dev set for eval/gap_pct: a bundled name (tsp20, tsp50, cvrp20, cvrp50; shipped in "
                           "envs/data) or the path of a .npz in that format (absolute or relative to the current "
                           "directory); '' = no dev eval. The env YAMLs set the bundled one.")


def dev_tours_title(algo: str, decoding: str, data: dict, k: int, dev_set_file: str = "") -> str:
    """Title of a tours picture: the algorithm, the decoding, the set (``dev_set_file``: the file the
    dev-set spec names; its name is shown) and the instances shown."""
    n, size = data["locs"].shape[:2]  # CVRP: locs are the customers (the depot is separate)
    problem = "cvrp" if "demand" in data else "tsp"
    name = f" ({Path(dev_set_file).name})" if dev_set_file else ""
    shown = "instance 0" if k == 1 else f"instances 0-{k - 1}"
    return f"{algo} {decoding} decoding, {problem}{size} dev set{name}, {shown} of {n}, vs reference"


def decoding_name(multistart: bool = False, augment: int = 1) -> str:
    """``"greedy"``, ``"greedy+multistart"``, ``"greedy+augment=8"``, ``"greedy+multistart+augment=8"``."""
    return "+".join(["greedy"] + (["multistart"] if multistart else []) + ([f"augment={augment}"] if augment > 1 else []))


# The keys of a routing ``--evaluate`` record, the same for PPO and Dreamer (printed and in eval.json).
ROUTING_EVAL_KEYS = ("run_dir", "checkpoint", "algo", "problem", "size", "dev_set", "dev_set_file", "instances",
                     "decoding", "seed", "iteration", "gap_pct", "tour_length", "decode_s")


def routing_eval_record(cfg, *, algo: str, run_dir: Path, checkpoint: Path, dev_set_file: str, decoding: str,
                        iteration: int, instances: int, gap_pct: float, tour_length: float, decode_s: float) -> dict:
    """One routing evaluation as a flat dict with :data:`ROUTING_EVAL_KEYS` (``cfg``: either
    algorithm's config; ``dev_set`` is the spec as configured, ``dev_set_file`` the file it names)."""
    record = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "algo": algo, "problem": str(cfg.env.problem),
              "size": cfg.env.size, "dev_set": cfg.env.dev_set, "dev_set_file": str(dev_set_file),
              "instances": int(instances), "decoding": decoding, "seed": cfg.seed, "iteration": int(iteration),
              "gap_pct": float(gap_pct), "tour_length": float(tour_length), "decode_s": float(decode_s)}
    return record


def plot_decoded_tours(data: dict, problem: str, actions: list[list[int]], lengths: list[float], path: Path,
                       title: str) -> Path:
    """Decoded node sequences of the first ``len(actions)`` dev instances beside the references (PNG)."""
    k = len(actions)
    inst = {key: v[:k] for key, v in data.items() if key in ("locs", "depot", "demand", "capacity")}
    if problem == "tsp":
        locs, tours, ref_tours = inst["locs"], actions, data["ref_tour"][:k].tolist()
    else:
        locs = torch.cat([inst["depot"].unsqueeze(1), inst["locs"]], dim=1)
        tours = [a[: a.index(0, max(i for i, x in enumerate(a) if x != 0)) + 1] if 0 in a else a for a in actions]
        ref_tours = data["ref_actions"][:k].tolist()
    return plot_tours(path, locs, tours, lengths, problem=problem, ref_tours=ref_tours,
                      ref_costs=data["ref_cost"][:k].tolist(), title=title)
