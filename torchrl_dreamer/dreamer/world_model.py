"""The DreamerV3 world model: encoders -> RSSM -> decoders, reward and continue heads.

Plain ``nn.Module`` on tensors. Observations are a dict ``{name: tensor}`` with one encoder and one
decoder per name (``"observation"`` for vectors, ``"pixels"`` for 64x64 images); the embedding
given to the RSSM is the concatenation of the encoders' outputs in sorted-name order.

Data layout (one row per environment state, DreamerV3 style):

| key | shape | at row t |
|---|---|---|
| observations | ``[B, T, ...]`` | x_t |
| ``action`` | ``[B, T, A]`` | a_t, the action *taken at* x_t (zeros on the last row of an episode) |
| ``reward`` | ``[B, T]`` | r_t, received on arriving at x_t (0 on the first row) |
| ``is_first`` | ``[B, T]`` | x_t starts an episode |
| ``is_terminal`` | ``[B, T]`` | x_t is terminal (the continue target is ``1 - is_terminal``) |

The RSSM consumes the *previous* action a_{t-1} at step t: :meth:`DreamerWorldModel.observe` shifts the
actions right by one (zero at the start of a slice and wherever ``is_first``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .nets import ContinueHead, TwoHotHead
from .rssm import RSSM

__all__ = ["DreamerWorldModel", "shift_actions"]


def shift_actions(action: torch.Tensor, first_prev: torch.Tensor | None = None) -> torch.Tensor:
    """``a_t`` for t=0..T-1 -> previous actions ``a_{t-1}`` (``first_prev`` or zeros at t=0)."""
    head = torch.zeros_like(action[:, :1]) if first_prev is None else first_prev.unsqueeze(1)
    return torch.cat([head, action[:, :-1]], 1)


class DreamerWorldModel(nn.Module):
    """Encoders, RSSM, decoders and the reward / continue heads.

    Args:
        encoders: ``{obs name: module}``; each maps ``[..., *obs_shape]`` to ``[..., E_i]``.
        decoders: ``{obs name: module}`` with a ``loss(prediction, target) -> [...]`` static method.
        rssm: the :class:`RSSM` (its ``embed_dim`` must be ``sum(E_i)``).
        reward_head: :class:`TwoHotHead`.
        continue_head: :class:`ContinueHead`.
        mask_key: the observation that is the env's boolean action mask (its decoder is a
            :class:`~.nets.MaskDecoder`), or ``None``.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], decoders: Mapping[str, nn.Module], rssm: RSSM,
                 reward_head: TwoHotHead, continue_head: ContinueHead, mask_key: str | None = None) -> None:
        super().__init__()
        if set(encoders) != set(decoders):
            raise ValueError(f"encoders {sorted(encoders)} and decoders {sorted(decoders)} must cover the same keys")
        self.obs_names = sorted(encoders)
        self.encoders = nn.ModuleDict({k: encoders[k] for k in self.obs_names})
        self.decoders = nn.ModuleDict({k: decoders[k] for k in self.obs_names})
        self.rssm = rssm
        self.reward_head = reward_head
        self.continue_head = continue_head
        if mask_key is not None and mask_key not in self.obs_names:
            raise ValueError(f"mask_key '{mask_key}' is not one of the observations {self.obs_names}")
        self.mask_key = mask_key

    @property
    def feat_dim(self) -> int:
        return self.rssm.feat_dim

    def embed(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.obs_names if k not in obs]
        if missing:
            raise KeyError(f"world model needs observations {self.obs_names}; missing {missing}")
        return torch.cat([self.encoders[k](obs[k]) for k in self.obs_names], -1)

    def observe(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor, is_first: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Posterior states of a ``[B, T]`` slice. ``action`` is a_t (taken at row t).

        ``state = (h, z, prev_action)`` continues from a carried state; ``None`` starts from the
        initial state. ``noise``: the posterior samples' Gumbel noise (see :meth:`RSSM.observe`). Returns ``embed``, ``deter``, ``stoch``, ``posterior_logits``,
        ``prior_logits`` and ``feat`` (``[B, T, D + G*C]``)."""
        if action.ndim != 3 or is_first.shape != action.shape[:2]:
            raise ValueError(
                f"expected action [B, T, A] and is_first [B, T]; got {tuple(action.shape)}, {tuple(is_first.shape)}"
            )
        embed = self.embed(obs)
        prev = shift_actions(action, None if state is None else state[2])
        out = self.rssm.observe(embed, prev, is_first, None if state is None else state[:2], noise)
        out["embed"] = embed
        out["feat"] = self.rssm.features(out["deter"], out["stoch"])
        return out

    def reconstruction_losses(self, feat: torch.Tensor, obs: Mapping[str, torch.Tensor],
                              out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-observation reconstruction loss ``[B, T]`` (sum over the observation's dims).
        ``out`` is what :meth:`observe` returned (subclasses may need more than ``feat``)."""
        return {k: self.decoders[k].loss(self.decoders[k](feat), obs[k]) for k in self.obs_names}
