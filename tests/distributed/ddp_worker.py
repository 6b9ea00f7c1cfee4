"""Run under ``torchrun --standalone --nproc_per_node=2``: two ranks, each on half of a batch, take the
same optimizer step as one process on the whole batch (routing PPO and MAPPO losses).

Every rank builds the same full batch from fixed seeds. Rank 0 first computes the one-process step
on the whole batch (no collectives), then both ranks take the data-parallel step on their halves;
rank 0 prints one ``RESULT {json}`` line with the largest parameter difference per case and exits 1
when a case is off by more than the tolerance. ``--no-sync`` skips the gradient all-reduce (it must fail).
"""
from __future__ import annotations

import copy
import json
import sys

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from baselines.mappo import MultiAgentPPOLoss, TanhNormalPolicy, ppo_update
from baselines.mappo_networks import AgentGroupMLP, TanhNormalHead
from baselines.pointer_ppo import (compute_advantage, compute_shared_advantage, multistart_nodes,
                                   ppo_routing_update, rollout)
from envs.routing import CVRPEnv, TSPEnv
from torchrl_dreamer.distributed import SINGLE, data_parallel, shutdown
from torchrl_dreamer.pointer import PointerActorCritic

TOLERANCE = 2e-6  # float32 sums in a different order; a missing all-reduce is off by ~1e-3


@torch.no_grad()
def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def step_both(make, update_full, update_half, dp) -> float:
    """The one-process step (rank 0) vs the data-parallel step, as the largest parameter difference."""
    model = make()
    reference = copy.deepcopy(model)
    if dp.is_main:
        update_full(reference, torch.optim.SGD(reference.parameters(), lr=0.5))
    update_half(model, torch.optim.SGD(model.parameters(), lr=0.5))
    return max_diff(model, reference) if dp.is_main else 0.0


def routing_case(dp, problem: str, multistart: bool) -> float:
    B, K, n = 16, (4 if multistart else 1), 6
    torch.manual_seed(0)
    model = PointerActorCritic(problem, embed_dim=16, n_layers=1, n_heads=2, ff_dim=32)
    if problem == "tsp":
        env = TSPEnv(num_nodes=n, batch_size=B, seed=3)
    else:
        env = CVRPEnv(num_customers=n, batch_size=B, capacity=10, seed=3, instance_repeats=K)
    first = multistart_nodes(problem, n, B, K) if multistart else None
    batch = rollout(env, model, first_nodes=first, group_size=K, generator=torch.Generator().manual_seed(1))
    if multistart:
        compute_shared_advantage(batch, K)
    else:
        compute_advantage(batch, gamma=1.0, lmbda=0.95)
    kw = dict(epochs=1, clip_epsilon=0.2, entropy_coef=0.01, critic_coef=0.5, max_grad_norm=0.5, group_size=K,
              first_move_coef=0.5 if multistart else 0.0)
    half = B // dp.world_size
    mine = batch[dp.rank * half:(dp.rank + 1) * half]
    return step_both(lambda: model,
                     lambda m, opt: ppo_routing_update(m, batch, opt, minibatch_instances=B, **kw),
                     lambda m, opt: ppo_routing_update(m, mine, opt, minibatch_instances=half, dp=dp, **kw), dp)


class _PolicyAndCritic(torch.nn.Module):
    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic


def mappo_case(dp) -> float:
    N, A, D, ACT = 256, 3, 5, 2
    torch.manual_seed(0)
    backbone = AgentGroupMLP(D, 2 * ACT, A, centralised=False, share_params=True, width=32, depth=2)
    policy = TanhNormalPolicy(backbone, TanhNormalHead(-torch.ones(ACT) * 2, torch.ones(ACT) * 3))
    critic = AgentGroupMLP(D, 1, A, centralised=True, share_params=True, width=32, depth=2)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(N, A, D, generator=g)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        action, u, log_prob = policy(obs)
    batch = TensorDict({"agents": TensorDict({
        "observation": obs, "action": action, "action_pretanh": u, "action_log_prob": log_prob,
        "advantage": torch.randn(N, A, 1, generator=g) * 3 + 1, "value_target": torch.randn(N, A, 1, generator=g),
    }, batch_size=[N, A])}, batch_size=[N])
    half = N // dp.world_size
    mine = batch[dp.rank * half:(dp.rank + 1) * half]

    def update(both: _PolicyAndCritic, opt, data, minibatch, group):
        # entropy_coef=0: the entropy term is a one-sample estimate, different on every rank by design
        loss = MultiAgentPPOLoss(both.policy, both.critic, entropy_coef=0.0, normalize_advantage=True)
        loss.set_keys(observation=("agents", "observation"), action_pretanh=("agents", "action_pretanh"),
                      sample_log_prob=("agents", "action_log_prob"), advantage=("agents", "advantage"),
                      value_target=("agents", "value_target"))
        ppo_update(loss, data, opt, epochs=1, minibatch_size=minibatch, max_grad_norm=0.5, dp=group)

    return step_both(lambda: _PolicyAndCritic(policy, critic),
                     lambda m, opt: update(m, opt, batch, N, SINGLE),
                     lambda m, opt: update(m, opt, mine, half, dp), dp)


def main() -> int:
    torch.set_num_threads(1)
    if "--no-sync" in sys.argv:  # the check must be able to fail: ranks that never share gradients
        from torchrl_dreamer.distributed import DataParallel

        DataParallel.sync_gradients = lambda self, params, average: None
    dp = data_parallel("cpu")
    try:
        result = {"world_size": dp.world_size, "tsp": routing_case(dp, "tsp", False),
                  "cvrp_multistart": routing_case(dp, "cvrp", True), "mappo": mappo_case(dp)}
    finally:
        shutdown()
    if dp.is_main:
        print("RESULT " + json.dumps(result), flush=True)
        return int(any(v > TOLERANCE for k, v in result.items() if k != "world_size"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
