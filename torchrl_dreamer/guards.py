"""Non-finite guards: stop *before* the optimizer step, naming the key, iteration and run dir.

The earlier hand-rolled Dreamer poisoned its Adam state with NaN gradients and had no checkpoint
to go back to (SEEDS_DIGEST section 1.4). Every recipe calls these guards on collected data, on
advantages and on each loss before ``optimizer.step()``; the last good checkpoint is never touched
by a failing update.
"""
from __future__ import annotations

from typing import Iterable

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

__all__ = ["NonFiniteError", "check_finite", "check_tensordict_finite"]


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite holds NaN or inf. Training stops; nothing is written."""

    def __init__(self, key: str, *, iteration: int | None, run_dir: str | None, detail: str = "") -> None:
        self.key = key
        self.iteration = iteration
        self.run_dir = run_dir
        where = f" at iteration {iteration}" if iteration is not None else ""
        run = f" (run directory: {run_dir}; the last good checkpoint there is intact)" if run_dir else ""
        super().__init__(f"non-finite values in '{key}'{where}{detail}{run}")


def check_finite(
    key: str, value: torch.Tensor, *, iteration: int | None = None, run_dir: str | None = None
) -> None:
    """Raises :class:`NonFiniteError` if ``value`` holds NaN or inf."""
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
    """Checks each of ``keys`` (missing keys raise ``KeyError``)."""
    for key in keys:
        name = key if isinstance(key, str) else "/".join(key)
        check_finite(name, tensordict.get(key), iteration=iteration, run_dir=run_dir)
