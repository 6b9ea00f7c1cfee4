"""Command line shared by recipes: ``--env NAME`` picks an override YAML, ``key=value`` overrides,
``--config FILE`` adds YAMLs, ``--resume RUN_DIR`` continues a run, ``--help`` lists every field."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from .config import ConfigError, help_text, load_config

__all__ = ["RecipeArgs", "parse_recipe_args"]


@dataclass
class RecipeArgs:
    cfg: DictConfig
    env_name: str
    resume: Path | None
    yaml_files: list[Path]
    evaluate: Path | None = None


def parse_recipe_args(
    argv: Sequence[str] | None,
    *,
    schema: type,
    config_dir: Path,
    description: str,
    default_env: str,
    env_config_dir: Path | None = None,
    factory_env: str | None = None,
) -> RecipeArgs:
    """Parses the recipe command line and builds the layered config.

    Order of layers: schema defaults <- ``config_dir/base.yaml`` (when present; the shipped ones set
    no key: every default lives in the schema dataclasses, see ``--help``) <- ``config_dir/<env>.yaml``
    <- each ``--config`` file <- ``key=value`` overrides. With ``env_config_dir`` (env YAMLs shared by
    several algorithms, e.g. routing), the env layer is ``env_config_dir/<env>.yaml`` followed by
    ``config_dir/<env>.yaml`` when that algorithm-specific override exists. With ``--resume RUN_DIR`` the run's saved
    ``config.yaml`` replaces the YAML layers (overrides still apply, e.g. more iterations);
    ``--evaluate RUN_DIR`` does the same for evaluating that run's checkpoint (``--evaluate FILE``: a
    checkpoint file inside a run directory, e.g. ``<run>/best.pt``; the config comes from its directory).
    """
    env_dir = env_config_dir or config_dir
    env_yamls = sorted(p.stem for p in env_dir.glob("*.yaml") if p.stem != "base")
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set with key=value, dotted for nested fields):\n" + help_text(schema),
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. ppo.lr=1e-3 collector.iterations=20")
    parser.add_argument(
        "--env",
        default=None,
        help=f"env YAML in {env_dir.name}/ (one of: {', '.join(env_yamls)}); default {default_env}"
             + (f", or {factory_env} when env.factory=... is given" if factory_env else ""),
    )
    parser.add_argument("--config", action="append", default=[], help="extra YAML merged after the env YAML")
    parser.add_argument("--resume", type=Path, default=None, help="run directory to resume from")
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="run directory whose checkpoint to evaluate, or a checkpoint file in one "
                             "(e.g. <run>/best.pt); deterministic actions, no training")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between options
    if args.env is None:  # your own env (env.factory=...) starts from the neutral YAML, not a tuned one
        own_env = factory_env and any(o.split("=", 1)[0].strip() == "env.factory" for o in args.overrides)
        args.env = factory_env if own_env else default_env
    if args.resume is not None and args.evaluate is not None:
        raise ConfigError("--resume and --evaluate exclude each other")

    from_run = args.resume if args.resume is not None else args.evaluate
    if args.evaluate is not None and not args.evaluate.exists():
        raise ConfigError(f"cannot evaluate: {args.evaluate} does not exist")
    if args.evaluate is not None and args.evaluate.is_file():  # a checkpoint file: its run's config
        from_run = args.evaluate.parent
    if from_run is not None:
        saved = from_run / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot {'resume' if args.resume else 'evaluate'}: {saved} does not exist")
        yaml_files = [saved, *map(Path, args.config)]
    else:
        env_yaml = env_dir / f"{args.env}.yaml"
        if not env_yaml.is_file():
            raise ConfigError(f"no config for env '{args.env}' ({env_yaml} missing). Available: {', '.join(env_yamls)}")
        algo_env = [config_dir / f"{args.env}.yaml"] if env_config_dir is not None else []
        algo_env = [p for p in algo_env if p.is_file()]
        base = [p for p in [config_dir / "base.yaml"] if p.is_file()]
        yaml_files = [*base, env_yaml, *algo_env, *map(Path, args.config)]
    cfg = load_config(schema, yaml_files, args.overrides)
    return RecipeArgs(cfg=cfg, env_name=args.env, resume=args.resume, yaml_files=yaml_files, evaluate=args.evaluate)
