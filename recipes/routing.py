"""Routing (TSP / CVRP): one entry point, the algorithm picked on the command line.

    python -m recipes.routing --algo ppo --env tsp20               # PPO + pointer network
    python -m recipes.routing --algo dreamer --env tsp20           # DreamerV3 + pointer actor
    python -m recipes.routing --algo dreamer --env cvrp20 ac.known_reward=true

Both read the same env YAMLs (``configs/routing/<env>.yaml``), log the same ``eval/gap_pct`` on
the same dev sets and accept ``--resume``/``--evaluate``; the remaining arguments go to the
algorithm's recipe (``baselines/ppo_routing.py`` or ``recipes/dreamer_routing.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from torchrl_dreamer.config import ConfigError

ALGOS = ("ppo", "dreamer")


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", choices=ALGOS, default="ppo")
    args, rest = parser.parse_known_args(argv)
    if args.algo == "ppo":
        from baselines.ppo_routing import main as algo_main
    else:
        from recipes.dreamer_routing import main as algo_main
    return algo_main(rest)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
