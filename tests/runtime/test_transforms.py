"""Done expansion and episode-reward-sum logging (torchrl_dreamer.transforms, shared by the recipes)."""
import math

import pytest
import torch
from torchrl.envs import TransformedEnv
from torchrl.envs.utils import check_env_specs

from scripted_env import ScriptedEnv
from torchrl_dreamer.envs import with_shared_transforms
from torchrl_dreamer.transforms import DoneToAgents, EpisodeRewardSum


def _rollout(env, steps):
    zero_action = env.full_action_spec.zero()
    return env.rollout(steps, policy=lambda td: td.update(zero_action), break_when_any_done=False)


    return env.rollout(steps, policy=lambda td: td.update(env.full_action_spec.zero()), break_when_any_done=False)


@pytest.mark.parametrize("groups", [{"agents": 3}, {"red": 2, "blue": 4}])
def test_done_expansion_shapes_and_values_with_partial_resets(groups):
    base = ScriptedEnv(episode_lengths=(2, 3, 5), groups=groups)
    env = TransformedEnv(base, DoneToAgents(base))
    check_env_specs(env)
    reset_td = env.reset()
    for name, n in groups.items():
        assert reset_td[name, "done"].shape == (3, n, 1)
        assert reset_td[name, "terminated"].shape == (3, n, 1)
        assert not reset_td[name, "done"].any()
    data = _rollout(env, 12)
    root_done = data["next", "done"]  # [3, 12, 1]
    # partial resets happened: envs finish at different steps
    assert root_done[:, :5, 0].sum(1).tolist() == [2, 1, 1]
    for name, n in groups.items():
        for flag in ("done", "terminated", "truncated"):
            expanded = data["next", name, flag]
            assert expanded.shape == (3, 12, n, 1)
            assert torch.equal(expanded, data["next", flag].unsqueeze(-2).expand(3, 12, n, 1))
            # flags carried to the root of the next step match too (reset rows are False)
            assert torch.equal(data[name, flag], data[flag].unsqueeze(-2).expand(3, 12, n, 1))


def test_done_expansion_requires_groups():
    base = ScriptedEnv(groups={"agents": 1})
    base.reward_spec = base.reward_spec["agents"]["reward"].clone()  # root reward, no group
    with pytest.raises(ValueError, match="nothing to expand"):
        DoneToAgents(base)


def test_episode_reward_sum_counts_only_finished_episodes_exactly():
    lengths = (2, 3, 5)
    base = ScriptedEnv(episode_lengths=lengths, groups={"agents": 2})
    env = with_shared_transforms(base)
    tracker = env.transform[-1]
    assert isinstance(tracker, EpisodeRewardSum)
    data = _rollout(env, 7)
    # finished episodes in 7 steps: env0 (L=2): 3 episodes; env1 (L=3): 2; env2 (L=5): 1.
    expected = []
    for env_i, L in enumerate(lengths):
        for _ in range(7 // L):
            expected += [base.expected_episode_sum(0, a, L) for a in range(2)]
    stats = tracker.summarise(data)
    assert stats["train/episodes_finished"] == 6
    assert stats["train/episode_reward_sum"] == pytest.approx(sum(expected) / len(expected))
    # the step mean is a different number, logged under its own name
    step_mean = data["next", "agents", "reward"].mean().item()
    assert stats["train/step_reward_mean"] == pytest.approx(step_mean)
    assert stats["train/step_reward_mean"] != pytest.approx(stats["train/episode_reward_sum"])


def test_episode_reward_sum_nan_when_nothing_finished_and_per_group_values():
    base = ScriptedEnv(episode_lengths=(4, 4), groups={"red": 1, "blue": 2})
    env = with_shared_transforms(base)
    tracker = env.transform[-1]
    early = tracker.summarise(_rollout(env, 3))
    assert math.isnan(early["train/episode_reward_sum"])
    assert early["train/episodes_finished"] == 0
    stats = tracker.summarise(_rollout(env, 4))
    red = base.expected_episode_sum(0, 0, 4)
    blue = [base.expected_episode_sum(1, a, 4) for a in range(2)]
    assert stats["train/episode_reward_sum/red"] == pytest.approx(red)
    assert stats["train/episode_reward_sum/blue"] == pytest.approx(sum(blue) / 2)
    assert stats["train/episode_reward_sum"] == pytest.approx((2 * red + 2 * sum(blue)) / 6)


def test_vmas_env_gets_expanded_done():
    from torchrl_dreamer.envs import make_env

    env = make_env(scenario="navigation", factory="", kwargs={"n_agents": 2}, num_envs=3, max_steps=4,
                   device="cpu", seed=0)
    check_env_specs(env)
    data = env.rollout(6, break_when_any_done=False)
    assert data["next", "agents", "done"].shape == (3, 6, 2, 1)
    assert torch.equal(data["next", "agents", "done"], data["next", "done"].unsqueeze(-2).expand(3, 6, 2, 1))
    assert data["next", "done"][:, 3].all()
