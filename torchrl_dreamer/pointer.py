"""Attention (pointer-network) policy for routing: encode the instance once, decode many steps.

* :class:`RoutingEncoder`: node features -> transformer layers -> node embeddings ``[B, N, d]``
  and the graph embedding (their mean). Run once per episode (or once per PPO minibatch of
  episodes), never per decoding step.
* :class:`PointerDecoder`: the step context (graph embedding, first node, current node; CVRP:
  current node and remaining capacity) queries the nodes through one multi-head glimpse, then a
  single-head compatibility with ``tanh`` clipping gives the logits over nodes. Keys and values
  of the nodes are projected once per episode (:meth:`PointerDecoder.precompute`).
* :class:`PointerActorCritic`: both, plus a value head on ``[graph, glimpse]``.

Masking: logits of masked nodes are set to ``-inf`` *after* every other transform, so their
probability is exactly 0; a row with no allowed node raises :class:`AllMaskedError` instead of
producing NaN. All methods take plain tensors; shapes are in the docstrings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["AllMaskedError", "RoutingEncoder", "PointerDecoder", "PointerActorCritic", "DecoderCache", "masked_log_softmax"]


class AllMaskedError(ValueError):
    """Every action of some row is masked: there is nothing to choose."""


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim with masked entries at exactly ``-inf`` (probability 0).

    Raises :class:`AllMaskedError` naming the first bad row if a row has no allowed entry.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    allowed_any = mask.any(-1)
    if not bool(allowed_any.all()):
        bad = (~allowed_any).nonzero()[0].tolist()
        raise AllMaskedError(f"every action is masked at index {bad} (shape {tuple(mask.shape[:-1])})")
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


class RoutingEncoder(nn.Module):
    """Node features -> embeddings. TSP nodes: ``(x, y)``. CVRP: the depot ``(x, y)`` and customers
    ``(x, y, demand / capacity)`` get separate input layers (the depot is node 0)."""

    def __init__(
        self,
        problem: Literal["tsp", "cvrp"],
        embed_dim: int = 128,
        n_layers: int = 3,
        n_heads: int = 8,
        ff_dim: int = 512,
    ) -> None:
        super().__init__()
        if problem not in ("tsp", "cvrp"):
            raise ValueError(f"problem must be 'tsp' or 'cvrp', got '{problem}'")
        self.problem = problem
        self.embed_dim = embed_dim
        self.node_in = nn.Linear(2 if problem == "tsp" else 3, embed_dim)
        self.depot_in = nn.Linear(2, embed_dim) if problem == "cvrp" else None
        layer = nn.TransformerEncoderLayer(
            embed_dim, n_heads, dim_feedforward=ff_dim, dropout=0.0, batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, locs: torch.Tensor, demand: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``locs [B, N, 2]`` (CVRP: depot first), ``demand [B, N]`` (CVRP, fraction of capacity,
        0 at the depot) -> node embeddings ``[B, N, d]``, graph embedding ``[B, d]``."""
        if locs.ndim != 3 or locs.shape[-1] != 2:
            raise ValueError(f"locs must be [B, N, 2], got {tuple(locs.shape)}")
        if self.problem == "tsp":
            h = self.node_in(locs)
        else:
            if demand is None or demand.shape != locs.shape[:2]:
                raise ValueError("CVRP encoder needs demand [B, N] matching locs")
            customers = self.node_in(torch.cat([locs[:, 1:], demand[:, 1:, None]], dim=-1))
            h = torch.cat([self.depot_in(locs[:, :1]), customers], dim=1)
        if h.device.type == "cpu":
            # PyTorch's CPU flash-attention kernel is slower than plain matmuls at routing sizes
            # (20-100 tokens): 130 vs 145 ms per PPO minibatch of 128 TSP20 episodes, 2 threads.
            with sdpa_kernel(SDPBackend.MATH):
                h = self.layers(h)
        else:
            h = self.layers(h)
        h = self.norm(h)
        return h, h.mean(1)


@dataclass
class DecoderCache:
    """Per-episode projections of the node embeddings (computed once, reused every step)."""

    node_emb: torch.Tensor  # [B, N, d]
    graph: torch.Tensor  # [B, d]
    glimpse_k: torch.Tensor  # [B, H, N, d/H]
    glimpse_v: torch.Tensor  # [B, H, N, d/H]
    logit_k: torch.Tensor  # [B, N, d]


class PointerDecoder(nn.Module):
    """Context -> glimpse -> clipped pointer logits (Kool et al. 2019 style).

    The context is ``[graph, emb(first), emb(current)]`` for TSP (learned placeholders before the
    first move) and ``[graph, emb(current), remaining_capacity]`` for CVRP.

    Step inputs are ``[B, T]`` (``T`` decoding steps of the same ``B`` episodes, e.g. a whole
    stored trajectory during PPO) against a ``[B]`` cache: attention runs as ``B x H`` matmuls of
    ``[T, d/H] @ [d/H, N]``, never as ``B x T`` tiny ones over an expanded cache.
    """

    def __init__(self, problem: Literal["tsp", "cvrp"], embed_dim: int = 128, n_heads: int = 8,
                 tanh_clip: float = 10.0, extra_dim: int = 0) -> None:
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by n_heads {n_heads}")
        self.problem = problem
        self.d, self.h = embed_dim, n_heads
        self.tanh_clip = tanh_clip
        self.extra_dim = extra_dim  # extra query inputs appended to the context (e.g. a Dreamer latent)
        context_dim = (3 * embed_dim if problem == "tsp" else 2 * embed_dim + 1) + extra_dim
        self.project_context = nn.Linear(context_dim, embed_dim, bias=False)
        self.project_nodes = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.project_out = nn.Linear(embed_dim, embed_dim, bias=False)
        if problem == "tsp":
            self.placeholder = nn.Parameter(torch.empty(2 * embed_dim).uniform_(-1, 1))

    def precompute(self, node_emb: torch.Tensor, graph: torch.Tensor) -> DecoderCache:
        B, N, _ = node_emb.shape
        k, v, logit_k = self.project_nodes(node_emb).chunk(3, dim=-1)
        heads = lambda t: t.view(B, N, self.h, self.d // self.h).transpose(1, 2)  # noqa: E731
        return DecoderCache(node_emb, graph, heads(k).contiguous(), heads(v).contiguous(), logit_k)

    def context(self, cache: DecoderCache, current_node: torch.Tensor, first_node: torch.Tensor | None,
                remaining_capacity: torch.Tensor | None) -> torch.Tensor:
        """``current_node``/``first_node`` ``[B, T]`` int64 (``-1`` = none yet), capacity
        ``[B, T, 1]``. Returns ``[B, T, context_dim]``."""
        B, T = current_node.shape

        def node(idx: torch.Tensor) -> torch.Tensor:
            safe = idx.clamp_min(0)
            return cache.node_emb.gather(1, safe.unsqueeze(-1).expand(B, T, self.d))

        graph = cache.graph.unsqueeze(1).expand(B, T, self.d)
        if self.problem == "tsp":
            pair = torch.cat([node(first_node), node(current_node)], dim=-1)
            started = (current_node >= 0).unsqueeze(-1)
            pair = torch.where(started, pair, self.placeholder.expand_as(pair))
            return torch.cat([graph, pair], dim=-1)
        return torch.cat([graph, node(current_node), remaining_capacity], dim=-1)

    def forward(self, cache: DecoderCache, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [B, T, context_dim]``, ``mask [B, T, N]`` -> (masked log-probs ``[B, T, N]``,
        glimpse ``[B, T, d]``)."""
        logits, glimpse = self.logits(cache, context, mask)
        return masked_log_softmax(logits, mask), glimpse

    def logits(self, cache: DecoderCache, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped pointer logits ``[B, T, N]`` *before* masking (masked nodes still only enter
        the glimpse's attention as ``-inf``), and the glimpse. Callers mask the logits themselves,
        e.g. with unimix over the allowed nodes."""
        B, T, _ = context.shape
        dh = self.d // self.h
        q = self.project_context(context).view(B, T, self.h, dh).transpose(1, 2)  # [B, H, T, dh]
        scores = (q @ cache.glimpse_k.transpose(-1, -2)) / math.sqrt(dh)  # [B, H, T, N]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        glimpse = torch.softmax(scores, dim=-1) @ cache.glimpse_v  # [B, H, T, dh]
        glimpse = self.project_out(glimpse.transpose(1, 2).reshape(B, T, self.d))
        logits = (glimpse @ cache.logit_k.transpose(-1, -2)) / math.sqrt(self.d)  # [B, T, N]
        return self.tanh_clip * torch.tanh(logits), glimpse


class PointerActorCritic(nn.Module):
    """Encoder + pointer decoder + value head. The value of a state is
    ``MLP([graph, glimpse])``, in units of tour length (the recipe scales rewards)."""

    def __init__(self, problem: Literal["tsp", "cvrp"], embed_dim: int = 128, n_layers: int = 3,
                 n_heads: int = 8, ff_dim: int = 512, tanh_clip: float = 10.0) -> None:
        super().__init__()
        self.problem = problem
        self.encoder = RoutingEncoder(problem, embed_dim, n_layers, n_heads, ff_dim)
        self.decoder = PointerDecoder(problem, embed_dim, n_heads, tanh_clip)
        self.value_head = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def encode(self, locs: torch.Tensor, demand: torch.Tensor | None = None) -> DecoderCache:
        return self.decoder.precompute(*self.encoder(locs, demand))

    def step(self, cache: DecoderCache, current_node, first_node, remaining_capacity, mask):
        """Decoding step(s) against a ``[B]`` cache: inputs ``[B]`` (one step; ``mask [B, N]``,
        capacity ``[B, 1]``) or ``[B, T]`` (``T`` steps; ``mask [B, T, N]``, capacity ``[B, T, 1]``).
        Returns ``(log_probs [..., N], value [..., 1])`` with the inputs' leading shape."""
        single = current_node.ndim == 1
        if single:
            current_node = current_node.unsqueeze(1)
            first_node = first_node.unsqueeze(1) if first_node is not None else None
            remaining_capacity = remaining_capacity.unsqueeze(1) if remaining_capacity is not None else None
            mask = mask.unsqueeze(1)
        ctx = self.decoder.context(cache, current_node, first_node, remaining_capacity)
        log_probs, glimpse = self.decoder(cache, ctx, mask)
        graph = cache.graph.unsqueeze(1).expand_as(glimpse)
        value = self.value_head(torch.cat([graph, glimpse], dim=-1))
        if single:
            return log_probs.squeeze(1), value.squeeze(1)
        return log_probs, value
