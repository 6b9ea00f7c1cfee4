"""PPO baselines built on torchrl_dreamer and TorchRL: multi-agent PPO and PPO for routing.

Multi-agent PPO, MAPPO / IPPO (:mod:`baselines.mappo`, :mod:`baselines.mappo_networks`)
    AgentGroupMLP               an MLP per agent or shared, centralised or not (batched matmuls)
    PlainMLP                    ``depth`` hidden layers of ``width`` units, then a linear output
    TanhNormalHead              network outputs -> tanh-squashed Gaussian over a box action
    TanhNormalPolicy            backbone + :class:`TanhNormalHead`; samples or takes the mode
    MultiAgentPPOLoss           clipped PPO ``LossModule`` with the terms of TorchRL's ``ClipPPOLoss``
    ppo_update                  shuffled minibatch epochs on flat tensors (advantages already computed)
    make_torchrl_clip_ppo_loss  TorchRL's ``ClipPPOLoss`` around the same policy and critic
    torchrl_ppo_update          the tutorial-style ``ReplayBuffer`` + ``ClipPPOLoss`` minibatch loop
PPO for routing with a pointer network (:mod:`baselines.pointer_ppo`)
    PointerPPOLoss              clipped PPO ``LossModule`` on minibatches of whole episodes (``ClipPPOLoss``'s terms)
    rollout                     runs every instance of a TSP / CVRP env batch to the end
    compute_advantage           GAE over ``[B, T]`` episodes (writes ``advantage``, ``value_target``)
    compute_shared_advantage    POMO-style shared baseline over rollouts of one instance
    ppo_routing_update          clipped PPO over minibatches of whole episodes
    evaluate_dev                greedy decoding of a dev set: mean tour length and gap to the reference

Names are imported on first use (module ``__getattr__``), so ``import baselines`` loads nothing else.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .mappo import MultiAgentPPOLoss, TanhNormalPolicy, make_torchrl_clip_ppo_loss, ppo_update, torchrl_ppo_update
    from .mappo_networks import AgentGroupMLP, PlainMLP, TanhNormalHead
    from .pointer_ppo import (PointerPPOLoss, compute_advantage, compute_shared_advantage, evaluate_dev,
                              ppo_routing_update, rollout)

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AgentGroupMLP", "PlainMLP", "TanhNormalHead"), ".mappo_networks"),
    **dict.fromkeys(("TanhNormalPolicy", "MultiAgentPPOLoss", "ppo_update", "make_torchrl_clip_ppo_loss",
                     "torchrl_ppo_update"), ".mappo"),
    **dict.fromkeys(("PointerPPOLoss", "rollout", "compute_advantage", "compute_shared_advantage", "ppo_routing_update",
                     "evaluate_dev"), ".pointer_ppo"),
}

__all__ = [
    "AgentGroupMLP", "PlainMLP", "TanhNormalHead", "TanhNormalPolicy", "MultiAgentPPOLoss", "ppo_update",
    "make_torchrl_clip_ppo_loss", "torchrl_ppo_update",
    "PointerPPOLoss", "rollout", "compute_advantage", "compute_shared_advantage", "ppo_routing_update", "evaluate_dev",
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
