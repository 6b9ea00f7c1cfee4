"""Atomic checkpoints with RNG state, so a crash never leaves a half-written file behind."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "latest_checkpoint", "run_clock_start"]

CHECKPOINT_NAME = "checkpoint.pt"


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
        from .config import ConfigError

        raise ConfigError(f"nothing to do: the run already trained {elapsed:.0f} s of its run.time_budget_s="
                          f"{time_budget_s:g} (the budget counts across --resume); raise run.time_budget_s")
    return time.perf_counter() - elapsed


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file in the same directory, fsyncs it,
    then renames it over ``path``: readers see the old checkpoint or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # a failed save leaves neither a torn checkpoint nor a stray temp file
            tmp.unlink()
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint of a run directory; raises ``FileNotFoundError`` with the path if missing."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only=False: the checkpoint holds RNG states and counters as well as tensors; only
    # load checkpoints you wrote yourself.
    return torch.load(path, map_location=map_location, weights_only=False)
