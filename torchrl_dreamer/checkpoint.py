"""Atomic checkpoints with RNG state, so a crash never leaves a half-written file behind.

A run directory keeps two checkpoints: ``checkpoint.pt`` (the latest) and ``checkpoint.prev.pt``
(the one before it). :func:`load_resume_state` falls back to the previous one, with a warning,
when the latest is missing or unreadable, so one corrupt file never loses a run.
"""
from __future__ import annotations

import os
import random
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

__all__ = [
    "CHECKPOINT_NAME", "PREVIOUS_CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint",
    "load_resume_state", "rng_state", "set_rng_state", "latest_checkpoint", "run_clock_start", "load_weights",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"


class CheckpointError(ConfigError):
    """A checkpoint cannot be read (missing, truncated, not a checkpoint, or written by another recipe)."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, if present, CUDA) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def run_clock_start(resume_state: dict[str, Any] | None, time_budget_s: float = 0.0) -> float:
    """The ``time.perf_counter()`` reading at which a run's training clock stands at 0: now for a new
    run; for ``--resume``, earlier by the training seconds its checkpoint stored under
    ``"elapsed_s"``. So ``run.time_budget_s``, ``time/total_s`` and schedules over the time budget
    continue across a resume instead of starting again (the seconds between the last checkpoint
    and a crash are not counted: that work is redone). Raises ``ConfigError`` when a resumed run
    has already used its whole ``time_budget_s`` (> 0)."""
    elapsed = float((resume_state or {}).get("elapsed_s", 0.0))
    if resume_state is not None and 0 < time_budget_s <= elapsed:
        raise ConfigError(f"nothing to do: the run already trained {elapsed:.0f} s of its run.time_budget_s="
                          f"{time_budget_s:g} (the budget counts across --resume); raise run.time_budget_s")
    return time.perf_counter() - elapsed


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
    """Makes the renames in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *, keep_previous: bool = False) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file in the same directory, fsyncs it,
    then renames it over ``path``: readers see the old checkpoint or the new one, never a torn one.

    With ``keep_previous`` the checkpoint being replaced stays as ``checkpoint.prev.pt`` beside it
    (hard-linked first, so ``path`` itself never disappears, even if the process dies in between),
    unless it is unreadable (no zip end record): then ``checkpoint.prev.pt`` stays as it is.
    A failed write (e.g. a full disk) removes its temporary file and leaves both checkpoints as
    they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # an unreadable latest checkpoint (a run resumed from checkpoint.prev.pt) is not rotated into
        # checkpoint.prev.pt: that would replace the good previous one by it. torch.save writes a zip;
        # is_zipfile reads only its end (the central directory), which a torn or garbled file lacks.
        if keep_previous and path.is_file() and zipfile.is_zipfile(path):
            previous = path.with_name(PREVIOUS_CHECKPOINT_NAME)
            previous_tmp = path.with_name(f".{PREVIOUS_CHECKPOINT_NAME}.tmp-{os.getpid()}")
            try:
                previous_tmp.unlink(missing_ok=True)
                os.link(path, previous_tmp)
                os.replace(previous_tmp, previous)
            except OSError:  # no hard links here: a copy that is renamed into place
                import shutil

                shutil.copyfile(path, previous_tmp)
                os.replace(previous_tmp, previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        for leftover in (tmp, path.with_name(f".{PREVIOUS_CHECKPOINT_NAME}.tmp-{os.getpid()}")):
            if leftover.exists():  # a failed save leaves neither a torn checkpoint nor a stray temp file
                leftover.unlink()
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint of a run directory; raises ``FileNotFoundError`` with the path if missing."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    return path


def _read(path: Path, map_location) -> dict[str, Any]:
    try:
        # weights_only=False: the checkpoint holds RNG states and counters as well as tensors; only
        # load checkpoints you wrote yourself.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, corrupt or not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this package (a {type(state).__name__}, not a dict)")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint file, or the latest checkpoint of a run directory. Raises
    ``FileNotFoundError`` naming the path when it is missing and :class:`CheckpointError` naming
    the file when it cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _read(path, map_location)


def load_resume_state(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                      required: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """The state to resume ``run_dir`` from and the file it came from: ``checkpoint.pt``, or
    ``checkpoint.prev.pt`` (with a warning on stderr) when the latest is missing, unreadable or
    lacks one of the ``required`` keys (e.g. a checkpoint of another recipe). Reads only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    problems = []
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        path = run_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            state = _read(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        missing = [k for k in required if k not in state]
        if missing:
            problems.append(f"{path} lacks {', '.join(missing)} (written by another recipe?)")
            continue
        if name != CHECKPOINT_NAME:
            import sys

            print(f"warning: {problems[0]}; resuming from the previous checkpoint {path} instead "
                  f"(step {state.get('iteration', state.get('env_steps', '?'))})", file=sys.stderr, flush=True)
        return state, path
    raise CheckpointError(f"cannot resume {run_dir}: no readable checkpoint ({'; '.join(problems)}). Start a new "
                          f"run, or put a good checkpoint file at {run_dir / CHECKPOINT_NAME}")


def load_weights(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` that says what to do when
    the checkpoint was written by a differently sized model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), (first[1] if len(first) > 1 else first[0]).strip() if first else "")
        raise CheckpointError(f"the {what}'s weights do not fit the model this config builds ({detail[:240]}); "
                              "resume without model.* / env.* overrides that change network sizes") from None


def weight_average(module: torch.nn.Module, decay: float):
    """An exponential moving average of ``module``'s weights (torch's ``AveragedModel`` with its EMA
    update, buffers averaged too), or None for ``decay <= 0``. ``average.update_parameters(module)``
    after the optimizer steps moves it; ``average.module`` is a copy of ``module`` holding the average."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def averaged_weights(state: dict[str, Any], key: str = "agent", average_key: str = "ema") -> dict[str, Any]:
    """The weights a checkpoint's evaluation uses: the weight average's (``state[average_key]``, an
    ``AveragedModel`` state) when the run kept one, else ``state[key]`` (the last iterate)."""
    average = state.get(average_key)
    if average is None:
        return state[key]
    return {k[len("module."):]: v for k, v in average.items() if k.startswith("module.")}
