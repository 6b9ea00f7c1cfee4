"""Non-finite guards: stop *before* the optimizer step, naming the key, iteration and run dir.

A NaN gradient that reaches the optimizer poisons its moments for good, and a checkpoint written
after it is worthless. Every recipe calls these guards on collected data, on advantages, on each
loss and gradient norm before ``optimizer.step()``, on the parameters after it, and on evaluation
results; a failing check raises before anything is written, so the last good checkpoint (if one
exists) is never replaced by a bad one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from .config import ConfigError

__all__ = ["NonFiniteError", "MissingKeyError", "check_finite", "check_tensordict_finite", "check_parameters_finite", "check_metrics_finite"]


def _checkpoint_note(run_dir: str | None) -> str:
    """What is left to go back to, as it stands on disk now (never claims a file that is not there)."""
    if not run_dir:
        return ""
    from .checkpoint import CHECKPOINT_NAME

    path = Path(run_dir) / CHECKPOINT_NAME
    if path.is_file():
        return f"; the last good checkpoint is {path} (continue from it with --resume {run_dir} once the cause is fixed)"
    return f"; no checkpoint was written yet in {run_dir}, so there is nothing to resume"


class MissingKeyError(ConfigError):
    """A key the env (or model) should have written is absent: an env-contract problem, not a bug."""


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite holds NaN or inf. Training stops; nothing is written."""

    def __init__(self, key: str, *, iteration: int | None, run_dir: str | None, detail: str = "") -> None:
        self.key = key
        self.iteration = iteration
        self.run_dir = run_dir
        where = f" at iteration {iteration}" if iteration is not None else ""
        super().__init__(f"non-finite values in '{key}'{where}{detail}{_checkpoint_note(run_dir)}")


def check_finite(
    key: str, value: torch.Tensor, *, iteration: int | None = None, run_dir: str | None = None
) -> None:
    """Raises :class:`NonFiniteError` if ``value`` holds NaN or inf (:class:`MissingKeyError` naming ``key`` if
    it is ``None``: a key the env or model should have written is missing)."""
    if value is None:
        raise MissingKeyError(f"'{key}' is missing from the data to check (is the env writing it under this name?)")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        n_bad = int((~torch.isfinite(value)).sum())
        raise NonFiniteError(
            key, iteration=iteration, run_dir=run_dir, detail=f" ({n_bad} of {value.numel()} entries)"
        )


def check_tensordict_finite(
    tensordict: TensorDictBase,
    keys: Iterable[NestedKey],
    *,
    iteration: int | None = None,
    run_dir: str | None = None,
) -> None:
    """Checks each of ``keys`` (missing keys raise :class:`MissingKeyError` naming the key and the keys present)."""
    for key in keys:
        name = key if isinstance(key, str) else "/".join(key)
        value = tensordict.get(key, None)
        if value is None:
            present = ", ".join(k if isinstance(k, str) else "/".join(k)
                                for k in tensordict.keys(include_nested=True, leaves_only=True))
            raise MissingKeyError(f"'{name}' is missing from the collected data (keys present: {present})")
        check_finite(name, value, iteration=iteration, run_dir=run_dir)


def check_parameters_finite(
    parameters: Iterable[torch.Tensor], *, name: str = "parameters", iteration: int | None = None,
    run_dir: str | None = None,
) -> None:
    """After an optimizer step: raises :class:`NonFiniteError` if any parameter became NaN or inf
    (e.g. an infinite learning rate), before a checkpoint could store them. One fused norm per
    parameter (``torch._foreach_norm``) and one host sync in all."""
    params = [p.detach() for p in parameters if p.is_floating_point()]
    if not params:
        return
    norms = torch.stack([n.float() for n in torch._foreach_norm(params)])
    if not bool(torch.isfinite(norms).all()):
        raise NonFiniteError(name, iteration=iteration, run_dir=run_dir,
                             detail=f" after the optimizer step ({int((~torch.isfinite(norms)).sum())} of {len(params)} "
                                    "tensors; check the learning rates); nothing was written")


def check_metrics_finite(
    metrics: dict[str, float], keys: Iterable[str], *, iteration: int | None = None, run_dir: str | None = None
) -> None:
    """Evaluation results: a NaN or inf score is an error (never a new best checkpoint)."""
    for key in keys:
        if key in metrics and not math.isfinite(float(metrics[key])):
            raise NonFiniteError(key, iteration=iteration, run_dir=run_dir,
                                 detail=f" (evaluation gave {metrics[key]}); no checkpoint or best.pt was written for it")
