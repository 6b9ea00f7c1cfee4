"""``env.action_repeat``: each agent step applies its action for N env frames, sums their rewards,
stops at the frame that ends the episode, and the time feature counts agent steps."""
from __future__ import annotations

import math

import pytest
import torch

from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.dreamer.envs import make_dreamer_env, time_limit


def _one_hot(i: int, n: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).to(torch.int64)


def _play(env, actions):
    """Steps ``env`` with the given action indices until it is done; (rewards, observations)."""
    td = env.reset()
    rewards, observations = [], [td["observation"].clone()]
    for a in actions:
        td["action"] = _one_hot(a, env.action_spec.shape[-1])
        td = env.step(td)
        rewards.append(float(td["next", "reward"]))
        observations.append(td["next", "observation"].clone())
        if bool(td["next", "done"]):
            break
        td = td["next"]
    return rewards, observations


def test_repeat_sums_the_frames_rewards_and_ends_with_the_episode():
    # the same seed and the same frame-level actions: agent steps of 3 frames add up to the frames
    actions = [0, 0, 1, 1, 0, 1] * 40
    single = make_dreamer_env(env_id="CartPole-v1", seed=3)
    frame_rewards, frame_obs = _play(single, [a for a in actions for _ in range(3)])
    single.close()
    repeated = make_dreamer_env(env_id="CartPole-v1", seed=3, action_repeat=3)
    step_rewards, step_obs = _play(repeated, actions)
    repeated.close()
    frames = len(frame_rewards)
    assert frames < 3 * len(actions), "the episode must end inside the action list for this test"
    assert len(step_rewards) == math.ceil(frames / 3)  # stopped at the end, not at a multiple of 3
    assert sum(step_rewards) == pytest.approx(sum(frame_rewards))
    assert step_rewards[0] == pytest.approx(3.0)  # CartPole pays 1 per frame
    for i in range(len(step_rewards) - 1):  # the observation after each agent step is the 3rd frame's
        torch.testing.assert_close(step_obs[i + 1], frame_obs[3 * (i + 1)])
    torch.testing.assert_close(step_obs[-1], frame_obs[-1])  # and after the last, the episode's end


def test_time_feature_counts_agent_steps():
    # 10 frames in steps of 3 frames: 4 agent steps, the last one cut short by the env's own limit
    env = make_dreamer_env(env_id="CartPole-v1", seed=0, max_episode_steps=10, time_feature=True, action_repeat=3)
    td = env.reset()
    assert float(td["observation"][-1]) == pytest.approx(math.log(1 + 4))
    steps = 0
    while True:
        td["action"] = _one_hot(steps % 2)
        td = env.step(td)
        steps += 1
        if bool(td["next", "done"]):
            break
        td = td["next"]
    env.close()
    assert steps == 4
    assert bool(td["next", "terminated"])  # the limit is a termination the time feature announced
    assert float(td["next", "observation"][-1]) == pytest.approx(0.0)


def test_time_limit_is_counted_in_agent_steps():
    """The limit in frames (set, or the Gymnasium id's own) over the repeat, rounded up: the last agent step
    may end the episode part-way through its frames."""
    assert time_limit("CartPole-v1", "", 10, 3) == 4
    assert time_limit("LunarLander-v3", "", 0, 2) == 500 and time_limit("LunarLander-v3", "", 0, 3) == 334
    assert time_limit("LunarLander-v3", "", 0) == 1000
    with pytest.raises(ConfigError, match="needs a step limit"):
        time_limit("", "envs.masked_grid:make_env", 0, 2)


def test_lunarlander_repeat_keeps_the_episode_return():
    env = make_dreamer_env(env_id="LunarLander-v3", seed=0, action_repeat=4)
    td = env.rollout(1000, break_when_any_done=True)
    env.close()
    assert bool(td["next", "done"][-1])
    torch.testing.assert_close(td["next", "episode_reward"][-1], td["next", "reward"].sum(0))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="action_repeat must be >= 1"):
        make_dreamer_env(env_id="CartPole-v1", action_repeat=0)
    with pytest.raises(ConfigError, match="applies to Gymnasium ids"):
        make_dreamer_env(factory="envs.masked_grid:make_env", action_repeat=2)

