"""torchrl_dreamer: DreamerV3 and PPO baselines as TorchRL modules, losses and recipes.

This top-level package holds what every recipe shares; DreamerV3 itself (world model,
imagination, losses, agent, replay, update) is the subpackage :mod:`torchrl_dreamer.dreamer`.
The PPO algorithms live in the sibling package ``baselines`` and the shipped envs (TSP, CVRP, a
custom multi-agent example) in ``envs``; this library imports neither.

Configuration and command line
    ConfigError              an invalid config file or override (names the key and where it came from)
    doc                      a dataclass field with a default and a ``--help`` line
    load_config              dataclass schema <- YAML files <- ``key=value`` overrides (OmegaConf)
    to_object                the loaded config as instances of the schema dataclasses
    save_config              writes the resolved config as YAML (atomically)
    check_ranges             checks numeric fields against ranges such as ``"> 0"`` or ``"[0, 1)"``
    help_text                one line per config field: key, type, default, description
    RecipeArgs               the parsed recipe command line (config, env name, resume, evaluate)
    parse_recipe_args        ``--env``, ``--config``, ``--resume``, ``--evaluate``, ``key=value``
Running a recipe
    run_cli                  a recipe's ``main`` as a command: one-line errors and exit codes
    open_run_dir             the run directory, created or resumed, locked, with ``config.yaml``
    RunLockedError           another live process is writing that run directory
    check_device             a device string checked against this machine
    TrainingRun              the shared training skeleton: logger, clock, checkpoints, pictures
    RunConfig                the ``run`` config section every recipe shares (root, cadence, budget)
    EvalConfig               the ``eval`` config section every recipe extends
    Recipe                   what a recipe's command line needs to know about it
    run_recipe               a recipe's ``main``: validate, build, then train, resume or evaluate
    entry_points             a recipe module's ``main`` and ``cli`` from its :class:`Recipe`
    tune_malloc              glibc allocator settings that make repeated large tensors cheap
    compile_unavailable      why ``torch.compile`` cannot run here (``None`` when it can)
Checkpoints and guards
    CheckpointError          a checkpoint that cannot be read
    save_checkpoint          atomic ``torch.save`` (optionally keeping the previous file)
    load_checkpoint          a checkpoint file, or the latest one of a run directory
    load_resume_state        the state to resume from, falling back to the previous checkpoint
    rng_state                Python, NumPy and torch generator states
    set_rng_state            restores :func:`rng_state`'s states
    load_weights             ``load_state_dict`` with an error that says what to do on a size mismatch
    NonFiniteError           a NaN or inf where a finite value is required
    MissingKeyError          a key an env or model should have written is absent
    check_finite             raises :class:`NonFiniteError` naming the key, iteration and run dir
    check_tensordict_finite  :func:`check_finite` on several keys of a TensorDict
    check_parameters_finite  the same on parameters after an optimizer step
    check_metrics_finite     the same on evaluation results
Logging, evaluation and plots
    RunLogger                one logger for TensorBoard, ``metrics.jsonl`` and a tqdm bar
    make_run_dir             ``<root>/<recipe>/<env>/<timestamp>/``
    report_evaluation        prints an evaluation record as JSON and writes it beside the run
    run_episodes             one episode per env of a batched env (mode or sampled actions), for any policy
    read_metrics             the records of a run's ``metrics.jsonl``
    plot_learning_curves     ``curves.png`` from ``metrics.jsonl``
    plot_tours               pictures of routing tours (ours beside the reference)
Envs and transforms
    make_env                 a recipe's env: a VMAS scenario or a ``package.module:function`` factory
    make_vmas_env            a batched VMAS env with continuous actions
    with_shared_transforms   adds :class:`DoneToAgents` and :class:`EpisodeRewardSum` to an env
    EnvFactoryError          an env factory that cannot be imported, called, or returns no TorchRL env
    DoneToAgents             copies env-level done flags into every agent group
    EpisodeRewardSum         episode reward sums over every reward key of an env
    reward_keys              every reward key of an env
    CategoricalToOneHot      a ``Categorical`` action spec as ``OneHot`` (the env still gets indices)
The env contract (``python -m torchrl_dreamer.check_env package.module:function``)
    EnvProblem               one broken part of an env's contract, with its fix
    env_problems             every way an env breaks an algorithm's contract (dreamer, ppo, mappo)
    check_factory            :func:`env_problems` of a factory, built as the recipes build it
Past one process (docs/scaling.md)
    CollectorConfig          the ``collector`` config section (direct, process or Ray collectors)
    make_collector           TorchRL's collector for a ``CollectorConfig``
    WorkerFailedError        a collector worker process died
    DataParallel             this process's rank in a ``torchrun`` data-parallel group
    data_parallel            joins the group ``torchrun`` started (a single process otherwise)
Routing policy networks
    RoutingEncoder           attention encoder of TSP / CVRP instances (once per episode)
    PointerDecoder           pointer-network decoder over the encoded nodes
    PointerActorCritic       encoder + pointer decoder + value head (the PPO routing policy)
    AllMaskedError           a row whose every action is masked

The names are imported on first use (module ``__getattr__``), so ``import torchrl_dreamer`` costs
nothing beyond itself; ``torchrl_dreamer.dreamer`` is also reachable as an attribute.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from . import dreamer
    from .check_env import EnvProblem, check_factory, env_problems
    from .checkpoint import (CheckpointError, load_checkpoint, load_resume_state, load_weights, rng_state,
                             save_checkpoint, set_rng_state)
    from .cli import RecipeArgs, parse_recipe_args
    from .collectors import CollectorConfig, WorkerFailedError, make_collector
    from .distributed import DataParallel, data_parallel
    from .config import ConfigError, check_ranges, doc, help_text, load_config, save_config, to_object
    from .cpu import compile_unavailable, tune_malloc
    from .envs import EnvFactoryError, make_env, make_vmas_env, with_shared_transforms
    from .evaluation import report_evaluation, run_episodes
    from .guards import (MissingKeyError, NonFiniteError, check_finite, check_metrics_finite,
                         check_parameters_finite, check_tensordict_finite)
    from .logging import RunLogger, make_run_dir
    from .plots import plot_learning_curves, plot_tours, read_metrics
    from .pointer import AllMaskedError, PointerActorCritic, PointerDecoder, RoutingEncoder
    from .runtime import RunLockedError, check_device, open_run_dir, run_cli
    from .trainer import EvalConfig, Recipe, RunConfig, TrainingRun, entry_points, run_recipe
    from .transforms import CategoricalToOneHot, DoneToAgents, EpisodeRewardSum, reward_keys

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ConfigError", "doc", "load_config", "to_object", "save_config", "check_ranges", "help_text"),
                    ".config"),
    **dict.fromkeys(("RecipeArgs", "parse_recipe_args"), ".cli"),
    **dict.fromkeys(("run_cli", "open_run_dir", "RunLockedError", "check_device"), ".runtime"),
    **dict.fromkeys(("TrainingRun", "RunConfig", "EvalConfig", "Recipe", "run_recipe", "entry_points"), ".trainer"),
    **dict.fromkeys(("tune_malloc", "compile_unavailable"), ".cpu"),
    **dict.fromkeys(("CheckpointError", "save_checkpoint", "load_checkpoint", "load_resume_state", "rng_state",
                     "set_rng_state", "load_weights"), ".checkpoint"),
    **dict.fromkeys(("NonFiniteError", "MissingKeyError", "check_finite", "check_tensordict_finite",
                     "check_parameters_finite", "check_metrics_finite"), ".guards"),
    **dict.fromkeys(("RunLogger", "make_run_dir"), ".logging"),
    **dict.fromkeys(("report_evaluation", "run_episodes"), ".evaluation"),
    **dict.fromkeys(("read_metrics", "plot_learning_curves", "plot_tours"), ".plots"),
    **dict.fromkeys(("make_env", "make_vmas_env", "with_shared_transforms", "EnvFactoryError"), ".envs"),
    **dict.fromkeys(("DoneToAgents", "EpisodeRewardSum", "reward_keys", "CategoricalToOneHot"), ".transforms"),
    **dict.fromkeys(("EnvProblem", "env_problems", "check_factory"), ".check_env"),
    **dict.fromkeys(("CollectorConfig", "make_collector", "WorkerFailedError"), ".collectors"),
    **dict.fromkeys(("DataParallel", "data_parallel"), ".distributed"),
    **dict.fromkeys(("RoutingEncoder", "PointerDecoder", "PointerActorCritic", "AllMaskedError"), ".pointer"),
}
_SUBPACKAGES = ("dreamer",)

__all__ = [
    # configuration and command line
    "ConfigError", "doc", "load_config", "to_object", "save_config", "check_ranges", "help_text",
    "RecipeArgs", "parse_recipe_args",
    # running a recipe
    "run_cli", "open_run_dir", "RunLockedError", "check_device", "TrainingRun", "RunConfig", "EvalConfig", "Recipe", "run_recipe", "entry_points",
    "tune_malloc", "compile_unavailable",
    # checkpoints and guards
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_resume_state", "rng_state", "set_rng_state",
    "load_weights",
    "NonFiniteError", "MissingKeyError", "check_finite", "check_tensordict_finite", "check_parameters_finite",
    "check_metrics_finite",
    # logging, evaluation and plots
    "RunLogger", "make_run_dir", "report_evaluation", "run_episodes", "read_metrics", "plot_learning_curves",
    "plot_tours",
    # envs and transforms
    "make_env", "make_vmas_env", "with_shared_transforms", "EnvFactoryError", "DoneToAgents", "EpisodeRewardSum",
    "reward_keys", "CategoricalToOneHot",
    # the env contract
    "EnvProblem", "env_problems", "check_factory",
    # past one process
    "CollectorConfig", "make_collector", "WorkerFailedError", "DataParallel", "data_parallel",
    # routing policy networks
    "RoutingEncoder", "PointerDecoder", "PointerActorCritic", "AllMaskedError",
]


def __getattr__(name: str) -> Any:
    """Imports a public name (or the ``dreamer`` subpackage) the first time it is asked for."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
