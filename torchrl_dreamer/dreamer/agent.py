"""Size presets, the agent container, named factories and the acting policy.

Factories (``make_world_model``, ``make_actor``, ``make_critic``, ``make_agent``) build the plain
networks; TensorDict wiring happens in :class:`DreamerPolicy` (acting through a TorchRL
``Collector``), :class:`~.imagination.ImaginationModule` and the losses. The same module objects
serve acting, imagination and training.

Size presets (``model.size``) follow the DreamerV3 paper's table (2023: GRU units, dense units, MLP
layers, CNN multiplier) with 32 categoricals of 16 classes; ``tiny`` is a CPU preset for quick
experiments; ``nano`` is the smallest that solves CartPole on a 2-core CPU in minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.envs.utils import ExplorationType, exploration_type

from .nets import (ConvDecoder, ConvEncoder, ContinueHead, ContinuousActor, DiscreteActor, MaskDecoder, MaskEncoder,
                   TwoHotHead, VectorDecoder, VectorEncoder)
from .rssm import RSSM
from .world_model import DreamerWorldModel

__all__ = ["ModelSizes", "PRESETS", "preset", "DreamerAgent", "make_world_model", "make_actor", "make_critic",
           "make_agent", "DreamerPolicy", "STATE_KEYS"]


@dataclass(frozen=True)
class ModelSizes:
    """Network sizes. ``units``/``layers``: every MLP (encoder, decoder, heads, actor, critic);
    ``deter``/``hidden``/``blocks``: the block GRU; ``stoch`` x ``classes``: the latent;
    ``cnn_depth``: channels of the first conv layer (doubles per layer); ``bins``: two-hot bins of the
    reward head and the critic, ``twohot``: their spacing and decoding (``"symlog"`` or ``"symexp"``,
    see :class:`.functional.TwoHot`)."""

    deter: int = 256
    hidden: int = 256
    units: int = 256
    layers: int = 1
    stoch: int = 32
    classes: int = 16
    blocks: int = 8
    cnn_depth: int = 24
    bins: int = 255
    twohot: str = "symlog"


PRESETS: dict[str, ModelSizes] = {
    "nano": ModelSizes(deter=64, hidden=64, units=64, layers=1, stoch=8, classes=8, blocks=2, cnn_depth=16),
    "tiny": ModelSizes(deter=128, hidden=128, units=128, layers=1, stoch=16, classes=16, blocks=4, cnn_depth=16),
    "xs": ModelSizes(deter=256, hidden=256, units=256, layers=1, cnn_depth=24),
    "s": ModelSizes(deter=512, hidden=512, units=512, layers=2, cnn_depth=32),
    "m": ModelSizes(deter=1024, hidden=640, units=640, layers=3, cnn_depth=48),
    "l": ModelSizes(deter=2048, hidden=768, units=768, layers=4, cnn_depth=64),
}


def preset(name: str, **overrides) -> ModelSizes:
    """A named preset with optional field overrides (``preset("xs", units=128)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size '{name}'; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def make_world_model(obs_shapes: dict[str, tuple[int, ...]], action_dim: int, sizes: ModelSizes,
                     unimix: float = 0.01, mask_key: str | None = None) -> DreamerWorldModel:
    """Encoders/decoders per observation (1-d shape: MLP with symlog; ``(3, 64, 64)``: CNN), RSSM,
    reward (two-hot) and continue heads. ``mask_key``: the observation (in ``obs_shapes``, shape
    ``[action_dim]``) holding the env's boolean action mask; it gets a mask encoder and a mask head
    (:class:`MaskDecoder`) that imagination uses to predict the allowed actions."""
    encoders, decoders, embed_dim = {}, {}, 0
    feat_dim = sizes.deter + sizes.stoch * sizes.classes
    if mask_key is not None and tuple(obs_shapes.get(mask_key, ())) != (action_dim,):
        raise ValueError(f"action mask '{mask_key}' must have shape [{action_dim}] (one entry per action), got "
                         f"{list(obs_shapes.get(mask_key, ())) or 'no such observation'}")
    for name, shape in obs_shapes.items():
        if name == mask_key:
            encoders[name] = MaskEncoder(action_dim, sizes.units, sizes.layers)
            decoders[name] = MaskDecoder(feat_dim, action_dim, sizes.units, sizes.layers)
        elif len(shape) == 1:
            encoders[name] = VectorEncoder(shape[0], sizes.units, sizes.layers)
            decoders[name] = VectorDecoder(feat_dim, shape[0], sizes.units, sizes.layers)
        elif len(shape) == 3:
            encoders[name] = ConvEncoder(shape[0], sizes.cnn_depth, shape[-1])
            decoders[name] = ConvDecoder(feat_dim, shape[0], sizes.cnn_depth)
        else:
            raise ValueError(f"observation '{name}' has shape {shape}: expected [F] (vector) or [3, 64, 64] (pixels)")
        embed_dim += encoders[name].out_features
    rssm = RSSM(action_dim, embed_dim, sizes.deter, sizes.stoch, sizes.classes, sizes.hidden, sizes.blocks, unimix)
    reward_head = TwoHotHead(feat_dim, sizes.units, sizes.layers, sizes.bins, sizes.twohot)
    return DreamerWorldModel(encoders, decoders, rssm, reward_head,
                             ContinueHead(feat_dim, sizes.units, sizes.layers), mask_key=mask_key)


def make_actor(feat_dim: int, action_dim: int, discrete: bool, sizes: ModelSizes, unimix: float = 0.01) -> nn.Module:
    if discrete:
        return DiscreteActor(feat_dim, action_dim, sizes.units, sizes.layers, unimix)
    return ContinuousActor(feat_dim, action_dim, sizes.units, sizes.layers)


def make_critic(feat_dim: int, sizes: ModelSizes) -> TwoHotHead:
    return TwoHotHead(feat_dim, sizes.units, sizes.layers, sizes.bins, sizes.twohot)


class DreamerAgent(nn.Module):
    """Container of the trained networks (checkpointing, ``.to(device)``, parameter counts)."""

    def __init__(self, world_model: DreamerWorldModel, actor: nn.Module, critic: TwoHotHead) -> None:
        super().__init__()
        self.world_model, self.actor, self.critic = world_model, actor, critic

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"world_model": count(self.world_model), "actor": count(self.actor), "critic": count(self.critic)}


def make_agent(obs_shapes: dict[str, tuple[int, ...]], action_dim: int, discrete: bool, sizes: ModelSizes,
               unimix: float = 0.01, mask_key: str | None = None) -> DreamerAgent:
    if mask_key is not None and not discrete:
        raise ValueError("an action mask needs discrete actions")
    wm = make_world_model(obs_shapes, action_dim, sizes, unimix, mask_key)
    return DreamerAgent(wm, make_actor(wm.feat_dim, action_dim, discrete, sizes, unimix), make_critic(wm.feat_dim, sizes))


STATE_KEYS = ("deter", "stoch", "prev_action")


class DreamerPolicy(TensorDictModuleBase):
    """The acting policy: filters the latent state through the env steps and picks actions.

    Reads the observations (world-model names mapped by ``obs_keys``), ``is_first`` (TorchRL's
    ``InitTracker``), the carried state ``deter``/``stoch``/``prev_action`` (zeros at reset from a
    ``TensorDictPrimer``, see :meth:`primer_specs`) and an optional ``action_mask``; writes
    ``action`` (env units) and the new state under ``("next", ...)``, which the collector carries to
    the next step. ``prev_action`` is stored in actor units (one-hot, or ``[-1, 1]``).

    Actions: sampled under ``ExplorationType.RANDOM``, the mode under ``DETERMINISTIC``/``MODE``;
    ``random_actions=True`` (prefill) draws uniformly among allowed actions while still filtering
    the state. Batch shapes: ``[]`` (one env) or ``[E]``.
    """

    def __init__(self, world_model: DreamerWorldModel, actor: nn.Module, *, obs_keys: dict[str, str] | None = None,
                 action_low: torch.Tensor | None = None, action_high: torch.Tensor | None = None,
                 mask_key: str | None = None) -> None:
        super().__init__()
        self.world_model, self.actor = world_model, actor
        self.obs_keys = obs_keys or {n: n for n in world_model.obs_names}
        self.discrete = bool(getattr(actor, "discrete", False))
        # the env's action mask: the world model's mask observation unless named here
        self.mask_key = mask_key if mask_key is not None else getattr(world_model, "mask_key", None)
        if self.mask_key is not None and not self.discrete:
            raise ValueError("an action mask needs a discrete actor")
        mask_key = self.mask_key
        if not self.discrete:
            if action_low is None or action_high is None:
                raise ValueError("a continuous policy needs action_low and action_high (the env's bounds)")
            self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))
        # the prefill switch is a (non-persistent) buffer so that it travels with the weights a
        # collector sends to worker processes / Ray actors; a plain attribute would not
        self.register_buffer("prefill_flag", torch.zeros((), dtype=torch.bool), persistent=False)
        # the learner's update count when these weights were sent to a collector worker; with
        # ``report_version`` every step carries it as ``policy_version`` (how stale the acting was)
        self.register_buffer("policy_version", torch.zeros((), dtype=torch.int64), persistent=False)
        self.report_version = False
        self._random_actions = False
        self.in_keys = [*self.obs_keys.values(), "is_first", *STATE_KEYS]
        if mask_key and mask_key not in self.in_keys:
            self.in_keys.append(mask_key)
        self.out_keys = ["action", *(("next", k) for k in STATE_KEYS)]

    @property
    def random_actions(self) -> bool:
        """Prefill: uniformly random (allowed) actions instead of the actor's."""
        return self._random_actions

    @random_actions.setter
    def random_actions(self, value: bool) -> None:
        self._random_actions = bool(value)
        self.prefill_flag.fill_(bool(value))

    def _acting_randomly(self) -> bool:
        # a CPU copy in a collector worker only sees the buffer (synced with the weights); reading it
        # costs nothing there. On an accelerator the attribute avoids a device sync per step.
        return bool(self.prefill_flag) if self.prefill_flag.device.type == "cpu" else self._random_actions

    def primer_specs(self, batch_shape: torch.Size = torch.Size([])) -> dict:
        """Specs for ``TensorDictPrimer(primers=...)``: the carried state, zeros at reset."""
        from torchrl.data import Unbounded

        rssm = self.world_model.rssm
        dims = {"deter": (rssm.deter,), "stoch": (rssm.stoch, rssm.classes), "prev_action": (rssm.action_dim,)}
        return {k: Unbounded(shape=(*batch_shape, *d), dtype=torch.float32) for k, d in dims.items()}

    def to_env_action(self, action: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return action.to(torch.long) if action.dtype != torch.long else action
        return self.action_low + (action + 1.0) * 0.5 * (self.action_high - self.action_low)

    def from_env_action(self, action: torch.Tensor) -> torch.Tensor:
        """Env action -> actor units (what the world model is trained on)."""
        if self.discrete:
            return action.to(torch.float32)
        # the replay writer calls this on CPU rows while the bounds live with the policy (cfg.device)
        low, high = self.action_low.to(action.device), self.action_high.to(action.device)
        return (2.0 * (action - low) / (high - low) - 1.0).clamp(-1.0, 1.0)

    def _random_action(self, n: int, mask: torch.Tensor | None, device) -> torch.Tensor:
        rssm = self.world_model.rssm
        if self.discrete:
            probs = torch.ones(n, rssm.action_dim, device=device) if mask is None else mask.float()
            return F.one_hot(torch.multinomial(probs, 1).squeeze(-1), rssm.action_dim).float()
        return torch.rand(n, rssm.action_dim, device=device) * 2 - 1

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch_shape = tensordict.batch_size
        flat = tensordict.reshape(-1) if len(batch_shape) != 1 else tensordict
        n = flat.shape[0]
        rssm = self.world_model.rssm
        obs = {name: flat.get(key) for name, key in self.obs_keys.items()}
        is_first = flat.get("is_first").reshape(n)
        h = flat.get("deter").reshape(n, rssm.deter)
        z = flat.get("stoch").reshape(n, rssm.stoch, rssm.classes)
        prev = flat.get("prev_action").reshape(n, rssm.action_dim)
        mask = flat.get(self.mask_key).reshape(n, -1).bool() if self.mask_key else None
        if mask is not None and not bool(mask.any(-1).all()):
            from ..pointer import AllMaskedError

            bad = (~mask.any(-1)).nonzero()[0].item()
            raise AllMaskedError(f"the env's '{self.mask_key}' allows no action in env {bad} of {n}: an env with an "
                                 "action mask must allow at least one action in every state it returns")
        deterministic = exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE,
                                               ExplorationType.MEAN)
        h, z, _ = rssm.obs_step(h, z, prev, self.world_model.embed(obs), is_first)
        if self._acting_randomly():
            action = self._random_action(n, mask, h.device)
        else:
            kwargs = {"action_mask": mask} if mask is not None else {}
            dist = self.actor(rssm.features(h, z), **kwargs)
            action = dist.mode() if deterministic else dist.sample()
            if not self.discrete:
                action = action.clamp(-1.0, 1.0)  # raw normal samples; the env gets [-1, 1] rescaled
        out = {"action": self.to_env_action(action), ("next", "deter"): h, ("next", "stoch"): z,
               ("next", "prev_action"): action}
        for key, value in out.items():
            tensordict.set(key, value.reshape(*batch_shape, *value.shape[1:]))
        if self.report_version:
            tensordict.set("policy_version", self.policy_version.expand(batch_shape).clone())
        return tensordict
