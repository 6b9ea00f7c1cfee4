"""DreamerV3 networks as plain ``nn.Module``s on tensors (no TensorDict inside).

* :class:`NormMLP`: ``Linear -> RMSNorm -> SiLU`` blocks (DreamerV3's MLP), optional output layer.
* :class:`VectorEncoder` / :class:`VectorDecoder`: symlog inputs, symlog-MSE reconstruction.
* :class:`ConvEncoder` / :class:`ConvDecoder`: 64x64 pixels (uint8 in storage, ``[0, 1] - 0.5`` in
  the net), stride-2 convolutions with channel RMSNorm and SiLU.
* :class:`TwoHotHead`: symexp two-hot regression head (reward, critic) with a zero-initialised
  output layer, so early predictions are exactly 0 (DreamerV3).
* :class:`ContinueHead`: Bernoulli logit of "the episode continues".
* :class:`MaskEncoder` / :class:`MaskDecoder`: an env's boolean ``action_mask`` as a world-model
  observation (encoded as 0/1 floats, predicted per action as a Bernoulli logit), so imagination
  can predict which actions an imagined state allows.
* :class:`DiscreteActor` (one-hot actions, unimix applied over the *allowed* actions before any
  mask, so masked actions get probability exactly 0) and :class:`ContinuousActor` (normal with
  bounded std, actions in ``[-1, 1]``).

Shapes: leading dims are arbitrary (``[..., F]``); convolutional modules take ``[..., C, H, W]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import TwoHot, symlog, unimix_masked_probs
from .rssm import BiasLinear, RMSNorm

__all__ = [
    "NormMLP",
    "VectorEncoder",
    "VectorDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "TwoHotHead",
    "ContinueHead",
    "MaskEncoder",
    "MaskDecoder",
    "OneHotDist",
    "BoundedNormalDist",
    "clip_action",
    "DiscreteActor",
    "ContinuousActor",
]


class NormMLP(nn.Module):
    """``layers`` x (Linear without bias -> RMSNorm -> SiLU), then an optional linear output.

    ``zero_init_output`` zeroes the output layer (reward and value heads start predicting 0)."""

    def __init__(self, in_features: int, units: int, layers: int, out_features: int | None = None,
                 *, zero_init_output: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        size = in_features
        for _ in range(layers):
            blocks += [nn.Linear(size, units, bias=False), RMSNorm(units), nn.SiLU()]
            size = units
        self.body = nn.Sequential(*blocks)
        self.out_features = size if out_features is None else out_features
        self.head = None if out_features is None else BiasLinear(size, out_features)
        if self.head is not None and zero_init_output:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return x if self.head is None else self.head(x)


class VectorEncoder(nn.Module):
    """``obs [..., obs_dim]`` -> ``embed [..., units]`` (symlog on the input)."""

    def __init__(self, obs_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.net = NormMLP(obs_dim, units, max(layers, 1))
        self.out_features = units

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"VectorEncoder expects observations [..., {self.obs_dim}], got {tuple(obs.shape)}")
        return self.net(symlog(obs))


class VectorDecoder(nn.Module):
    """``feat -> symlog(obs)`` prediction; :meth:`loss` is the symlog squared error summed over
    the observation dims (DreamerV3)."""

    def __init__(self, feat_dim: int, obs_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = NormMLP(feat_dim, units, layers, obs_dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat)

    @staticmethod
    def loss(prediction: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return (prediction - symlog(obs)).pow(2).sum(-1)


class _ChannelNorm(nn.Module):
    """RMSNorm over the channel dim of ``[N, C, H, W]``."""

    def __init__(self, channels: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.scale


def _pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0 - 0.5
    return pixels - 0.5


class ConvEncoder(nn.Module):
    """``pixels [..., 3, 64, 64]`` (uint8 or float in [0, 1]) -> ``embed [..., F]``: four stride-2
    4x4 convolutions (depth, 2d, 4d, 8d channels) down to 4x4, flattened."""

    def __init__(self, channels: int = 3, depth: int = 16, size: int = 64) -> None:
        super().__init__()
        if size != 64:
            raise ValueError("ConvEncoder is built for 64x64 images (resize in the env transform)")
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(4):
            c_out = depth * 2**i
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), _ChannelNorm(c_out), nn.SiLU()]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.out_features = c_in * 4 * 4
        self.channels = channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-3:] != (self.channels, 64, 64):
            raise ValueError(f"ConvEncoder expects pixels [..., {self.channels}, 64, 64], got {tuple(pixels.shape)}")
        lead = pixels.shape[:-3]
        x = _pixels_to_float(pixels).reshape(-1, *pixels.shape[-3:])
        return self.net(x).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """``feat -> pixels`` in ``[-0.5, 0.5]`` units; :meth:`loss` is the squared error summed over
    pixels (DreamerV3's image MSE)."""

    def __init__(self, feat_dim: int, channels: int = 3, depth: int = 16) -> None:
        super().__init__()
        self.depth = depth
        self.inp = nn.Linear(feat_dim, 8 * depth * 4 * 4)
        layers: list[nn.Module] = []
        c_in = 8 * depth
        for i in (2, 1, 0):
            c_out = depth * 2**i
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), _ChannelNorm(c_out), nn.SiLU()]
            c_in = c_out
        layers.append(nn.ConvTranspose2d(c_in, channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)
        self.channels = channels

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        lead = feat.shape[:-1]
        x = self.inp(feat.reshape(-1, feat.shape[-1])).reshape(-1, 8 * self.depth, 4, 4)
        return self.net(x).reshape(*lead, self.channels, 64, 64)

    @staticmethod
    def loss(prediction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return (prediction - _pixels_to_float(pixels)).pow(2).sum((-3, -2, -1))


class TwoHotHead(nn.Module):
    """``feat -> logits [..., bins]`` over two-hot bins (``space``: see :class:`.TwoHot`); :meth:`mean`
    decodes, :meth:`loss` is the two-hot cross-entropy (target treated as a constant)."""

    def __init__(self, feat_dim: int, units: int, layers: int, bins: int = 255, space: str = "symlog") -> None:
        super().__init__()
        self.net = NormMLP(feat_dim, units, layers, bins, zero_init_output=True)
        self.codec = TwoHot(bins, space=space)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(logits)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.codec.loss(logits, target)


class ContinueHead(nn.Module):
    """``feat -> logit`` of continuing (1 - terminal)."""

    def __init__(self, feat_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = NormMLP(feat_dim, units, layers, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat).squeeze(-1)

    @staticmethod
    def loss(logit: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit, cont, reduction="none")


class MaskEncoder(nn.Module):
    """``mask [..., A]`` (bool, True = allowed) -> ``embed [..., units]``."""

    def __init__(self, action_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = NormMLP(action_dim, units, max(layers, 1))
        self.out_features = units

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[-1] != self.action_dim:
            raise ValueError(f"MaskEncoder expects action masks [..., {self.action_dim}], got {tuple(mask.shape)}")
        return self.net(mask.to(self.net.body[0].weight.dtype))


class MaskDecoder(nn.Module):
    """``feat -> [..., A]`` logits of "this action is allowed"; :meth:`loss` is the binary cross
    entropy summed over actions, :meth:`predict` the boolean mask (always at least one action
    allowed: the most likely one, so an imagined state never has an empty action set)."""

    def __init__(self, feat_dim: int, action_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = NormMLP(feat_dim, units, layers, action_dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat)

    @staticmethod
    def loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype), reduction="none").sum(-1)

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        best = F.one_hot(logits.argmax(-1), logits.shape[-1]).bool()
        return (logits > 0) | best


class OneHotDist:
    """Categorical distribution over one-hot actions, from probabilities (masked entries exactly 0)."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs

    def __getitem__(self, index) -> "OneHotDist":
        """The distribution at ``index`` over the batch dims (e.g. ``dist[:, :-1]``)."""
        return OneHotDist(self.probs[index])

    def sample(self) -> torch.Tensor:
        flat = self.probs.reshape(-1, self.probs.shape[-1])
        index = torch.multinomial(flat.detach(), 1).reshape(self.probs.shape[:-1])
        return F.one_hot(index, self.probs.shape[-1]).to(self.probs.dtype)

    def sample_from_noise(self, gumbel: torch.Tensor) -> torch.Tensor:
        """Sample with given standard Gumbel noise (Gumbel-max: ``argmax(log p + g)``); a masked
        action (``p = 0``, ``log p = -inf``) is never chosen. Lets a compiled graph take its
        randomness as an input instead of running a random op per step."""
        index = (self.probs.detach().log() + gumbel).argmax(-1)
        return F.one_hot(index, self.probs.shape[-1]).to(self.probs.dtype)

    noise_kind = "gumbel"

    def mode(self) -> torch.Tensor:
        return F.one_hot(self.probs.argmax(-1), self.probs.shape[-1]).to(self.probs.dtype)

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """``log p(action)`` for one-hot ``action``; finite for any action the mask allows, since
        unimix keeps every allowed probability >= unimix / n_allowed."""
        return torch.log((self.probs * action).sum(-1))

    def entropy(self) -> torch.Tensor:
        # 0 log 0 = 0 for masked actions; the where() sits on the input of log, so no NaN gradient
        safe = torch.where(self.probs > 0, self.probs, torch.ones_like(self.probs))
        return -(self.probs * safe.log()).sum(-1)


class BoundedNormalDist:
    """Normal with the std bounded by the actor. Samples are *not* clipped here: the log-prob of a
    clipped sample is biased (clipped samples sit closer to the mean than drawn, so
    ``E[d log p / d log std] < 0`` and any non-zero mean advantage pushes the std to a bound).
    Callers clip where the action leaves the actor (:func:`clip_action`: env, RSSM input)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def __getitem__(self, index) -> "BoundedNormalDist":
        """The distribution at ``index`` over the batch dims (e.g. ``dist[:, :-1]``)."""
        return BoundedNormalDist(self.mean[index], self.std[index])

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def rsample(self) -> torch.Tensor:
        """Reparameterised sample (gradients flow to mean and std)."""
        return self.mean + self.std * torch.randn_like(self.mean)

    def sample_from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """``mean + std * eps`` for given standard normal ``eps`` (reparameterised)."""
        return self.mean + self.std * eps

    noise_kind = "normal"

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        return (-(action - self.mean).pow(2) / (2 * self.std.pow(2)) - self.std.log()
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (0.5 + 0.5 * math.log(2 * math.pi) + self.std.log()).sum(-1)


def clip_action(action: torch.Tensor) -> torch.Tensor:
    """``action`` clipped to ``[-1, 1]`` with a straight-through gradient (identity on one-hot)."""
    return action + (action.clamp(-1.0, 1.0) - action).detach()


class DiscreteActor(nn.Module):
    """Categorical policy over ``n_actions`` with 1% unimix.

    The mix is taken over the allowed actions only (:func:`unimix_masked_probs`): a masked action
    has probability exactly 0 and every allowed one at least ``unimix / n_allowed``, so log-probs
    are finite however peaked the logits are.
    ``forward(feat, action_mask=None) -> OneHotDist``."""

    discrete = True

    def __init__(self, feat_dim: int, n_actions: int, units: int, layers: int, unimix: float = 0.01) -> None:
        super().__init__()
        self.action_dim, self.unimix = n_actions, unimix
        self.net = NormMLP(feat_dim, units, layers, n_actions)

    def forward(self, feat: torch.Tensor, action_mask: torch.Tensor | None = None) -> OneHotDist:
        return OneHotDist(unimix_masked_probs(self.net(feat), action_mask, self.unimix))


class ContinuousActor(nn.Module):
    """Normal policy with mean ``tanh(.)`` and std in ``[min_std, max_std]`` (DreamerV3's bounded
    normal); actions live in ``[-1, 1]`` (the policy module rescales to the env's bounds).
    ``forward(feat) -> BoundedNormalDist``."""

    discrete = False

    def __init__(self, feat_dim: int, action_dim: int, units: int, layers: int,
                 min_std: float = 0.1, max_std: float = 1.0) -> None:
        super().__init__()
        self.action_dim, self.min_std, self.max_std = action_dim, min_std, max_std
        self.net = NormMLP(feat_dim, units, layers, 2 * action_dim)

    def forward(self, feat: torch.Tensor, action_mask: torch.Tensor | None = None) -> BoundedNormalDist:
        if action_mask is not None:
            raise ValueError("ContinuousActor does not take an action mask")
        mean, std = self.net(feat).chunk(2, -1)
        return BoundedNormalDist(torch.tanh(mean), (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std)
