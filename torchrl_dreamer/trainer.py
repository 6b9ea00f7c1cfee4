"""The training skeleton every recipe shares, so a recipe's training function holds only its algorithm.

:class:`TrainingRun` owns what is the same in every recipe once the pieces are built:

* the logger (TensorBoard + ``metrics.jsonl`` + tqdm; on resume TensorBoard hides the steps an
  interrupted process logged after its checkpoint);
* the training clock, which continues across ``--resume``, and ``run.time_budget_s``;
* checkpoints (atomic, the previous one kept) that carry the clock;
* the non-finite guard on evaluation results and the best-score bookkeeping of ``best.pt``;
* the end of a run: the stop message and the pictures (``curves.png`` and any recipe pictures),
  drawn also after a failure (they show what led to it), never hiding the outcome.

A recipe writes its loop as::

    with TrainingRun(run_dir, run_cfg=cfg.run, total=..., initial=start, unit="iter", resume_state=state,
                     resume_step=step, postfix={...}, curves=PANELS, x_label="...") as run:
        for iteration in range(start + 1, total + 1):
            ...collect, update...
            out_of_time = run.out_of_time()  # read once: the last iteration still evaluates and checkpoints
            last = iteration == total or out_of_time
            if run.due(iteration, cfg.eval.every, last): metrics.update(run.evaluated(evaluate(...)))
            run.log(metrics, step=frames)  # log, then checkpoint: a checkpoint is never ahead of the log
            if run.due(iteration, cfg.run.checkpoint_every, last): run.save({...})
            if out_of_time: run.budget_reached(iteration); break

The order "log, then checkpoint" matters: after a crash, ``--resume`` drops the log rows after the
checkpoint's step, so every step is in ``metrics.jsonl`` exactly once.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .checkpoint import CHECKPOINT_NAME, run_clock_start, save_checkpoint
from .config import Choice, doc
from .distributed import DataParallel, data_parallel, shutdown
from .evaluation import draw_picture
from .guards import check_metrics_finite
from .logging import RunLogger
from .plots import DEFAULT_PANELS, plot_learning_curves

__all__ = ["RunConfig", "EvalConfig", "TrainingRun", "Recipe", "run_recipe", "entry_points", "LrSchedule",
           "lr_multiplier", "run_progress"]


@dataclass
class RunConfig:
    """The ``run`` section every recipe shares: where runs go, checkpoint cadence, time budget, outputs.
    A recipe sets its own default cadence (``doc(RunConfig(checkpoint_every=20), ...)``) or extends it."""

    root: str = doc("runs", "Runs go to <root>/<recipe>/<env>/<timestamp>/.")
    checkpoint_every: int = doc(1, "Write the checkpoint every N iterations (and at the end).")
    time_budget_s: float = doc(0.0, "Stop after the iteration that passes this many seconds of training "
                                    "(0 = no limit; counts across --resume).")
    tensorboard: bool = doc(True, "Write TensorBoard events.")
    progress: bool = doc(True, "Show the tqdm progress bar.")


class LrSchedule(Choice):
    """Learning-rate schedules of the recipes that offer one (:func:`lr_multiplier`)."""

    constant = "constant"
    cosine = "cosine"


def run_progress(done_iterations: int, total_iterations: int, elapsed_s: float, time_budget_s: float) -> float:
    """How far a run is, 0..1: iterations done / total or, with a time budget, seconds used / budget,
    whichever is further along (a time-budgeted run reaches 1 at its budget)."""
    progress = done_iterations / max(total_iterations, 1)
    if time_budget_s > 0:
        progress = max(progress, elapsed_s / time_budget_s)
    return min(max(progress, 0.0), 1.0)


def lr_multiplier(schedule: str, progress: float, *, decay_start: float = 0.0, final_fraction: float = 0.1) -> float:
    """Learning-rate multiplier at ``progress`` (0..1, :func:`run_progress`): 1 for ``constant``; for
    ``cosine``, 1 until ``decay_start``, then a half cosine down to ``final_fraction`` at the end."""
    if schedule == LrSchedule.constant:
        return 1.0
    if schedule != LrSchedule.cosine:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or cosine)")
    if not 0.0 <= decay_start < 1.0:
        raise ValueError(f"decay_start must be in [0, 1), got {decay_start}")
    x = min(max(progress - decay_start, 0.0) / (1.0 - decay_start), 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * x))


@dataclass
class EvalConfig:
    """The ``eval`` section every recipe shares (recipes add their own evaluation options)."""

    every: int = doc(10, "Evaluate every N iterations (0 = only at the end).")


class TrainingRun:
    """One training process of a recipe (see the module docstring).

    Args:
        run_dir: the run directory (created and locked by :func:`.runtime.open_run_dir`).
        run_cfg: the config's ``run`` section: ``checkpoint_every``, ``time_budget_s``,
            ``tensorboard``, ``progress`` are read.
        total, initial, unit: the progress bar (e.g. iterations or env steps).
        resume_state: the checkpoint a resumed run starts from (its ``elapsed_s`` continues the
            clock), or ``None``.
        resume_step: the logger step of that checkpoint (TensorBoard hides later steps).
        postfix: metric name -> label shown in the progress bar.
        curves: ``curves.png`` panels ``(title, metric names)``.
        x_label: what the logged step counts (the curves' x-axis).
        pictures: ``(name, draw)`` pairs drawn at the end after the curves (``draw()`` writes the
            file); a failure is a one-line warning.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        run_cfg: Any,
        total: int,
        initial: int = 0,
        unit: str = "it",
        resume_state: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        postfix: Mapping[str, str] | Sequence[str] = (),
        curves: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
        x_label: str = "env frames",
        pictures: Sequence[tuple[str, Callable[[], Any]]] = (),
        dp: DataParallel | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = run_cfg
        self.dp = dp if dp is not None else data_parallel()
        self.curves, self.x_label, self.pictures = curves, x_label, list(pictures)
        if self.dp.is_main:
            self.logger = RunLogger(self.run_dir, total=total, initial=initial, unit=unit, postfix_keys=postfix,
                                    tensorboard=run_cfg.tensorboard, progress=run_cfg.progress,
                                    purge_step=resume_step + 1 if resume_state is not None and resume_step is not None
                                    else None)
        else:  # other data-parallel ranks train only: rank 0 logs, evaluates and writes checkpoints
            self.logger = _SilentLogger()
        self._start = run_clock_start(resume_state, run_cfg.time_budget_s)
        self._excluded = 0.0  # seconds spent outside training (benchmark callbacks)
        self.best = -math.inf

    # --- clock ------------------------------------------------------------------------------------

    @property
    def rd(self) -> str:
        """The run directory as a string (what the guards name in their messages)."""
        return str(self.run_dir)

    def elapsed(self) -> float:
        """Training seconds so far, across resumes, without the time spent in :meth:`not_counted`."""
        return time.perf_counter() - self._start - self._excluded

    def out_of_time(self) -> bool:
        """Whether the time budget is spent (under ``torchrun``: rank 0's clock decides for every rank,
        so all of them stop after the same iteration)."""
        return self.dp.agree(0 < self.cfg.time_budget_s <= self.elapsed())

    @property
    def is_main(self) -> bool:
        """Whether this process evaluates, logs and writes checkpoints (always, except the ranks > 0 of
        a data-parallel run)."""
        return self.dp.is_main

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Time spent in the block does not count as training (e.g. a benchmark's callback)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    # --- cadence, logging, checkpoints ---------------------------------------------------------------

    @staticmethod
    def due(index: int, every: int, last: bool = False) -> bool:
        """True every ``every`` iterations (``every=0``: never) and on the last one."""
        return bool(last or (every and index % every == 0))

    def evaluated(self, metrics: dict[str, float], keys: Iterable[str] | None = None,
                  iteration: int | None = None) -> dict[str, float]:
        """Evaluation results after the non-finite guard (a NaN score stops the run, and never
        becomes a new best)."""
        check_metrics_finite(metrics, [k for k in metrics if k.startswith("eval/")] if keys is None else keys,
                             iteration=iteration, run_dir=self.rd)
        return metrics

    def improved(self, score: float) -> bool:
        """Whether ``score`` beats every score seen so far (and remember it)."""
        if math.isfinite(score) and score > self.best:
            self.best = score
            return True
        return False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.logger.log(metrics, step=step)

    def save(self, state: dict[str, Any], name: str = CHECKPOINT_NAME) -> None:
        """Writes the checkpoint (with the training clock), keeping the previous one (rank 0 only)."""
        if not self.dp.is_main:
            return
        save_checkpoint(self.run_dir / name, {**state, "elapsed_s": self.elapsed()},
                        keep_previous=name == CHECKPOINT_NAME)

    def budget_reached(self, iteration: int, what: str = "iteration") -> None:
        """Says that the time budget ended the run (call it where the loop breaks on :meth:`out_of_time`,
        read once per iteration so the last iteration still evaluates and checkpoints)."""
        self.logger.write(f"time budget of {self.cfg.time_budget_s:.0f} s reached after {what} {iteration}")

    # --- the end of a run ------------------------------------------------------------------------------

    def draw(self) -> None:
        """``curves.png`` and the recipe's pictures; a failure is a one-line note, never a traceback
        that would hide the run's outcome."""
        draw_picture("curves.png", plot_learning_curves, self.run_dir, panels=self.curves, x_label=self.x_label)
        for name, draw in self.pictures:
            draw_picture(name, draw)

    def close(self) -> None:
        """Closes the logger and draws the pictures (also after a failure: the curves show what led to it)."""
        self.logger.close()
        if self.dp.is_main:
            self.draw()

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SilentLogger:
    """The logger of a data-parallel rank > 0: it writes nothing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    write = advance = close = log


@dataclass(frozen=True)
class Recipe:
    """What a recipe's command line needs to know about it (see :func:`run_recipe`).

    Args:
        name: run directories go to ``<run.root>/<name>/<run_name(cfg)>/<timestamp>/``.
        schema: the root config dataclass.
        config_dir: the recipe's YAMLs (``base.yaml`` and one per env).
        default_env: the ``--env`` YAML used when none is given.
        description: ``--help`` text (the recipe module's docstring).
        validate: ``validate(cfg)`` raises :class:`~torchrl_dreamer.config.ConfigError` on bad values.
        preflight: ``preflight(cfg, resume_state)`` builds what can fail (env, networks, the
            checkpoint's weights) before anything is written.
        train: ``train(cfg, run_dir, resume_state)``.
        evaluate: ``evaluate(cfg, path)`` for ``--evaluate``.
        run_name: ``run_name(cfg)``, the env part of the run directory.
        progress: ``(checkpoint key, config key, unit)`` of the run's length, e.g. ``("env_steps",
            "train.env_steps", "env steps")``: a resume that already reached it has nothing to do.
        log_step: the checkpoint key of the logger's step (``metrics.jsonl`` rows after it are
            dropped on resume).
        required: keys a checkpoint of this recipe must hold.
        env_config_dir: env YAMLs shared by several recipes (routing), if any.
        factory_env: the ``--env`` YAML used instead of ``default_env`` when the command line sets
            ``env.factory=...`` without ``--env`` (a neutral one for the user's own env, e.g. ``custom``).
        algo, algos: this recipe's algorithm name and the others reachable with ``--algo NAME``
            (``{name: "module:main"}``); ``--resume``/``--evaluate`` need no ``--algo`` (the run's
            ``config.yaml`` says which algorithm wrote it).
        data_parallel: whether ``train`` supports data-parallel learners under ``torchrun``
            (:mod:`torchrl_dreamer.distributed`); other recipes refuse to start under it.
    """

    name: str
    schema: type
    config_dir: Path
    default_env: str
    description: str
    validate: Callable[[Any], None]
    preflight: Callable[[Any, Optional[dict]], None]
    train: Callable[[Any, Path, Optional[dict]], Any]
    evaluate: Callable[[Any, Path], Any]
    run_name: Callable[[Any], str]
    progress: tuple[str, str, str]
    log_step: str
    required: tuple[str, ...] = ()
    env_config_dir: Optional[Path] = None
    factory_env: Optional[str] = None
    algo: str = ""
    algos: Mapping[str, str] = field(default_factory=dict)
    data_parallel: bool = False


def run_recipe(recipe: Recipe, argv: Sequence[str] | None = None) -> Path:
    """A recipe's ``main``: parse and validate the config, then ``--evaluate``, or train a new run or
    ``--resume`` one. Nothing is created or changed before the config, the device, the env and the
    networks (with a resumed checkpoint's weights) have been built without error; the run directory
    is locked while training. Returns the run directory (or the evaluated path)."""
    from .cli import parse_recipe_args
    from .config import to_object

    args = parse_recipe_args(argv, schema=recipe.schema, config_dir=recipe.config_dir, description=recipe.description,
                             default_env=recipe.default_env, env_config_dir=recipe.env_config_dir,
                             factory_env=recipe.factory_env)
    cfg = to_object(args.cfg)
    dp = data_parallel(str(getattr(cfg, "device", "cpu")))
    try:
        return _run_recipe(recipe, args, cfg, dp)
    finally:
        if dp.enabled:
            shutdown()


def _run_recipe(recipe: Recipe, args, cfg, dp: DataParallel) -> Path:
    from .config import ConfigError
    from .checkpoint import load_resume_state
    from .runtime import open_run_dir

    if dp.enabled and not recipe.data_parallel:
        raise ConfigError(f"the {recipe.name} recipe does not train data-parallel: start it with python, not "
                          "torchrun (routing PPO and MAPPO do; see docs/scaling.md)")
    if dp.enabled and args.evaluate is not None:
        raise ConfigError("--evaluate runs in one process: start it with python, not torchrun")
    recipe.validate(cfg)
    if args.evaluate is not None:
        recipe.evaluate(cfg, args.evaluate)
        return args.evaluate
    resume_state = None
    if args.resume is not None:
        resume_state, _ = load_resume_state(args.resume, map_location="cpu", required=recipe.required)
        done_key, target_key, unit = recipe.progress
        target = cfg
        for part in target_key.split("."):
            target = getattr(target, part)
        if resume_state[done_key] >= target:
            raise ConfigError(f"nothing to do: the run already has {resume_state[done_key]} {unit}; "
                              f"raise {target_key}")
        run_clock_start(resume_state, cfg.run.time_budget_s)  # a spent time budget: nothing to do
    recipe.preflight(cfg, resume_state)  # nothing is written before this passes
    if not dp.is_main:  # rank 0 opens (and locks) the run directory; the other ranks train into it
        run_dir = Path(dp.broadcast_object(None))
        recipe.train(cfg, run_dir, resume_state)
        return run_dir
    run_dir, lock = open_run_dir(args.cfg, root=cfg.run.root, recipe=recipe.name, name=recipe.run_name(cfg),
                                 resume=args.resume,
                                 last_step=resume_state[recipe.log_step] if resume_state is not None else None)
    dp.broadcast_object(str(run_dir))
    print(f"run directory: {run_dir}" + (f" ({dp.world_size} data-parallel ranks)" if dp.enabled else ""),
          flush=True)
    try:
        recipe.train(cfg, run_dir, resume_state)
    finally:
        lock.release()
    return run_dir


def pick_algo(recipe: Recipe, argv: Sequence[str] | None) -> tuple[str, list[str]]:
    """``(algorithm, argv without --algo)``: ``--algo`` when given, else the algorithm that wrote the
    ``--resume``/``--evaluate`` run (its ``config.yaml``: a top-level ``ppo`` section means PPO),
    else this recipe's own."""
    import argparse

    from .config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", choices=(recipe.algo, *recipe.algos), default=None)
    parser.add_argument("--resume")
    parser.add_argument("--evaluate")
    known, _ = parser.parse_known_args(argv)
    rest = [a for i, a in enumerate(argv) if a != "--algo" and not a.startswith("--algo=")
            and not (i > 0 and argv[i - 1] == "--algo")]
    path = known.resume or known.evaluate
    written_by = None
    if path:
        run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
        config = run_dir / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            try:
                written_by = "ppo" if "ppo" in OmegaConf.load(config) else None
            except Exception:  # noqa: BLE001 - the recipe reports a damaged config.yaml itself
                written_by = None
            if written_by is None:
                written_by = next((a for a in (recipe.algo, *recipe.algos) if a != "ppo"), None)
    if known.algo and written_by and known.algo != written_by:
        raise ConfigError(f"{path} is a {written_by} run: use --algo {written_by} (or leave --algo out)")
    return known.algo or written_by or recipe.algo, rest


def entry_points(recipe: Recipe) -> tuple[Callable[[Sequence[str] | None], Path], Callable[[], None]]:
    """A recipe module's ``main(argv)`` (returns the run directory; exceptions propagate, for tests and
    scripts) and ``cli()`` (the console script and ``python -m``: one-line errors and exit codes,
    :func:`torchrl_dreamer.runtime.run_cli`)."""
    from .runtime import run_cli

    def main(argv: Sequence[str] | None = None) -> Path:
        if recipe.algos:
            algo, rest = pick_algo(recipe, argv)
            if algo != recipe.algo:
                module, _, fn = recipe.algos[algo].partition(":")
                return getattr(importlib.import_module(module), fn)(rest)
            argv = rest
        return run_recipe(recipe, argv)

    def cli() -> None:
        run_cli(main)

    main.__doc__ = f"Train (new run or ``--resume``) or ``--evaluate`` with the {recipe.name} recipe; see run_recipe."
    cli.__doc__ = f"The {recipe.name} command line: ``main`` with one-line errors and exit codes."
    return main, cli
