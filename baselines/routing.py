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
from torchrl_dreamer.guards import NonFiniteError
from torchrl_dreamer.pointer import PointerActorCritic

__all__ = ["rollout", "compute_advantage", "compute_shared_advantage", "ppo_routing_update", "augment_xy", "evaluate_dev", "SYMMETRIES"]


def _instance(td) -> tuple[torch.Tensor, torch.Tensor | None]:
    demand = td.get("demand", None)
    return td["locs"], demand


@torch.no_grad()
def rollout(env, model: PointerActorCritic, *, greedy: bool = False, generator: torch.Generator | None = None,
            first_nodes: torch.Tensor | None = None, max_steps: int | None = None) -> TensorDict:
    """Runs every instance of ``env``'s batch to the end.

    Args:
        greedy: take the most likely node instead of sampling.
        first_nodes: ``[B]`` forced first move (TSP multi-start decoding).

    Returns a TensorDict ``[B, T]`` with ``current_node``, ``first_node``, ``remaining_capacity``
    (CVRP), ``action_mask``, ``action``, ``log_prob``, ``value``, ``reward``, ``done``, ``active``
    (step taken before the instance finished) and, at ``[B]`` level, ``locs`` (+ ``demand``) and
    ``tour_length``.
    """
    td = env.reset()
    locs, demand = _instance(td)
    cache = model.encode(locs, demand)
    B, N = td["action_mask"].shape
    max_steps = max_steps or 4 * N
    steps = []
    for t in range(max_steps):
        done_before = td["done"].squeeze(-1)
        cur = td["current_node"].squeeze(-1)
        first = td["first_node"].squeeze(-1)
        cap = td.get("remaining_capacity", None)
        mask = td["action_mask"]
        log_probs, value = model.step(cache, cur, first, cap, mask)
        if t == 0 and first_nodes is not None:
            action = first_nodes
        elif greedy:
            action = log_probs.argmax(-1)
        else:
            action = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        record = {
            "current_node": cur, "first_node": first, "action_mask": mask, "action": action,
            "log_prob": log_probs.gather(-1, action[:, None]).squeeze(-1), "value": value.squeeze(-1),
            "active": ~done_before,
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
    iteration: int | None = None,
    run_dir: str | None = None,
) -> dict[str, float]:
    """Clipped PPO over minibatches of episodes (one encoder pass per minibatch)."""
    B, T = batch.batch_size
    problem = model.problem
    totals: dict[str, torch.Tensor] = {}
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(epochs):
        perm = torch.randperm(B)
        for start in range(0, B - minibatch_instances + 1, minibatch_instances):
            mb = batch[perm[start:start + minibatch_instances]]
            locs = mb["locs"][:, 0]
            demand = mb["demand"][:, 0] if problem == "cvrp" else None
            cache = model.encode(locs, demand)
            cap = mb["remaining_capacity"] if problem == "cvrp" else None
            log_probs, value = model.step(cache, mb["current_node"], mb["first_node"], cap, mb["action_mask"])
            new_lp = log_probs.gather(-1, mb["action"].unsqueeze(-1)).squeeze(-1)
            active = mb["active"].float()
            n_active = active.sum().clamp_min(1)
            adv = mb["advantage"]
            if normalize_advantage:
                mean = (adv * active).sum() / n_active
                std = (((adv - mean) ** 2 * active).sum() / n_active).sqrt().clamp_min(1e-8)
                adv = (adv - mean) / std
            log_ratio = (new_lp - mb["log_prob"]) * active
            ratio = log_ratio.exp()
            gain = torch.minimum(ratio * adv, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv)
            loss_objective = -(gain * active).sum() / n_active
            # masked entries: p = 0 exactly; zero their log-prob *before* the product so neither
            # the value nor the gradient sees 0 * -inf (a where() after the product leaks NaN grads)
            entropy = -(log_probs.exp() * log_probs.masked_fill(~mb["action_mask"], 0.0)).sum(-1)
            loss_entropy = -entropy_coef * (entropy * active).sum() / n_active
            loss_critic = critic_coef * (((value.squeeze(-1) - mb["value_target"]) ** 2) * active).sum() / n_active
            total = loss_objective + loss_entropy + loss_critic
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):
                raise NonFiniteError("loss/total", iteration=iteration, run_dir=run_dir,
                                     detail=" before the optimizer step (step not taken)")
            optimizer.step()
            with torch.no_grad():
                stats = {
                    "loss/objective": loss_objective, "loss/critic": loss_critic, "loss/entropy": loss_entropy,
                    "diag/entropy": (entropy * active).sum() / n_active, "diag/grad_norm": grad_norm,
                    "diag/clip_fraction": (((ratio - 1).abs() > clip_epsilon).float() * active).sum() / n_active,
                    "diag/kl_approx": (((ratio - 1) - log_ratio) * active).sum() / n_active,
                }
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
    best tour per instance counts. Returns mean tour length, mean gap to ``ref_cost`` (%), time."""
    from envs.routing import CVRPEnv, TSPEnv

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
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
                forced = torch.tensor(list(starts)).repeat(b)
            env = TSPEnv(instances=inst) if problem == "tsp" else CVRPEnv(instances=inst)
            out = rollout(env, model, greedy=True, first_nodes=forced if multistart else None)
            lengths = out["tour_length"][:, 0].double()
            if multistart:
                lengths = lengths.view(b, -1).min(1).values
            best[sl] = torch.minimum(best[sl], lengths)
    ref = data["ref_cost"].double()
    gap = (best / ref - 1) * 100
    model.train(was_training)
    return {"tour_length": best.mean().item(), "gap_pct": gap.mean().item(), "decode_s": time.perf_counter() - t0}

