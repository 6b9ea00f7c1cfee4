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
from typing import Literal

import torch
from tensordict import TensorDict
from torchrl.envs.utils import step_mdp
from torchrl.objectives.value.functional import generalized_advantage_estimate

from envs.routing import SQUARE_SYMMETRIES
from torchrl_dreamer.guards import NonFiniteError, check_parameters_finite
from torchrl_dreamer.pointer import DecoderCache, PointerActorCritic

__all__ = ["rollout", "encode_groups", "step_groups", "ppo_minibatch_loss", "multistart_nodes", "compute_advantage", "compute_shared_advantage", "ppo_routing_update", "augment_xy", "evaluate_dev", "SYMMETRIES"]


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


def ppo_minibatch_loss(model: PointerActorCritic, mb: TensorDict, *, clip_epsilon: float, entropy_coef: float,
                       critic_coef: float, normalize_advantage: bool = True, group_size: int = 1,
                       first_move_coef: float = 0.0,
                       instance_group: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PPO losses of a minibatch of whole episodes ``mb [b, T]`` (one encoder pass).

    The terms are TorchRL ``ClipPPOLoss``'s (``loss_critic_type="l2"``) evaluated on the *learnable*
    steps only (active and not forced), without flattening the episodes, so the encoder runs once
    per episode (per instance with ``group_size``): tested equal to ``ClipPPOLoss`` on the
    flattened steps. Returns ``(losses, detached diagnostics)``; losses are ``objective``,
    ``critic``, ``entropy`` (+ ``first_move``).

    ``instance_group`` (0: ``group_size``): consecutive rows ``[g*G, (g+1)*G)`` are the multi-start
    rollouts of one instance, for the first-move term. It differs from ``group_size`` (rows that
    share one encoder pass) with symmetric rollouts: each rollout sees its own symmetry of the
    instance (so ``group_size`` is 1), and each is taught the group's best start."""
    K = group_size
    G = instance_group or K
    if G % K:
        raise ValueError(f"instance_group {G} must be a multiple of group_size {K}")
    locs = mb["locs"][:, 0]
    demand = mb["demand"][:, 0] if model.problem == "cvrp" else None
    cache = encode_groups(model, locs, demand, K)
    cap = mb["remaining_capacity"] if model.problem == "cvrp" else None
    log_probs, value = step_groups(model, cache, K, mb["current_node"], mb["first_node"], cap, mb["action_mask"])
    new_lp = log_probs.gather(-1, mb["action"].unsqueeze(-1)).squeeze(-1)
    learn = mb["active"] & ~mb["forced"] if "forced" in mb.keys() else mb["active"]
    active = learn.float()
    n_active = active.sum().clamp_min(1)
    adv = mb["advantage"]
    if normalize_advantage:
        mean = (adv * active).sum() / n_active
        std = (((adv - mean) ** 2 * active).sum() / n_active).sqrt().clamp_min(1e-8)
        adv = (adv - mean) / std
    log_ratio = (new_lp - mb["log_prob"]) * active
    ratio = log_ratio.exp()
    gain = torch.minimum(ratio * adv, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv)
    # masked entries: p = 0 exactly; zero their log-prob *before* the product so neither
    # the value nor the gradient sees 0 * -inf (a where() after the product leaks NaN grads)
    entropy = -(log_probs.exp() * log_probs.masked_fill(~mb["action_mask"], 0.0)).sum(-1)
    losses = {
        "objective": -(gain * active).sum() / n_active,
        "critic": critic_coef * (((value.squeeze(-1) - mb["value_target"]) ** 2) * active).sum() / n_active,
        "entropy": -entropy_coef * (entropy * active).sum() / n_active,
    }
    if first_move_coef > 0 and G > 1 and "forced" in mb.keys() and bool(mb["forced"][:, 0].all()):
        episode = (mb["reward"] * mb["active"].float()).sum(1).view(-1, G)  # [m, G] returns
        best = episode.argmax(1) + torch.arange(episode.shape[0], device=episode.device) * G
        # the rows of one encoder group start from the same state: one row per encoder group
        # (per instance without symmetries; every row with them), each taught its instance's best start
        target = mb["action"][best, 0].repeat_interleave(G // K)
        losses["first_move"] = -first_move_coef * log_probs[::K, 0].gather(-1, target[:, None]).mean()
    with torch.no_grad():
        stats = {
            "diag/entropy": (entropy * active).sum() / n_active,
            "diag/clip_fraction": (((ratio - 1).abs() > clip_epsilon).float() * active).sum() / n_active,
            "diag/kl_approx": (((ratio - 1) - log_ratio) * active).sum() / n_active,
        }
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
    for _ in range(epochs):
        perm = (torch.randperm(B // G)[:, None] * G + torch.arange(G)).reshape(-1)  # whole groups, in order
        for start in range(0, B - minibatch_instances + 1, minibatch_instances):
            mb = batch[perm[start:start + minibatch_instances]]
            losses, stats = ppo_minibatch_loss(model, mb, clip_epsilon=clip_epsilon, entropy_coef=entropy_coef,
                                               critic_coef=critic_coef, normalize_advantage=normalize_advantage,
                                               group_size=K, first_move_coef=first_move_coef, instance_group=G)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
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

