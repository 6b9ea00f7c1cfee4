"""Plain tutorial-style multi-agent PPO loop: the speed reference for ``mappo_navigation.py``.

Written in the style of TorchRL's multi-agent PPO tutorial (VMAS navigation): a ``Collector``,
a ``ReplayBuffer`` with ``SamplerWithoutReplacement`` over each batch, ``ClipPPOLoss`` + ``GAE``
on TensorDicts, ``MultiAgentMLP`` networks and a ``TanhNormal`` actor. Nothing here is tuned;
it is the baseline a user would write first. The benchmark times it side by side with our recipe.
"""
from __future__ import annotations

import time

import torch
from tensordict.nn import TensorDictModule
from tensordict.nn.distributions import NormalParamExtractor
from torch import nn
from torchrl.collectors import Collector
from torchrl.data.replay_buffers import ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.data.replay_buffers.storages import LazyTensorStorage
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.libs.vmas import VmasEnv
from torchrl.modules import MultiAgentMLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss, ValueEstimators


def run_plain_mappo(**kwargs) -> list[dict]:
    """Runs ``n_iters`` iterations and returns one record per iteration (see ``iter_plain_mappo``)."""
    on_iteration = kwargs.pop("on_iteration", None)
    records = []
    for record in iter_plain_mappo(**kwargs):
        records.append(record)
        if on_iteration is not None:
            on_iteration(record)
    return records


def iter_plain_mappo(
    *,
    scenario: str = "navigation",
    n_agents: int = 3,
    frames_per_batch: int = 6000,
    max_steps: int = 100,
    n_iters: int = 3,
    num_epochs: int = 30,
    minibatch_size: int = 400,
    lr: float = 3e-4,
    max_grad_norm: float = 1.0,
    clip_epsilon: float = 0.2,
    gamma: float = 0.99,
    lmbda: float = 0.9,
    entropy_eps: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
):
    """Yields one record per iteration, so a benchmark can interleave it with another run.

    ``threads`` (if given) is set with ``torch.set_num_threads`` at the start of every iteration
    (and restored before yielding), so the interleaved run keeps its own thread count.
    Each record: ``iteration``, ``episode_reward_sum`` (mean over finished episodes and agents),
    ``collect_s``, ``train_s``, ``iter_s``, ``frames_per_s`` (collection only).
    """
    torch.manual_seed(seed)
    num_envs = frames_per_batch // max_steps
    base_env = VmasEnv(
        scenario=scenario,
        num_envs=num_envs,
        continuous_actions=True,
        max_steps=max_steps,
        device=device,
        seed=seed,
        n_agents=n_agents,
    )
    env = TransformedEnv(
        base_env,
        RewardSum(in_keys=[base_env.reward_key], out_keys=[("agents", "episode_reward")]),
    )
    obs_dim = env.observation_spec["agents", "observation"].shape[-1]
    act_spec = env.full_action_spec_unbatched[env.action_key]
    act_dim = act_spec.shape[-1]

    policy_net = nn.Sequential(
        MultiAgentMLP(
            n_agent_inputs=obs_dim,
            n_agent_outputs=2 * act_dim,
            n_agents=n_agents,
            centralised=False,
            share_params=True,
            device=device,
            depth=2,
            num_cells=256,
            activation_class=nn.Tanh,
        ),
        NormalParamExtractor(),
    )
    policy_module = TensorDictModule(
        policy_net,
        in_keys=[("agents", "observation")],
        out_keys=[("agents", "loc"), ("agents", "scale")],
    )
    policy = ProbabilisticActor(
        module=policy_module,
        spec=env.full_action_spec_unbatched,
        in_keys=[("agents", "loc"), ("agents", "scale")],
        out_keys=[env.action_key],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": act_spec.space.low, "high": act_spec.space.high},
        return_log_prob=True,
    )
    critic_net = MultiAgentMLP(
        n_agent_inputs=obs_dim,
        n_agent_outputs=1,
        n_agents=n_agents,
        centralised=True,
        share_params=True,
        device=device,
        depth=2,
        num_cells=256,
        activation_class=nn.Tanh,
    )
    critic = TensorDictModule(
        critic_net, in_keys=[("agents", "observation")], out_keys=[("agents", "state_value")]
    )
    collector = Collector(
        env,
        policy,
        device=device,
        storing_device=device,
        frames_per_batch=frames_per_batch,
        total_frames=frames_per_batch * n_iters,
    )
    replay_buffer = ReplayBuffer(
        storage=LazyTensorStorage(frames_per_batch, device=device),
        sampler=SamplerWithoutReplacement(),
        batch_size=minibatch_size,
    )
    loss_module = ClipPPOLoss(
        actor_network=policy,
        critic_network=critic,
        clip_epsilon=clip_epsilon,
        entropy_coeff=entropy_eps,
        normalize_advantage=False,
    )
    loss_module.set_keys(
        reward=env.reward_key,
        action=env.action_key,
        value=("agents", "state_value"),
        done=("agents", "done"),
        terminated=("agents", "terminated"),
    )
    loss_module.make_value_estimator(ValueEstimators.GAE, gamma=gamma, lmbda=lmbda)
    gae = loss_module.value_estimator
    optim = torch.optim.Adam(loss_module.parameters(), lr)

    def use_threads():
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        return previous

    outer_threads = use_threads()
    t_iter = time.perf_counter()
    for it, tensordict_data in enumerate(collector):
        t_collected = time.perf_counter()
        # The hand-written expansion our DoneToAgents transform replaces.
        for key in ("done", "terminated"):
            tensordict_data.set(
                ("next", "agents", key),
                tensordict_data.get(("next", key))
                .unsqueeze(-1)
                .expand(tensordict_data.get_item_shape(("next", env.reward_key))),
            )
        with torch.no_grad():
            gae(
                tensordict_data,
                params=loss_module.critic_network_params,
                target_params=loss_module.target_critic_network_params,
            )
        data_view = tensordict_data.reshape(-1)
        replay_buffer.extend(data_view)
        for _ in range(num_epochs):
            for _ in range(frames_per_batch // minibatch_size):
                subdata = replay_buffer.sample()
                loss_vals = loss_module(subdata)
                loss_value = (
                    loss_vals["loss_objective"] + loss_vals["loss_critic"] + loss_vals["loss_entropy"]
                )
                loss_value.backward()
                torch.nn.utils.clip_grad_norm_(loss_module.parameters(), max_grad_norm)
                optim.step()
                optim.zero_grad()
        collector.update_policy_weights_()
        done = tensordict_data.get(("next", "agents", "done"))
        episode_reward = tensordict_data.get(("next", "agents", "episode_reward"))[done]
        t_end = time.perf_counter()
        record = {
            "iteration": it + 1,
            "episode_reward_sum": episode_reward.mean().item() if episode_reward.numel() else float("nan"),
            "collect_s": t_collected - t_iter,
            "train_s": t_end - t_collected,
            "iter_s": t_end - t_iter,
            "frames_per_s": frames_per_batch / (t_collected - t_iter),
        }
        torch.set_num_threads(outer_threads)
        yield record
        outer_threads = use_threads()
        t_iter = time.perf_counter()
    torch.set_num_threads(outer_threads)
    collector.shutdown()


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the per-iteration records")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        print(f"== plain reference, seed {seed}, {args.threads} thread(s) ==", flush=True)
        results[seed] = run_plain_mappo(n_iters=args.iters, seed=seed, threads=args.threads, on_iteration=print)
    for seed, records in results.items():
        rewards = [r["episode_reward_sum"] for r in records]
        print(f"seed {seed}: episode reward sum per iteration {[round(x, 3) for x in rewards]}")
    if args.iters >= 10:
        at10 = [records[9]["episode_reward_sum"] for records in results.values()]
        print(f"reward sum at iteration 10: {[round(x, 3) for x in at10]}, mean {sum(at10) / len(at10):.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
