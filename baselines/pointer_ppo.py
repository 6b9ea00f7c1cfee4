"""Rollouts, PPO update and evaluation for the pointer-network policy on TSP / CVRP.

Rollouts step a whole batch of instances together through the TorchRL env (``env.step``), with
the instance encoded once per episode and one decoder call per step. The PPO update works on
minibatches of *episodes*: one encoder pass per minibatch, then all steps of those episodes are
decoded in one batched call from the stored contexts and masks (teacher forcing), so the
encoder is never run per step. Advantages come from TorchRL's functional
``generalized_advantage_estimate``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule
from torchrl.envs.utils import step_mdp
from torchrl.objectives.value.functional import generalized_advantage_estimate

from envs.routing import SQUARE_SYMMETRIES
from torchrl_dreamer.distributed import SINGLE, DataParallel, total_count
from torchrl_dreamer.guards import NonFiniteError, check_parameters_finite
from torchrl_dreamer.pointer import DecoderCache, PointerActorCritic

__all__ = ["PointerPPOLoss", "rollout", "encode_groups", "step_groups", "ppo_minibatch_loss", "multistart_nodes", "compute_advantage", "compute_shared_advantage", "ppo_routing_update", "augment_xy", "evaluate_dev", "SYMMETRIES"]


def _instance(td) -> tuple[torch.Tensor, torch.Tensor | None]:
    demand = td.get("demand", None)
    return td["locs"], demand


def encode_groups(model: PointerActorCritic, locs: torch.Tensor, demand: torch.Tensor | None,
                  group_size: int = 1) -> DecoderCache:
    """Encodes ``[B]`` instances where each run of ``group_size`` consecutive rows is the *same*
    instance (POMO-style multi-start rollouts): the encoder runs on ``B / group_size`` rows only
    and the cache is ``[B / group_size]`` (use :func:`step_groups`). Raises ``ValueError`` if the
    rows of a group differ (e.g. symmetric copies)."""
    if group_size == 1:
        return model.encode(locs, demand)
    B = locs.shape[0]
    if B % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch ({B})")
    heads = locs[::group_size]
    m = B // group_size  # compare as [m, K, ...] views against each group's first row: no copies
    same = bool((locs.view(m, group_size, *locs.shape[1:]) == heads.unsqueeze(1)).all())
    if demand is not None:
        same = same and bool((demand.view(m, group_size, -1) == demand[::group_size].unsqueeze(1)).all())
    if not same:
        raise ValueError(f"rows of a group of {group_size} hold different instances; cannot share the encoder")
    return model.encode(heads, demand[::group_size] if demand is not None else None)


def step_groups(model: PointerActorCritic, cache: DecoderCache, group_size: int, current_node: torch.Tensor,
                first_node: torch.Tensor, remaining_capacity: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`PointerActorCritic.step` for ``[B]`` or ``[B, T]`` inputs against a cache of
    ``B / group_size`` instances: the ``K`` rollouts of an instance become ``K * T`` queries of
    the same cache row (no copy of the cache, larger matmuls). Same outputs as ``step`` on an
    expanded cache."""
    if group_size == 1:
        return model.step(cache, current_node, first_node, remaining_capacity, mask)
    lead = current_node.shape
    m = lead[0] // group_size
    flat = lambda t: None if t is None else t.reshape(m, -1, *t.shape[len(lead):])  # noqa: E731
    log_probs, value = model.step(cache, flat(current_node), flat(first_node), flat(remaining_capacity), flat(mask))
    return log_probs.reshape(*lead, -1), value.reshape(*lead, 1)


def multistart_nodes(problem: str, size: int, batch: int, group_size: int) -> torch.Tensor:
    """Forced first moves ``[batch]`` for groups of ``group_size`` rollouts of one instance: rollout
    ``j`` of a group starts at node ``j`` (TSP) or customer ``j + 1`` (CVRP), as in POMO."""
    if group_size > size:
        raise ValueError(f"multi-start needs group_size <= {size} first nodes, got {group_size}")
    first = torch.arange(group_size) + (1 if problem == "cvrp" else 0)
    return first.repeat(batch // group_size)


@torch.no_grad()
def rollout(env, model: PointerActorCritic, *, greedy: bool = False, generator: torch.Generator | None = None,
            first_nodes: torch.Tensor | None = None, max_steps: int | None = None,
            group_size: int = 1) -> TensorDict:
    """Runs every instance of ``env``'s batch to the end.

    Args:
        greedy: take the most likely node instead of sampling.
        first_nodes: ``[B]`` forced first move (multi-start); the step is recorded with
            ``forced=True`` so that the learner leaves its log-prob alone.
        group_size: consecutive rows ``[g*K, (g+1)*K)`` hold the same instance; encode it once.

    Returns a TensorDict ``[B, T]`` with ``current_node``, ``first_node``, ``remaining_capacity``
    (CVRP), ``action_mask``, ``action``, ``log_prob``, ``value``, ``reward``, ``done``, ``active``
    (step taken before the instance finished) and, at ``[B]`` level, ``locs`` (+ ``demand``) and
    ``tour_length``.
    """
    td = env.reset()
    locs, demand = _instance(td)
    cache = encode_groups(model, locs, demand, group_size)
    B, N = td["action_mask"].shape
    max_steps = max_steps or 4 * N
    steps = []
    for t in range(max_steps):
        done_before = td["done"].squeeze(-1)
        cur = td["current_node"].squeeze(-1)
        first = td["first_node"].squeeze(-1)
        cap = td.get("remaining_capacity", None)
        mask = td["action_mask"]
        log_probs, value = step_groups(model, cache, group_size, cur, first, cap, mask)
        if t == 0 and first_nodes is not None:
            action = first_nodes
        elif greedy:
            action = log_probs.argmax(-1)
        else:
            action = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        record = {
            "current_node": cur, "first_node": first, "action_mask": mask, "action": action,
            "log_prob": log_probs.gather(-1, action[:, None]).squeeze(-1), "value": value.squeeze(-1),
            "active": ~done_before, "forced": torch.full_like(done_before, t == 0 and first_nodes is not None),
        }
        if cap is not None:
            record["remaining_capacity"] = cap
        td["action"] = action
        td = env.step(td)
        record["reward"] = td["next", "reward"].squeeze(-1)
        record["done"] = td["next", "done"].squeeze(-1)
        steps.append(record)
        td = step_mdp(td)
        if bool(td["done"].all()):
            break
    else:
        raise RuntimeError(f"episodes did not finish within {max_steps} steps")
    out = TensorDict({k: torch.stack([s[k] for s in steps], 1) for k in steps[0]}, batch_size=[B, len(steps)])
    out["locs"] = locs.unsqueeze(1).expand(B, len(steps), *locs.shape[1:])
    if demand is not None:
        out["demand"] = demand.unsqueeze(1).expand(B, len(steps), N)
    out["tour_length"] = td["tour_length"].expand(B, len(steps)).clone()  # float64, exact
    return out


def compute_advantage(batch: TensorDict, gamma: float, lmbda: float) -> None:
    """GAE over ``[B, T]`` (TorchRL's functional estimator); writes ``advantage`` and ``value_target``.

    Steps after an instance finished are inactive (zero reward, value masked to 0) and get zero
    advantage."""
    active = batch["active"].float()
    value = batch["value"] * active
    next_value = torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], dim=1)
    done = batch["done"] | ~batch["active"]
    adv, target = generalized_advantage_estimate(
        gamma, lmbda, value.unsqueeze(-1), next_value.unsqueeze(-1), (batch["reward"] * active).unsqueeze(-1),
        done.unsqueeze(-1), done.unsqueeze(-1), time_dim=1,
    )
    batch["advantage"] = adv.squeeze(-1) * active
    batch["value_target"] = target.squeeze(-1)


def compute_shared_advantage(batch: TensorDict, group_size: int) -> None:
    """POMO-style shared baseline: rollouts ``[g*K, (g+1)*K)`` solve the same instance; each step's
    advantage is its episode's return minus the mean return of its group (unbiased, no critic).
    ``value_target`` is the Monte-Carlo return-to-go, so the critic head still trains (diagnostic).
    """
    B = batch.batch_size[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"shared baseline needs group_size >= 2 dividing the batch ({B}), got {group_size}")
    active = batch["active"].float()
    reward = batch["reward"] * active
    episode = reward.sum(1)
    baseline = episode.view(-1, group_size).mean(1).repeat_interleave(group_size)
    batch["advantage"] = (episode - baseline).unsqueeze(1) * active
    batch["value_target"] = reward.flip(1).cumsum(1).flip(1)


def _require(td: TensorDictBase, key: NestedKey) -> torch.Tensor:
    """``td[key]``, or a ``KeyError`` naming the key (tensordict's ``get`` returns ``None`` for a missing one)."""
    value = td.get(key, None)
    if value is None:
        raise KeyError(f"PointerPPOLoss needs '{key}' in its input (rename with set_keys); "
                       f"got keys {list(td.keys(True, True))}")
    return value


class PointerPPOLoss(LossModule):
    """Clipped PPO for the pointer network, on minibatches of whole episodes ``mb [b, T]`` (one
    encoder pass per minibatch, or per instance with ``group_size``).

    The terms are TorchRL ``ClipPPOLoss``'s (``loss_critic_type="l2"``) evaluated on the *learnable*
    steps only (active and not forced), without flattening the episodes: tested equal to
    ``ClipPPOLoss`` on the flattened steps. ``forward`` returns a TensorDict with ``loss_objective``,
    ``loss_critic``, ``loss_entropy`` (+ ``loss_first_move`` with multi-start groups) and the
    detached diagnostics ``entropy``, ``clip_fraction``, ``kl_approx``.

    Args:
        model: the :class:`~torchrl_dreamer.pointer.PointerActorCritic` (actor and critic).
        clip_epsilon, entropy_coef, critic_coef, normalize_advantage: as in ``ClipPPOLoss``
            (advantages standardised over the learnable steps of the minibatch).
        group_size: consecutive rows ``[g*K, (g+1)*K)`` share one encoder pass (multi-start).
        first_move_coef: weight of the cross-entropy that teaches the first move the start of each
            instance group's shortest tour (multi-start training; 0 = off).
        instance_group: consecutive rows that are the rollouts of one instance, for the first-move
            term (0: ``group_size``); differs from ``group_size`` with symmetric rollouts (each
            rollout sees its own symmetry, so ``group_size`` is 1 and each is taught the best start).
    """

    @dataclass
    class _AcceptedKeys:
        """Input keys: the instance (``locs``, ``demand``), the decoding state at each step
        (``current_node``, ``first_node``, ``remaining_capacity``, ``action_mask``), the step's
        ``action``, ``reward`` and collection ``sample_log_prob``, the ``active``/``forced`` flags and the
        ``advantage`` and ``value_target``."""

        locs: NestedKey = "locs"
        demand: NestedKey = "demand"
        remaining_capacity: NestedKey = "remaining_capacity"
        current_node: NestedKey = "current_node"
        first_node: NestedKey = "first_node"
        action_mask: NestedKey = "action_mask"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        sample_log_prob: NestedKey = "log_prob"
        active: NestedKey = "active"
        forced: NestedKey = "forced"
        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, model: PointerActorCritic, *, clip_epsilon: float, entropy_coef: float, critic_coef: float,
                 normalize_advantage: bool = True, group_size: int = 1, first_move_coef: float = 0.0,
                 instance_group: int = 0) -> None:
        super().__init__()
        G = instance_group or group_size
        if G % group_size:
            raise ValueError(f"instance_group {G} must be a multiple of group_size {group_size}")
        self.model = model
        self.clip_epsilon, self.entropy_coef, self.critic_coef = clip_epsilon, entropy_coef, critic_coef
        self.normalize_advantage, self.group_size, self.instance_group = normalize_advantage, group_size, G
        self.first_move_coef = first_move_coef
        self._compiled = None
        self.dp = SINGLE  # data-parallel group (torchrun): means over the learnable steps of *all* ranks

    def _total(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Sums over the data-parallel ranks (one all-reduce; identity in one process)."""
        return total_count(self.dp, values) if self.dp.enabled else list(values)

    def _forward_value_estimator_keys(self, **kwargs) -> None:  # advantages come from the rollout code
        pass

    def enable_compile(self, **kwargs) -> None:
        """``torch.compile`` the loss computation (``kwargs`` go to ``torch.compile``; the first-move
        term's data-dependent check is a graph break)."""
        self._compiled = torch.compile(self._loss, **kwargs)

    def forward(self, mb: TensorDictBase) -> TensorDict:
        return (self._compiled or self._loss)(mb)

    def _loss(self, mb: TensorDictBase) -> TensorDict:
        k, K, G = self.tensor_keys, self.group_size, self.instance_group
        cvrp = self.model.problem == "cvrp"
        locs = _require(mb, k.locs)[:, 0]
        demand = _require(mb, k.demand)[:, 0] if cvrp else None
        cache = encode_groups(self.model, locs, demand, K)
        cap = _require(mb, k.remaining_capacity) if cvrp else None
        mask = _require(mb, k.action_mask)
        log_probs, value = step_groups(self.model, cache, K, _require(mb, k.current_node),
                                       _require(mb, k.first_node), cap, mask)
        action = _require(mb, k.action)
        new_lp = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        forced = mb.get(k.forced, None)
        learn = _require(mb, k.active) & ~forced if forced is not None else _require(mb, k.active)
        active = learn.float()
        adv = _require(mb, k.advantage)
        # means over the learnable steps of the whole (global) minibatch: under torchrun each rank
        # divides its sums by the count over all ranks and the gradients are summed, which is the
        # one-process gradient exactly
        n_active, adv_sum = self._total(active.sum(), (adv * active).sum())
        n_active = n_active.clamp_min(1)
        if self.normalize_advantage:
            mean = adv_sum / n_active
            (sq_sum,) = self._total(((adv - mean) ** 2 * active).sum())
            std = (sq_sum / n_active).sqrt().clamp_min(1e-8)
            adv = (adv - mean) / std
        log_ratio = (new_lp - _require(mb, k.sample_log_prob)) * active
        ratio = log_ratio.exp()
        eps = self.clip_epsilon
        gain = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        # masked entries: p = 0 exactly; zero their log-prob *before* the product so neither
        # the value nor the gradient sees 0 * -inf (a where() after the product leaks NaN grads)
        entropy = -(log_probs.exp() * log_probs.masked_fill(~mask, 0.0)).sum(-1)
        out = {
            "loss_objective": -(gain * active).sum() / n_active,
            "loss_critic": self.critic_coef
            * (((value.squeeze(-1) - _require(mb, k.value_target)) ** 2) * active).sum() / n_active,
            "loss_entropy": -self.entropy_coef * (entropy * active).sum() / n_active,
        }
        if self.first_move_coef > 0 and G > 1 and forced is not None and bool(forced[:, 0].all()):
            episode = (_require(mb, k.reward) * _require(mb, k.active).float()).sum(1).view(-1, G)  # [m, G] returns
            best = episode.argmax(1) + torch.arange(episode.shape[0], device=episode.device) * G
            # the rows of one encoder group start from the same state: one row per encoder group
            # (per instance without symmetries; every row with them), each taught its instance's best start
            target = action[best, 0].repeat_interleave(G // K)
            first = log_probs[::K, 0].gather(-1, target[:, None])
            (rows,) = self._total(torch.tensor(float(first.numel()), device=first.device))
            out["loss_first_move"] = -self.first_move_coef * first.sum() / rows
        with torch.no_grad():
            out["entropy"] = (entropy * active).sum() / n_active
            out["clip_fraction"] = (((ratio - 1).abs() > eps).float() * active).sum() / n_active
            out["kl_approx"] = (((ratio - 1) - log_ratio) * active).sum() / n_active
        return TensorDict(out, batch_size=[])


LOSS_TERMS = ("objective", "critic", "entropy", "first_move")  # the order the terms are summed in


def ppo_minibatch_loss(model: PointerActorCritic, mb: TensorDict, *, clip_epsilon: float, entropy_coef: float,
                       critic_coef: float, normalize_advantage: bool = True, group_size: int = 1,
                       first_move_coef: float = 0.0,
                       instance_group: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:class:`PointerPPOLoss` as ``(losses, detached diagnostics)`` dicts: losses ``objective``,
    ``critic``, ``entropy`` (+ ``first_move``), diagnostics ``diag/entropy``, ``diag/clip_fraction``,
    ``diag/kl_approx``."""
    loss = PointerPPOLoss(model, clip_epsilon=clip_epsilon, entropy_coef=entropy_coef, critic_coef=critic_coef,
                          normalize_advantage=normalize_advantage, group_size=group_size,
                          first_move_coef=first_move_coef, instance_group=instance_group)
    return _split(loss(mb))


def _split(td: TensorDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    losses = {name: td.get(f"loss_{name}") for name in LOSS_TERMS if f"loss_{name}" in td.keys()}
    stats = {f"diag/{name}": td.get(name) for name in ("entropy", "clip_fraction", "kl_approx")}
    return losses, stats


def ppo_routing_update(
    model: PointerActorCritic,
    batch: TensorDict,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    minibatch_instances: int,
    clip_epsilon: float,
    entropy_coef: float,
    critic_coef: float,
    max_grad_norm: float,
    normalize_advantage: bool = True,
    group_size: int = 1,
    first_move_coef: float = 0.0,
    instance_group: int = 0,
    iteration: int | None = None,
    run_dir: str | None = None,
    dp: DataParallel = SINGLE,
) -> dict[str, float]:
    """Clipped PPO over minibatches of episodes (one encoder pass per minibatch).

    ``group_size > 1``: consecutive rollouts ``[g*K, (g+1)*K)`` share one instance (multi-start);
    minibatches take whole groups and the encoder runs once per instance. Forced steps
    (``forced``) are executed but not trained on: their action was not the policy's choice.
    ``first_move_coef > 0`` (multi-start groups) instead teaches the first move to pick the start
    that gave the group's shortest tour (cross-entropy), so greedy single-start decoding is not
    left with an untrained first choice. ``instance_group`` (0: ``group_size``): the rollouts of
    one instance when they do not share an encoder pass (symmetric rollouts); minibatches then
    take whole instance groups, which the first-move term needs."""
    B, T = batch.batch_size
    totals: dict[str, torch.Tensor] = {}
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    K = group_size
    G = instance_group or K
    if G % K:
        raise ValueError(f"instance_group {G} must be a multiple of group_size {K}")
    if B % G or minibatch_instances % G:
        raise ValueError(f"group size {G} must divide the batch ({B}) and the minibatch ({minibatch_instances})")
    loss = PointerPPOLoss(model, clip_epsilon=clip_epsilon, entropy_coef=entropy_coef, critic_coef=critic_coef,
                          normalize_advantage=normalize_advantage, group_size=K, first_move_coef=first_move_coef,
                          instance_group=G)
    loss.dp = dp
    for _ in range(epochs):
        perm = (torch.randperm(B // G)[:, None] * G + torch.arange(G)).reshape(-1)  # whole groups, in order
        for start in range(0, B - minibatch_instances + 1, minibatch_instances):
            mb = batch[perm[start:start + minibatch_instances]]
            losses, stats = _split(loss(mb))
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            dp.sync_gradients(params, average=False)  # torchrun: each rank's loss is its share of the global mean
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):
                raise NonFiniteError("loss/total", iteration=iteration, run_dir=run_dir,
                                     detail=" before the optimizer step (step not taken)")
            optimizer.step()
            check_parameters_finite(params, iteration=iteration, run_dir=run_dir)
            stats = {**{f"loss/{k}": v for k, v in losses.items()}, **stats, "diag/grad_norm": grad_norm}
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v.detach()
            n += 1
    if dp.enabled and totals:  # each rank holds its share of every loss and diagnostic: sum them once
        names = [k for k in totals if k != "diag/grad_norm"]  # the norm is taken after the all-reduce
        for k, v in zip(names, total_count(dp, [totals[k] for k in names])):
            totals[k] = v
    return {k: float(v) / max(n, 1) for k, v in totals.items()}


SYMMETRIES = SQUARE_SYMMETRIES  # one definition, in envs.routing (the env's symmetric rollouts use it too)


def augment_xy(locs: torch.Tensor, k: int) -> torch.Tensor:
    """``locs [..., 2]`` -> ``[k, ..., 2]`` under the first ``k`` (<= 8) square symmetries.
    Tour lengths are invariant, so the best decoded tour over copies is a valid answer."""
    if not 1 <= k <= 8:
        raise ValueError(f"augmentation factor must be in 1..8, got {k}")
    x, y = locs[..., 0], locs[..., 1]
    return torch.stack([torch.stack(f(x, y), -1) for f in SYMMETRIES[:k]])


@torch.no_grad()
def evaluate_dev(model: PointerActorCritic, data: dict[str, torch.Tensor], *, problem: Literal["tsp", "cvrp"],
                 multistart: bool = False, augment: int = 1, chunk: int = 200) -> dict[str, float]:
    """Greedy decoding of a dev set (``load_npz`` dict); optional multi-start (TSP: every node as the
    first node; CVRP: every customer as the first customer) and x``augment`` symmetric copies; the
    best tour per instance counts. Returns mean tour length, mean gap to ``ref_cost`` (%), time.

    Draws no random numbers (greedy decoding of fixed instances, the model in eval mode): the same
    weights give the same numbers, and the caller's RNG streams are untouched (tested)."""
    from envs.routing import CVRPEnv, TSPEnv

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    device = next(model.parameters()).device  # decode where the model is; results gather on the CPU
    n_inst = data["locs"].shape[0]
    best = torch.full((n_inst,), float("inf"), dtype=torch.float64)
    for a in range(augment):
        for start in range(0, n_inst, chunk):
            sl = slice(start, start + chunk)
            inst = {k: v[sl] for k, v in data.items() if k in ("locs", "depot", "demand", "capacity")}
            inst["locs"] = augment_xy(inst["locs"], augment)[a]
            if problem == "cvrp":
                inst["depot"] = augment_xy(inst["depot"], augment)[a]
            b = inst["locs"].shape[0]
            n_nodes = inst["locs"].shape[1]
            starts = [None]
            if multistart:
                starts = range(n_nodes) if problem == "tsp" else range(1, n_nodes + 1)
                reps = len(starts)
                inst = {k: v.repeat_interleave(reps, 0) if v.ndim else v for k, v in inst.items()}
                forced = torch.tensor(list(starts), device=device).repeat(b)
            env = TSPEnv(instances=inst, device=device) if problem == "tsp" else CVRPEnv(instances=inst, device=device)
            out = rollout(env, model, greedy=True, first_nodes=forced if multistart else None,
                          group_size=len(starts) if multistart else 1)
            lengths = out["tour_length"][:, 0].double().cpu()
            if multistart:
                lengths = lengths.view(b, -1).min(1).values
            best[sl] = torch.minimum(best[sl], lengths)
    ref = data["ref_cost"].double()
    gap = (best / ref - 1) * 100
    model.train(was_training)
    return {"tour_length": best.mean().item(), "gap_pct": gap.mean().item(), "decode_s": time.perf_counter() - t0}

