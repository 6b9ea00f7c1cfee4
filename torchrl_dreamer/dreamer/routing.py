"""DreamerV3 on routing problems (TSP, CVRP): static context carried, masks exact, pointer actor.

Three things a routing world model easily gets wrong, and how this module avoids them:

* **Static context is carried, not predicted.** Coordinates (CVRP: demands, depot) do not change
  within an episode. The pointer encoder of the PPO baseline (:class:`~torchrl_dreamer.pointer.RoutingEncoder`)
  encodes them once per episode; the node embeddings and the graph embedding are passed unchanged
  to the world model, imagination, the actor and the critic. The RSSM models what changes.
* **Masks in imagination are exact.** :class:`RoutingHooks` keeps the visited set, current/first
  node and (CVRP) remaining capacity of every imagined trajectory and updates them from each
  imagined action with the env's own rules, so the imagined ``action_mask`` equals the env's for
  the same action sequence (tested). The learned visited head is a diagnostic only
  (``diag/imagined_mask_accuracy``). Unimix is applied over the allowed nodes only, so a masked
  node has probability exactly 0 and every log-prob is finite; ``diag/imagined_invalid_action_rate``
  counts imagined actions outside the exact mask and must be 0.
* **Reward in imagination:** the reward head by default, or ``known_reward``: the leg length from
  the carried coordinates (the objective is known), with the env's conventions (TSP: no leg on the
  first move, closing leg added on the last; CVRP: every leg). Termination is exact either way.

Features of a state for every head, the critic and the actor: ``[h, z, graph, unvisited-mean,
state scalars]`` where ``unvisited-mean`` is the mean embedding of the nodes still allowed and the
scalars are the step fraction and (CVRP) remaining capacity, with ``load_features`` also the
unserved demand and the unvisited-customer fraction: the latent plus exact bookkeeping. The actor
reads the world model's node embeddings (detached), or with ``actor_encoder`` encodes each
instance itself with an encoder that the actor loss trains.

Actions are one-hot over the nodes; the RSSM's action input is a projection of the chosen node's
embedding, so the same networks work for any problem size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import nn

from ..pointer import DecoderCache, PointerDecoder, RoutingEncoder
from .functional import unimix_masked_probs
from .imagination import ImaginationHooks
from .nets import ContinueHead, NormMLP, OneHotDist, TwoHotHead
from .rssm import RSSM, RMSNorm
from .world_model import DreamerWorldModel, shift_actions

__all__ = ["RoutingSizes", "RoutingWorldModel", "PointerActor", "RoutingHooks", "routing_mask", "make_routing_agent"]

OBS_NAMES = ("locs", "demand", "visited", "current_node", "first_node", "remaining_capacity", "step_fraction")


@dataclass(frozen=True)
class RoutingSizes:
    embed_dim: int = 128
    encoder_layers: int = 3
    heads: int = 8
    ff_dim: int = 512
    deter: int = 256
    hidden: int = 128
    units: int = 128
    layers: int = 1
    stoch: int = 16
    classes: int = 16
    blocks: int = 4
    action_dim: int = 32
    bins: int = 255
    tanh_clip: float = 10.0
    load_features: bool = False   # CVRP: unserved demand and unvisited-customer fraction as exact state scalars
    actor_encoder: bool = False   # the actor encodes the instance itself (trained by the actor loss)


def routing_mask(problem: str, visited: torch.Tensor, current: torch.Tensor, remaining: torch.Tensor | None,
                 demand: torch.Tensor | None, done: torch.Tensor) -> torch.Tensor:
    """The env's legal moves (``envs.routing``), from its state: ``visited [N, n]`` bool,
    ``current [N]`` (-1 before the first TSP move), ``remaining [N]``/``demand [N, n]`` (CVRP,
    fractions of the capacity), ``done [N]``. A finished trajectory allows only its current node."""
    if problem == "tsp":
        mask = ~visited
    else:
        fits = demand <= remaining.unsqueeze(-1) + 1e-6
        mask = ~visited & fits
        all_served = visited[:, 1:].all(1)
        at_depot = current == 0
        mask[:, 0] = (~at_depot | all_served) & ~(at_depot & all_served)
    finished = F.one_hot(current.clamp_min(0), visited.shape[-1]).bool()
    return torch.where(done.unsqueeze(-1), finished, mask)


def _gather_nodes(node_emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``node_emb [B, n, d]``, ``index [B, *S]`` (-1 = none: zeros) -> ``[B, *S, d]``."""
    B, n, d = node_emb.shape
    flat = index.reshape(B, -1)
    out = node_emb.gather(1, flat.clamp_min(0).unsqueeze(-1).expand(B, flat.shape[1], d))
    out = out * (flat >= 0).unsqueeze(-1).to(out.dtype)
    return out.reshape(*index.shape, d)


class RoutingWorldModel(DreamerWorldModel):
    """World model for TSP / CVRP with the instance encoder as carried static context.

    Observations (``[B, T, ...]``; static ones repeated over time): ``locs [n, 2]`` (CVRP: depot
    first), ``demand [n]`` (CVRP), ``visited [n]``, ``current_node``/``first_node`` (int, -1 =
    none), ``remaining_capacity`` (CVRP), ``step_fraction``. Actions: one-hot ``[B, T, n]``.
    Reconstruction targets: the visited set (per-node Bernoulli, pointer-style logits against the
    node embeddings) and the current node (categorical over nodes).
    """

    def __init__(self, problem: Literal["tsp", "cvrp"], sizes: RoutingSizes, unimix: float = 0.01) -> None:
        nn.Module.__init__(self)
        self.problem = problem
        self.sizes = s = sizes
        self.obs_names = [n for n in OBS_NAMES if problem == "cvrp" or n not in ("demand", "remaining_capacity")]
        self.encoder = RoutingEncoder(problem, s.embed_dim, s.encoder_layers, s.heads, s.ff_dim)
        n_scalars = (4 if s.load_features else 2) if problem == "cvrp" else 1
        self.n_scalars = n_scalars
        # observation embedding from what changes: current / first node, unvisited mean, scalars
        self.step_embed = NormMLP(3 * s.embed_dim + n_scalars, s.units, max(1, s.layers))
        self.action_proj = nn.Linear(s.embed_dim, s.action_dim, bias=False)
        self.rssm = RSSM(s.action_dim, s.units, s.deter, s.stoch, s.classes, s.hidden, s.blocks, unimix)
        self.context_proj = nn.Sequential(nn.Linear(2 * s.embed_dim + n_scalars, s.units, bias=False), RMSNorm(s.units),
                                          nn.SiLU())
        feat = self.feat_dim
        self.visited_query = nn.Linear(feat, s.embed_dim)
        self.current_query = nn.Linear(feat, s.embed_dim)
        self.reward_head = TwoHotHead(feat, s.units, s.layers, s.bins)
        self.continue_head = ContinueHead(feat, s.units, s.layers)
        self.encoders = nn.ModuleDict()  # the generic per-observation encoders/decoders are unused
        self.decoders = nn.ModuleDict()

    @property
    def feat_dim(self) -> int:
        return self.rssm.feat_dim + self.sizes.units

    # --- static context ----------------------------------------------------------------------
    def encode_instance(self, locs: torch.Tensor, demand: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``locs [B, n, 2]`` (+ ``demand [B, n]``) -> node embeddings ``[B, n, d]``, graph ``[B, d]``."""
        return self.encoder(locs, demand if self.problem == "cvrp" else None)

    def action_vector(self, action: torch.Tensor, node_emb: torch.Tensor) -> torch.Tensor:
        """One-hot ``action [B, *S, n]`` -> RSSM action input ``[B, *S, action_dim]``."""
        B, n, d = node_emb.shape
        flat = action.reshape(B, -1, n)
        return self.action_proj(torch.bmm(flat, node_emb)).reshape(*action.shape[:-1], -1)

    def _scalars(self, step_fraction: torch.Tensor, remaining: torch.Tensor | None,
                 visited: torch.Tensor | None = None, demand: torch.Tensor | None = None) -> torch.Tensor:
        """``[.., n_scalars]``: step fraction; CVRP: remaining capacity and, with
        ``sizes.load_features``, the unserved demand (in vehicle loads: how many depot trips are left)
        and the fraction of customers still unvisited. ``demand [B, n]`` or shaped like ``visited``."""
        parts = [step_fraction.unsqueeze(-1)]
        if self.problem == "cvrp":
            parts.append(remaining.unsqueeze(-1))
            if self.sizes.load_features:
                if demand is None or visited is None:
                    raise ValueError("load_features needs the visited set and the demands")
                open_ = (~visited.bool()).to(step_fraction.dtype)
                if demand.ndim < open_.ndim:  # [B, n] against [B, *S, n]
                    demand = demand.reshape(demand.shape[0], *([1] * (open_.ndim - 2)), demand.shape[-1])
                parts.append((demand * open_).sum(-1, keepdim=True))
                parts.append(open_[..., 1:].mean(-1, keepdim=True))
        return torch.cat(parts, -1)

    def _unvisited_mean(self, node_emb: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the nodes in ``allowed [B, *S, n]`` -> ``[B, *S, d]``."""
        B, n, d = node_emb.shape
        w = allowed.reshape(B, -1, n).to(node_emb.dtype)
        w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
        return torch.bmm(w, node_emb).reshape(*allowed.shape[:-1], d)

    def step_embedding(self, node_emb, current, first, visited, step_fraction, remaining, demand=None):
        """Embedding of the dynamic observation ``[B, *S, units]``."""
        scalars = self._scalars(step_fraction, remaining, visited, demand)
        x = torch.cat([_gather_nodes(node_emb, current), _gather_nodes(node_emb, first),
                       self._unvisited_mean(node_emb, ~visited), scalars], -1)
        return self.step_embed(x)

    def context_features(self, graph, node_emb, visited, step_fraction, remaining, demand=None) -> torch.Tensor:
        """Carried context part of the features ``[B, *S, units]`` (graph, unvisited mean, scalars)."""
        lead = visited.shape[:-1]
        g = graph.reshape(graph.shape[0], *([1] * (len(lead) - 1)), -1).expand(*lead, -1)
        return self.context_proj(torch.cat([g, self._unvisited_mean(node_emb, ~visited),
                                            self._scalars(step_fraction, remaining, visited, demand)], -1))

    def full_features(self, deter, stoch, context_feat) -> torch.Tensor:
        return torch.cat([self.rssm.features(deter, stoch), context_feat], -1)

    # --- DreamerWorldModel interface -------------------------------------------------------------------
    def observe(self, obs: Mapping[str, torch.Tensor], action: torch.Tensor, is_first: torch.Tensor,
                state=None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``obs``: the routing observations ``[B, T, ...]`` (every row of a sequence belongs to
        one instance: sequences are whole episodes). ``action``: one-hot ``[B, T, n]``. ``noise``:
        the posterior samples' Gumbel noise (see :meth:`RSSM.observe`)."""
        if state is not None:
            raise ValueError("RoutingWorldModel.observe starts every sequence at an episode start")
        locs = obs["locs"][:, 0]
        demand = obs["demand"][:, 0] if self.problem == "cvrp" else None
        node_emb, graph = self.encode_instance(locs, demand)
        visited = obs["visited"].bool()
        remaining = obs.get("remaining_capacity")
        remaining = remaining.squeeze(-1) if remaining is not None and remaining.ndim == 3 else remaining
        step_fraction = obs["step_fraction"].squeeze(-1) if obs["step_fraction"].ndim == 3 else obs["step_fraction"]
        current = obs["current_node"].reshape(visited.shape[:2])
        first = obs["first_node"].reshape(visited.shape[:2])
        embed = self.step_embedding(node_emb, current, first, visited, step_fraction, remaining, demand)
        prev = shift_actions(self.action_vector(action, node_emb))
        out = self.rssm.observe(embed, prev, is_first, noise=noise)
        ctx = self.context_features(graph, node_emb, visited, step_fraction, remaining, demand)
        out.update(embed=embed, node_emb=node_emb, graph=graph, feat=self.full_features(out["deter"], out["stoch"], ctx))
        T = action.shape[1]
        # the instance context travels with each posterior state into imagination (views, no copy)
        out["carry"] = {"node_emb": node_emb.unsqueeze(1).expand(-1, T, -1, -1),
                        "graph": graph.unsqueeze(1).expand(-1, T, -1)}
        return out

    def visited_logits(self, feat: torch.Tensor, node_emb: torch.Tensor) -> torch.Tensor:
        """Learned visited head (diagnostic): ``feat [B, *S, F]`` -> ``[B, *S, n]``."""
        B, n, d = node_emb.shape
        q = self.visited_query(feat).reshape(B, -1, d)
        return (torch.bmm(q, node_emb.transpose(1, 2)) / d**0.5).reshape(*feat.shape[:-1], n)

    def reconstruction_losses(self, feat: torch.Tensor, obs: Mapping[str, torch.Tensor],
                              out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        node_emb = out["node_emb"]
        B, n, d = node_emb.shape
        visited = obs["visited"].to(feat.dtype)
        loss_visited = F.binary_cross_entropy_with_logits(self.visited_logits(feat, node_emb), visited,
                                                          reduction="none").sum(-1)
        q = self.current_query(feat).reshape(B, -1, d)
        current_logits = (torch.bmm(q, node_emb.transpose(1, 2)) / d**0.5).reshape(*feat.shape[:-1], n)
        current = obs["current_node"].reshape(feat.shape[:-1])
        loss_current = F.cross_entropy(current_logits.reshape(-1, n), current.clamp_min(0).reshape(-1),
                                       reduction="none").reshape(current.shape) * (current >= 0).to(feat.dtype)
        return {"visited": loss_visited, "current_node": loss_current}


class PointerActor(nn.Module):
    """Pointer-network policy over nodes, queried by the latent features and the exact state.

    The query is ``[graph, emb(first), emb(current)]`` (CVRP: ``[graph, emb(current), capacity]``)
    plus the state features; one glimpse over the node embeddings, ``tanh``-clipped logits, then
    1% unimix over the *allowed* nodes (masked ones get probability exactly 0).
    ``forward(feat, action_mask, current_node, first_node[, remaining_capacity], **cache)`` with
    ``feat [N, F]`` (one step) or ``[N, T, F]`` (stored steps) against a per-trajectory cache
    (:meth:`precompute`) returns a :class:`~.nets.OneHotDist` over ``[.., n]``.
    """

    discrete = True

    def __init__(self, problem: Literal["tsp", "cvrp"], feat_dim: int, sizes: RoutingSizes, unimix: float = 0.01) -> None:
        super().__init__()
        self.problem, self.unimix = problem, unimix
        self.feat_in = nn.Sequential(nn.Linear(feat_dim, sizes.embed_dim, bias=False), RMSNorm(sizes.embed_dim), nn.SiLU())
        self.decoder = PointerDecoder(problem, sizes.embed_dim, sizes.heads, sizes.tanh_clip, extra_dim=sizes.embed_dim)
        # sizes.actor_encoder: the actor's own instance encoder, trained by the actor loss (as the PPO
        # baseline's); otherwise the actor reads the world model's node embeddings (trained by the
        # world-model loss only, detached here)
        self.encoder = (RoutingEncoder(problem, sizes.embed_dim, sizes.encoder_layers, sizes.heads, sizes.ff_dim)
                        if sizes.actor_encoder else None)

    CONTEXT_KEYS = ("actor_node_emb", "actor_graph", "glimpse_k", "glimpse_v", "logit_k")

    def precompute(self, node_emb: torch.Tensor, graph: torch.Tensor, locs: torch.Tensor | None = None,
                   demand: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-trajectory actor context. ``node_emb``/``graph``: the world model's (returned unchanged
        under those names, for the features); with its own encoder the actor encodes ``locs``
        (``demand``) itself, once per distinct instance among the rows."""
        a_emb, a_graph = node_emb, graph
        if self.encoder is not None:
            if locs is None:
                raise ValueError("an actor with its own encoder needs the instances' locs (and demand)")
            key = locs.reshape(locs.shape[0], -1) if demand is None else torch.cat([locs.reshape(locs.shape[0], -1), demand], -1)
            unique, inverse = torch.unique(key, dim=0, return_inverse=True)
            n = locs.shape[1]
            u_locs = unique[:, : 2 * n].reshape(-1, n, 2)
            u_demand = None if demand is None else unique[:, 2 * n:]
            u_emb, u_graph = self.encoder(u_locs, u_demand)
            a_emb, a_graph = u_emb[inverse], u_graph[inverse]
        c = self.decoder.precompute(a_emb, a_graph)
        return {"node_emb": node_emb, "graph": graph, "actor_node_emb": c.node_emb, "actor_graph": c.graph,
                "glimpse_k": c.glimpse_k, "glimpse_v": c.glimpse_v, "logit_k": c.logit_k}

    def forward(self, feat, action_mask, current_node, first_node, remaining_capacity=None, *, actor_node_emb,
                actor_graph, glimpse_k, glimpse_v, logit_k, node_emb=None, graph=None) -> OneHotDist:
        single = feat.ndim == 2
        if single:
            feat, action_mask, current_node, first_node = (x.unsqueeze(1) for x in (feat, action_mask, current_node, first_node))
            remaining_capacity = remaining_capacity.unsqueeze(1) if remaining_capacity is not None else None
        cache = DecoderCache(actor_node_emb, actor_graph, glimpse_k, glimpse_v, logit_k)
        cap = remaining_capacity.unsqueeze(-1) if remaining_capacity is not None else None
        ctx = self.decoder.context(cache, current_node, first_node, cap)
        ctx = torch.cat([ctx, self.feat_in(feat)], -1)
        mask = action_mask.bool()
        logits, _ = self.decoder.logits(cache, ctx, mask)
        probs = unimix_masked_probs(logits, mask, self.unimix)
        return OneHotDist(probs.squeeze(1) if single else probs)


class RoutingHooks(ImaginationHooks):
    """Exact routing bookkeeping for imagination (see the module docstring).

    ``aux`` per imagined trajectory: ``visited [N, n]``, ``current``/``first`` ``[N]``, ``steps``
    ``[N]``, ``done [N]``, (CVRP) ``remaining [N]`` and the static ``locs [N, n, 2]``/``demand``.
    Also counts imagined actions outside the exact mask (``invalid``/``count``; must stay 0).
    """

    start_keys = OBS_NAMES

    def __init__(self, problem: Literal["tsp", "cvrp"], world_model: RoutingWorldModel, actor: PointerActor,
                 *, known_reward: bool = False) -> None:
        self.problem, self.world_model, self.actor, self.known_reward = problem, world_model, actor, known_reward
        self.invalid = 0
        self.count = 0
        self.start_keys = (*world_model.obs_names, "node_emb", "graph")

    def start(self, start: TensorDictBase) -> dict[str, torch.Tensor]:
        n = start.shape[0]
        visited = start["visited"].bool()
        aux = {
            "visited": visited, "current": start["current_node"].reshape(n).long(),
            "first": start["first_node"].reshape(n).long(), "locs": start["locs"],
            "steps": (start["step_fraction"].reshape(n) * visited.shape[-1]).round(),
            "done": start["is_terminal"].reshape(n).bool(),
        }
        if self.problem == "cvrp":
            aux["remaining"] = start["remaining_capacity"].reshape(n)
            aux["demand"] = start["demand"]
        return aux

    def actor_context(self, start: TensorDictBase) -> dict[str, torch.Tensor]:
        # the instance embeddings came with the start rows (DreamerWorldModelLoss passes the model's carry)
        return self.actor.precompute(start["node_emb"], start["graph"], start["locs"], start.get("demand"))

    def _mask(self, aux) -> torch.Tensor:
        return routing_mask(self.problem, aux["visited"], aux["current"], aux.get("remaining"), aux.get("demand"),
                            aux["done"])

    def actor_inputs(self, aux) -> dict[str, torch.Tensor]:
        inputs = {"action_mask": self._mask(aux), "current_node": aux["current"], "first_node": aux["first"]}
        if self.problem == "cvrp":
            inputs["remaining_capacity"] = aux["remaining"]
        return inputs

    def step(self, aux, action):
        mask = self._mask(aux)
        idx = action.argmax(-1)
        self.invalid += int((~mask.gather(1, idx.unsqueeze(1))).sum())
        self.count += idx.numel()
        active = ~aux["done"]
        rows = torch.arange(idx.shape[0], device=idx.device)
        locs = aux["locs"]
        cur = aux["current"]
        leg = (locs[rows, idx] - locs[rows, cur.clamp_min(0)]).norm(dim=-1)
        visited = aux["visited"].clone()
        visited[rows[active], idx[active]] = True
        new = dict(aux, visited=visited, steps=aux["steps"] + active.to(aux["steps"].dtype))
        if self.problem == "tsp":
            starting = cur < 0
            leg = torch.where(starting, torch.zeros_like(leg), leg)
            first = torch.where(starting & active, idx, aux["first"])
            finished = visited.all(1) & active
            closing = (locs[rows, idx] - locs[rows, first.clamp_min(0)]).norm(dim=-1)
            leg = torch.where(finished, leg + closing, leg)
            new["first"] = first
        else:
            to_depot = idx == 0
            served = aux["demand"].gather(1, idx.unsqueeze(1)).squeeze(1)
            new["remaining"] = torch.where(to_depot & active, torch.ones_like(aux["remaining"]),
                                           torch.where(active, aux["remaining"] - served, aux["remaining"]))
            finished = visited.all(1) & to_depot & active
        new["current"] = torch.where(active, idx, cur)
        new["done"] = aux["done"] | finished
        reward = -(leg * active.to(leg.dtype)) if self.known_reward else None
        return new, reward, new["done"]

    def features(self, world_model, deter, stoch, aux, context):
        n_nodes = aux["visited"].shape[-1]
        remaining = aux.get("remaining")
        ctx = world_model.context_features(context["graph"], context["node_emb"], aux["visited"],
                                           aux["steps"].to(deter.dtype) / n_nodes, remaining, aux.get("demand"))
        return world_model.full_features(deter, stoch, ctx)

    def model_action(self, action, context):
        return self.world_model.action_vector(action, context["node_emb"])

    def pop_invalid_rate(self) -> float:
        rate = self.invalid / max(self.count, 1)
        self.invalid = self.count = 0
        return rate


def make_routing_agent(problem: Literal["tsp", "cvrp"], sizes: RoutingSizes, unimix: float = 0.01):
    """``(world_model, actor, critic)`` for a routing problem."""
    wm = RoutingWorldModel(problem, sizes, unimix)
    actor = PointerActor(problem, wm.feat_dim, sizes, unimix)
    critic = TwoHotHead(wm.feat_dim, sizes.units, sizes.layers, sizes.bins)
    return wm, actor, critic


def episode_length_bound(problem: str, n_nodes: int) -> int:
    """Rows of the longest episode (states, the final one included): TSP ``n + 1``; CVRP at most
    one depot return per customer: ``2 (n - 1) + 1``."""
    return n_nodes + 1 if problem == "tsp" else 2 * (n_nodes - 1) + 1


@torch.no_grad()
def dreamer_rollout(env, world_model: RoutingWorldModel, actor: PointerActor, *, mode: str = "sample",
                    max_rows: int | None = None):
    """Runs every instance of ``env``'s batch to the end with the Dreamer policy.

    ``mode``: ``"sample"``, ``"greedy"`` (mode actions) or ``"random"`` (uniform over allowed nodes,
    prefill). Returns ``(rows, tour_length)``: ``rows`` is a ``[B, T]`` TensorDict of states in the
    layout of :mod:`.world_model` (``T = max_rows``, default :func:`episode_length_bound`; rows after
    an instance's final state have ``valid = False``) with the routing observations, one-hot
    ``action``, ``reward``, ``is_first``, ``is_terminal``, ``valid``; ``tour_length [B]`` float64.
    """
    from tensordict import TensorDict
    from torchrl.envs.utils import step_mdp

    problem = world_model.problem
    td = env.reset()
    locs = td["locs"]
    demand = td.get("demand") if problem == "cvrp" else None
    B, n = td["action_mask"].shape
    max_rows = max_rows or episode_length_bound(problem, n)
    node_emb, graph = world_model.encode_instance(locs, demand)
    cache = actor.precompute(node_emb, graph, locs, demand)
    rssm = world_model.rssm
    h, z = rssm.initial(B, locs.device)
    prev = torch.zeros(B, rssm.action_dim, device=locs.device)
    reward_in = torch.zeros(B, device=locs.device)
    finished = torch.zeros(B, dtype=torch.bool, device=locs.device)  # final row already written
    rows = []
    for t in range(max_rows):
        done = td["done"].reshape(B)
        visited = td["visited"]
        current, first = td["current_node"].reshape(B), td["first_node"].reshape(B)
        remaining = td["remaining_capacity"].reshape(B) if problem == "cvrp" else None
        step_fraction = td["step_count"].reshape(B).float() / n
        embed = world_model.step_embedding(node_emb, current, first, visited, step_fraction, remaining, demand)
        is_first = torch.full((B,), t == 0, dtype=torch.bool, device=locs.device)
        h, z, _ = rssm.obs_step(h, z, prev, embed, is_first)
        ctx = world_model.context_features(graph, node_emb, visited, step_fraction, remaining, demand)
        feat = world_model.full_features(h, z, ctx)
        mask = td["action_mask"]
        if mode == "random":
            probs = mask.float()
            action = F.one_hot(torch.multinomial(probs, 1).squeeze(-1), n).float()
        else:
            dist = actor(feat, mask, current, first, remaining, **cache)
            action = dist.mode() if mode == "greedy" else dist.sample()
        valid = ~finished
        row = {"locs": locs, "visited": visited, "current_node": current, "first_node": first,
               "step_fraction": step_fraction, "action_mask": mask,
               "action": action * (~done).unsqueeze(-1).float(), "reward": reward_in.clone(), "is_first": is_first,
               "is_terminal": done & valid, "valid": valid}
        if problem == "cvrp":
            row.update(demand=demand, remaining_capacity=remaining)
        rows.append(row)
        finished = finished | done
        if bool(finished.all()):
            break
        td["action"] = action.argmax(-1)
        td = env.step(td)
        reward_in = td["next", "reward"].reshape(B) * (~done).float()
        td = step_mdp(td)
        prev = world_model.action_vector(action, node_emb)
    else:
        raise RuntimeError(f"routing episodes did not finish within {max_rows} rows")
    T = len(rows)
    out = TensorDict({k: torch.stack([r[k] for r in rows], 1) for k in rows[0]}, batch_size=[B, T])
    if T < max_rows:  # pad to a fixed length so episodes of any batch stack in the replay
        pad = out[:, -1:].expand(B, max_rows - T).clone()
        pad["valid"] = torch.zeros_like(pad["valid"])
        pad["is_terminal"] = torch.zeros_like(pad["is_terminal"])
        pad["is_first"] = torch.zeros_like(pad["is_first"])
        pad["reward"] = torch.zeros_like(pad["reward"])
        pad["action"] = torch.zeros_like(pad["action"])
        out = torch.cat([out, pad], 1)
    return out, td["tour_length"].reshape(B)
