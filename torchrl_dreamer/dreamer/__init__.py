"""DreamerV3 on TorchRL: world model, imagination, losses, acting policy, replay and the update.

The pieces a training loop wires together (``docs/api.md`` shows it without any recipe):

Agent
    ModelSizes                network sizes (MLP width/depth, GRU, latent, CNN, two-hot bins)
    PRESETS                   the named sizes: ``tiny`` (CPU) and the paper's ``xs`` .. ``l``
    preset                    a named preset with overrides, e.g. ``preset("tiny", units=64)``
    make_agent                world model + actor + critic from observation shapes and the action space
    make_world_model          the world model alone (one encoder/decoder per observation key)
    make_actor                a discrete or continuous actor on the latent features
    make_critic               the two-hot critic on the latent features
    DreamerAgent              container of the trained networks (``state_dict``, ``.to(device)``)
    DreamerPolicy             the acting policy for a TorchRL ``Collector`` (carries the latent state)
Models
    DreamerWorldModel         encoders -> RSSM -> decoders, reward and continue heads
    RSSM                      recurrent state-space model: posterior (observe) and prior (imagine) steps
    NormMLP                   DreamerV3's ``Linear -> RMSNorm -> SiLU`` MLP
    VectorEncoder             vector observation -> embedding (symlog inputs)
    VectorDecoder             latent features -> symlog observation
    ConvEncoder               64x64 pixels -> embedding
    ConvDecoder               latent features -> 64x64 pixels
    TwoHotHead                symexp two-hot regression head (reward, critic)
    ContinueHead              logit of "the episode continues"
    MaskEncoder               an env's boolean action mask -> embedding
    MaskDecoder               latent features -> per-action "allowed" logits (the mask head)
    DiscreteActor             categorical policy with unimix (optional action mask)
    ContinuousActor           bounded-std Normal policy on ``[-1, 1]``
Imagination
    ImaginationModule         TensorDict boundary: posterior start states -> ``[N, H+1]`` imagined trajectory
    imagine                   the same rollout on plain tensors
    ImaginationHooks          exact env logic carried through imagination (e.g. routing masks)
    ActionMaskHooks           imagined action masks from a rule or the mask head (any masked env)
Losses (TorchRL ``LossModule``)
    DreamerWorldModelLoss     reconstruction, reward, continue and balanced KL with free bits
    DreamerCriticLoss         two-hot critic on lambda-returns with a slow EMA critic
    DreamerPolicyLoss         REINFORCE (or dynamics-backprop) actor loss with return normalisation
    LambdaReturn              the value estimator of the critic and actor losses
Replay and update
    SequenceWriter            collector batches -> one replay row per env state (final states kept)
    make_replay_buffer        ring buffer that samples fixed-length slices
    replay_state_dict         a checkpoint of the rows in use
    load_replay_state_dict    loads :func:`replay_state_dict`'s state into a fresh buffer
    make_optimizer            TorchRL's ``DreamerV3Optimizer`` (LaProp + AGC) with one group per network
    DreamerUpdate             one gradient update: world model, imagination, critic, actor, optimizer step
Envs and configs
    make_dreamer_env          a Gymnasium id or ``package.module:function`` factory with ``is_first``
    make_gym_env              ``SerialEnv`` of Gymnasium envs (one-hot actions for discrete spaces)
    PixelsToUint8             rendered frames -> ``[3, 64, 64]`` uint8
    WorldModelLossConfig      world-model loss weights as a typed config section
    SingleAgentEnvConfig      the env section of the single-agent recipes (Dreamer and PPO)
    EnvContractError          a factory env that does not fit a recipe (every problem named)
    OptimConfig               optimiser settings as a typed config section
Math (plain tensors)
    symlog, symexp            ``sign(x) log(1 + |x|)`` and its inverse
    TwoHot                    symexp two-hot codec
    lambda_returns            lambda-returns of an imagined trajectory
    kl_loss                   balanced KL with free bits
    ReturnNormalizer          EMA of the 5th-95th percentile range of returns
Routing (TSP / CVRP)
    RoutingSizes              sizes of the routing world model and pointer actor
    RoutingWorldModel         world model with the instance encoder as carried static context
    PointerActor              pointer-network actor on the latent features and the exact state
    RoutingHooks              exact routing masks and rewards during imagination
    make_routing_agent        ``(world_model, actor, critic)`` for a routing problem

Names are imported on first use (module ``__getattr__``): importing one submodule does not load
the others.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .agent import (PRESETS, DreamerAgent, DreamerPolicy, ModelSizes, make_actor, make_agent, make_critic,
                        make_world_model, preset)
    from .config import OptimConfig, SingleAgentEnvConfig, WorldModelLossConfig
    from .envs import EnvContractError, PixelsToUint8, make_dreamer_env, make_gym_env
    from .functional import ReturnNormalizer, TwoHot, kl_loss, lambda_returns, symexp, symlog
    from .imagination import ActionMaskHooks, ImaginationHooks, ImaginationModule, imagine
    from .losses import DreamerCriticLoss, DreamerPolicyLoss, DreamerWorldModelLoss, LambdaReturn
    from .nets import (ContinueHead, ContinuousActor, ConvDecoder, ConvEncoder, DiscreteActor, MaskDecoder,
                       MaskEncoder, NormMLP, TwoHotHead, VectorDecoder, VectorEncoder)
    from .replay import SequenceWriter, load_replay_state_dict, make_replay_buffer, replay_state_dict
    from .routing import PointerActor, RoutingHooks, RoutingSizes, RoutingWorldModel, make_routing_agent
    from .rssm import RSSM
    from .update import DreamerUpdate, make_optimizer
    from .world_model import DreamerWorldModel

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ModelSizes", "PRESETS", "preset", "make_agent", "make_world_model", "make_actor", "make_critic",
                     "DreamerAgent", "DreamerPolicy"), ".agent"),
    "DreamerWorldModel": ".world_model",
    "RSSM": ".rssm",
    **dict.fromkeys(("NormMLP", "VectorEncoder", "VectorDecoder", "ConvEncoder", "ConvDecoder", "TwoHotHead",
                     "ContinueHead", "MaskEncoder", "MaskDecoder", "DiscreteActor", "ContinuousActor"), ".nets"),
    **dict.fromkeys(("ImaginationModule", "imagine", "ImaginationHooks", "ActionMaskHooks"), ".imagination"),
    **dict.fromkeys(("DreamerWorldModelLoss", "DreamerCriticLoss", "DreamerPolicyLoss", "LambdaReturn"), ".losses"),
    **dict.fromkeys(("SequenceWriter", "make_replay_buffer", "replay_state_dict", "load_replay_state_dict"),
                    ".replay"),
    **dict.fromkeys(("make_optimizer", "DreamerUpdate"), ".update"),
    **dict.fromkeys(("make_dreamer_env", "make_gym_env", "PixelsToUint8", "EnvContractError"), ".envs"),
    **dict.fromkeys(("WorldModelLossConfig", "OptimConfig", "SingleAgentEnvConfig"), ".config"),
    **dict.fromkeys(("symlog", "symexp", "TwoHot", "lambda_returns", "kl_loss", "ReturnNormalizer"), ".functional"),
    **dict.fromkeys(("RoutingSizes", "RoutingWorldModel", "PointerActor", "RoutingHooks", "make_routing_agent"),
                    ".routing"),
}

__all__ = [
    # agent
    "ModelSizes", "PRESETS", "preset", "make_agent", "make_world_model", "make_actor", "make_critic", "DreamerAgent",
    "DreamerPolicy",
    # models
    "DreamerWorldModel", "RSSM", "NormMLP", "VectorEncoder", "VectorDecoder", "ConvEncoder", "ConvDecoder",
    "TwoHotHead", "ContinueHead", "MaskEncoder", "MaskDecoder", "DiscreteActor", "ContinuousActor",
    # imagination
    "ImaginationModule", "imagine", "ImaginationHooks", "ActionMaskHooks",
    # losses
    "DreamerWorldModelLoss", "DreamerCriticLoss", "DreamerPolicyLoss", "LambdaReturn",
    # replay and update
    "SequenceWriter", "make_replay_buffer", "replay_state_dict", "load_replay_state_dict", "make_optimizer",
    "DreamerUpdate",
    # envs and configs
    "make_dreamer_env", "make_gym_env", "PixelsToUint8", "EnvContractError", "WorldModelLossConfig", "OptimConfig",
    "SingleAgentEnvConfig",
    # math
    "symlog", "symexp", "TwoHot", "lambda_returns", "kl_loss", "ReturnNormalizer",
    # routing
    "RoutingSizes", "RoutingWorldModel", "PointerActor", "RoutingHooks", "make_routing_agent",
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
