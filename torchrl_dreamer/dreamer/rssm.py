"""DreamerV3 recurrent state-space model on plain tensors (groundwork for issue 3).

Latent-state names used across the package:

| name | symbol | shape | meaning |
|---|---|---|---|
| ``deter`` | h (belief) | ``[B, D]`` | deterministic GRU state |
| ``stoch`` | z (state) | ``[B, G, C]`` | one-hot sample of ``G`` categoricals with ``C`` classes |
| ``posterior_logits`` | q(z | h, x) | ``[B, G, C]`` | from h and the observation embedding |
| ``prior_logits`` | p(z | h) | ``[B, G, C]`` | from h alone (used in imagination) |

Both distributions get 1% unimix before sampling; samples are straight-through one-hots.
``is_first`` resets h, z and the previous action to zero (the learned initial state is h = tanh(W)
as in DreamerV3, z from its prior mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "BlockLinear", "BlockGRU", "RSSM"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class BlockLinear(nn.Module):
    """``blocks`` independent linear maps over equal slices of the features (block-diagonal
    weight), as one batched matmul: ``[..., in] -> [..., out]``."""

    def __init__(self, in_features: int, out_features: int, blocks: int) -> None:
        super().__init__()
        if in_features % blocks or out_features % blocks:
            raise ValueError(f"features ({in_features}, {out_features}) must divide into {blocks} blocks")
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, in_features // blocks, out_features // blocks))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=(in_features // blocks) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)  # [blocks, N, in/b]
        out = torch.bmm(xb, self.weight).transpose(0, 1).reshape(*lead, -1)
        return out + self.bias


class BlockGRU(nn.Module):
    """DreamerV3's GRU cell: inputs and state go through Linear -> RMSNorm -> SiLU, then block-
    diagonal gates (reset, candidate, update with the -1 update bias)."""

    def __init__(self, input_dim: int, deter: int, hidden: int, blocks: int = 8) -> None:
        super().__init__()
        self.deter, self.blocks = deter, blocks
        self.inp = nn.Sequential(nn.Linear(input_dim, hidden, bias=False), RMSNorm(hidden), nn.SiLU())
        self.gates = BlockLinear(deter + blocks * hidden, 3 * deter, blocks)
        self.norm = RMSNorm(3 * deter)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        x = self.inp(x)  # [B, hidden]
        # each block sees its slice of h and the whole input
        hb = h.reshape(B, self.blocks, self.deter // self.blocks)
        xb = x.unsqueeze(1).expand(B, self.blocks, self.hidden)
        gates = self.norm(self.gates(torch.cat([hb, xb], -1).reshape(B, -1)))
        reset, cand, update = gates.chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1 - update) * h


class RSSM(nn.Module):
    """Observe (posterior) and imagine (prior) steps on plain tensors.

    Args:
        action_dim: size of the (one-hot or continuous) action vector.
        embed_dim: size of the observation embedding from the encoder.
        deter, stoch, classes, hidden, blocks: sizes (``stoch`` = G categoricals of ``classes``).
        unimix: uniform mixing of the latent distributions.
    """

    def __init__(self, action_dim: int, embed_dim: int, deter: int = 512, stoch: int = 32, classes: int = 16,
                 hidden: int = 256, blocks: int = 8, unimix: float = 0.01) -> None:
        super().__init__()
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.gru = BlockGRU(stoch * classes + action_dim, deter, hidden, blocks)
        self.init_deter = nn.Parameter(torch.zeros(deter))
        self.prior_net = nn.Sequential(nn.Linear(deter, hidden, bias=False), RMSNorm(hidden), nn.SiLU(),
                                       nn.Linear(hidden, stoch * classes))
        self.post_net = nn.Sequential(nn.Linear(deter + embed_dim, hidden, bias=False), RMSNorm(hidden), nn.SiLU(),
                                      nn.Linear(hidden, stoch * classes))

    def initial(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned initial state: ``h = tanh(init)``, ``z`` = mode of the prior at that h."""
        h = torch.tanh(self.init_deter).expand(batch, self.deter)
        if device is not None:
            h = h.to(device)
        z = F.one_hot(self.prior_logits(h).argmax(-1), self.classes).to(h.dtype)
        return h, z

    def _logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw net output -> unimixed logits ``[B, G, C]``."""
        probs = torch.softmax(raw.reshape(*raw.shape[:-1], self.stoch, self.classes), -1)
        probs = (1 - self.unimix) * probs + self.unimix / self.classes
        return probs.log()

    def prior_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(self.prior_net(h))

    def posterior_logits(self, h: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        return self._logits(self.post_net(torch.cat([h, embed], -1)))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through one-hot sample ``[B, G, C]``."""
        index = torch.distributions.Categorical(logits=logits).sample()
        hard = F.one_hot(index, self.classes).to(logits.dtype)
        probs = logits.exp()
        return hard + probs - probs.detach()

    def reset_where_first(self, h, z, prev_action, is_first):
        """Zero-state reset (to the learned initial state) where ``is_first [B]`` is True."""
        if not bool(is_first.any()):
            return h, z, prev_action
        h0, z0 = self.initial(h.shape[0], h.device)
        m = is_first.reshape(-1, 1).to(h.dtype)
        h = m * h0 + (1 - m) * h
        z = m.unsqueeze(-1) * z0 + (1 - m.unsqueeze(-1)) * z
        prev_action = (1 - m) * prev_action
        return h, z, prev_action

    def img_step(self, h: torch.Tensor, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Next deterministic state from (h, z, action)."""
        return self.gru(torch.cat([z.reshape(z.shape[0], -1), action], -1), h)

    def observe(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Posterior scan over time. ``embed [B, T, E]``, ``action [B, T, A]`` (the action taken
        *before* step t, i.e. the previous action), ``is_first [B, T]``.
        Returns ``deter [B, T, D]``, ``stoch``/``posterior_logits``/``prior_logits`` ``[B, T, G, C]``."""
        B, T = embed.shape[:2]
        if state is None:
            h, z = self.initial(B, embed.device)
            prev_action = torch.zeros_like(action[:, 0])
        else:
            h, z, prev_action = state
        outs = {"deter": [], "stoch": [], "posterior_logits": [], "prior_logits": []}
        for t in range(T):
            h, z, prev = self.reset_where_first(h, z, action[:, t], is_first[:, t])
            h = self.img_step(h, z, prev)
            prior = self.prior_logits(h)
            post = self.posterior_logits(h, embed[:, t])
            z = self.sample(post)
            for k, v in zip(outs, (h, z, post, prior)):
                outs[k].append(v)
        return {k: torch.stack(v, 1) for k, v in outs.items()}
