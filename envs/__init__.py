"""Envs shipped with torchrl_dreamer, as batched TorchRL ``EnvBase``s (no dependency on the library).

Routing (:mod:`envs.routing`)
    TSPEnv               batched travelling salesman with an action mask; any size, dense or sparse reward
    CVRPEnv              batched capacitated vehicle routing (node 0 = depot) with an action mask
    generate_tsp         seeded random TSP instances (uniform in the unit square)
    generate_cvrp        seeded random CVRP instances (Kool et al. 2019 demands and capacities)
    KOOL_CAPACITY        the CVRP vehicle capacity per size (20 -> 30, 50 -> 40, 100 -> 50)
    load_dev_set         a bundled dev set (``"tsp20"``, ``"tsp50"``, ``"cvrp20"``, ``"cvrp50"``) or a ``.npz`` path
    dev_set_path         the file behind a dev-set name or path
    load_npz             a routing ``.npz`` in the dev-set format, as tensors
    DevSetError          a dev set that cannot be found or read, or does not fit the problem asked for
    InvalidActionError   an action chose a masked node
    tour_length          exact (float64) length of tours over given coordinates
Custom env examples (:mod:`envs.goal_reaching`, :mod:`envs.masked_grid`)
    GoalReachingEnv      batched multi-agent goal reaching: the worked example of plugging in your own
                         env (its factory for recipes is ``envs.goal_reaching:make_env``)
    MaskedGridEnv        batched single-agent grid walk with masked discrete actions (Dreamer or PPO;
                         factory ``envs.masked_grid:make_env``)
    MaskedActionError    a masked action reached a strict :class:`MaskedGridEnv`
    mask_rule            the grid's action mask from its observation (``env.mask_rule`` for Dreamer)
    scripted_action      the grid's shortest-path reference policy

Names are imported on first use (module ``__getattr__``), so ``import envs`` loads nothing else.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .goal_reaching import GoalReachingEnv
    from .masked_grid import MaskedActionError, MaskedGridEnv, mask_rule, scripted_action
    from .routing import (KOOL_CAPACITY, CVRPEnv, DevSetError, InvalidActionError, TSPEnv, dev_set_path,
                          generate_cvrp, generate_tsp, load_dev_set, load_npz, tour_length)

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("TSPEnv", "CVRPEnv", "generate_tsp", "generate_cvrp", "KOOL_CAPACITY", "load_dev_set",
                     "dev_set_path", "load_npz", "DevSetError", "InvalidActionError", "tour_length"), ".routing"),
    "GoalReachingEnv": ".goal_reaching",
    **dict.fromkeys(("MaskedGridEnv", "MaskedActionError", "mask_rule", "scripted_action"), ".masked_grid"),
}

__all__ = [
    "TSPEnv", "CVRPEnv", "generate_tsp", "generate_cvrp", "KOOL_CAPACITY", "load_dev_set", "dev_set_path", "load_npz",
    "DevSetError", "InvalidActionError", "tour_length",
    "GoalReachingEnv", "MaskedGridEnv", "MaskedActionError", "mask_rule", "scripted_action",
]


def __getattr__(name: str) -> Any:
    """Imports a public name the first time it is asked for."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
