"""Routing (TSP / CVRP): one entry point, the algorithm picked on the command line.

    python -m recipes.routing --algo ppo --env tsp20               # PPO + pointer network
    python -m recipes.routing --algo dreamer --env tsp20           # DreamerV3 + pointer actor
    python -m recipes.routing --algo dreamer --env cvrp20 ac.known_reward=true

Both read the same env YAMLs (``configs/routing/<env>.yaml``), log the same ``eval/gap_pct`` on
the same dev sets and accept ``--resume``/``--evaluate`` (which need no ``--algo``: the run
directory's ``config.yaml`` tells); the remaining arguments go to the algorithm's recipe
(``recipes/ppo_routing.py`` or ``recipes/dreamer_routing.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.runtime import run_cli

ALGOS = ("ppo", "dreamer")


def _algo_of_run(path: str) -> str | None:
    """The algorithm that wrote the run directory ``path`` (or the one holding the checkpoint file
    ``path``), from the top-level keys of its ``config.yaml``; None when there is none to read."""
    from omegaconf import OmegaConf

    run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        saved = OmegaConf.load(config)
    except Exception as exc:  # a damaged config.yaml: say which file
        raise ConfigError(f"cannot read {config}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return "ppo" if "ppo" in saved else "dreamer"


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", choices=ALGOS, default=None)
    args, rest = parser.parse_known_args(argv)
    # --resume / --evaluate: the run directory knows its algorithm (they stay in ``rest`` for the recipe)
    run_parser = argparse.ArgumentParser(add_help=False)
    run_parser.add_argument("--resume")
    run_parser.add_argument("--evaluate")
    run_args, _ = run_parser.parse_known_args(rest)
    path = run_args.resume or run_args.evaluate
    written_by = _algo_of_run(path) if path else None
    if args.algo and written_by and args.algo != written_by:
        raise ConfigError(f"{path} is a {written_by} run: use --algo {written_by} (or leave --algo out)")
    args.algo = args.algo or written_by or "ppo"
    if args.algo == "ppo":
        from recipes.ppo_routing import main as algo_main
    else:
        from recipes.dreamer_routing import main as algo_main
    return algo_main(rest)


def cli() -> None:
    """Console-script entry point: ``main`` with one-line errors and exit codes (see torchrl_dreamer.runtime)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
