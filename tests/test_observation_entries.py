"""Entries appended to a vector observation: StillSteps (the steps-at-rest count) and TimeFeature
(log(1 + steps left) before the step limit, which also makes the limit a termination)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.envs.utils import check_env_specs

from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.transforms import StillSteps, TimeFeature


class EchoEnv(EnvBase):
    """Observation = the last action (2 floats); env ``i`` ends after ``lengths[i]`` steps."""

    batch_locked = True

    def __init__(self, lengths=(4, 7)):
        B = len(lengths)
        super().__init__(batch_size=torch.Size([B]))
        self.lengths = torch.tensor(lengths)
        self.t = torch.zeros(B, dtype=torch.int64)
        self.observation_spec = Composite(observation=Unbounded(shape=(B, 2)), shape=(B,))
        self.action_spec = Bounded(-10.0, 10.0, shape=(B, 2))
        self.reward_spec = Unbounded(shape=(B, 1))
        self.done_spec = Composite(done=Categorical(2, shape=(B, 1), dtype=torch.bool),
                                   terminated=Categorical(2, shape=(B, 1), dtype=torch.bool), shape=(B,))

    def _set_seed(self, seed):
        pass

    def _reset(self, tensordict=None, **kwargs):
        B = self.batch_size[0]
        mask = torch.ones(B, dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        self.t[mask] = 0
        zeros = torch.zeros(B, 1, dtype=torch.bool)
        return TensorDict({"observation": torch.full((B, 2), 5.0), "done": zeros, "terminated": zeros.clone()},
                          batch_size=self.batch_size)

    def _step(self, tensordict):
        self.t = self.t + 1
        end = (self.t >= self.lengths).reshape(-1, 1)
        return TensorDict({"observation": tensordict["action"].clone(), "reward": torch.zeros(end.shape),
                           "done": end, "terminated": end.clone()}, batch_size=self.batch_size)


def test_counts_consecutive_still_steps_and_restarts_at_motion_and_reset():
    env = TransformedEnv(EchoEnv(lengths=(4, 7)), StillSteps(tol=0.1))
    assert env.observation_spec["observation"].shape == (2, 3)
    check_env_specs(env)
    # actions: env 0 holds still (5.0, = the reset observation) the whole time; env 1 moves at
    # step 3, then moves by less than tol (0.05) and holds
    script = [[5.0, 5.0], [5.0, 5.0], [6.0, 5.05], [6.0, 5.0], [6.0, 5.0], [6.0, 5.0], [6.0, 5.0], [6.0, 5.0]]
    td = env.reset()
    assert td["observation"][:, -1].tolist() == [0.0, 0.0]
    seen = []
    for a in script:
        td["action"] = torch.tensor([[a[0], a[0]], [a[1], a[1]]])
        td_step, td = env.step_and_maybe_reset(td)
        seen.append(td_step["next", "observation"][:, -1].tolist())
    # env 0: still x3, moves to 6 at step 3 (0), still at 4 -> episode ends (length 4); the partial
    # reset gives 0 and env 0 then moves 5 -> 6 again at step 5 (0) and holds
    assert [s[0] for s in seen] == [1.0, 2.0, 0.0, 1.0, 0.0, 1.0, 2.0, 3.0]
    # env 1: still, still, moved 0.05 < tol (still), still..., ends after 7 steps; after the reset
    # (observation 5.0) it holds 5.0 again: 1
    assert [s[1] for s in seen] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1.0]
    # the raw observation is unchanged in front of the count
    assert td_step["next", "observation"][:, :2].tolist() == [[6.0, 6.0], [5.0, 5.0]]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="tol must be > 0"):
        StillSteps(tol=0.0)
    with pytest.raises(ConfigError, match="env.still_tol .* env.pixels=true"):
        make_dreamer_env(env_id="CartPole-v1", pixels=True, still_tol=0.01)


def test_lunarlander_env_gets_the_count():
    env = make_dreamer_env(env_id="LunarLander-v3", num_envs=2, seed=0, still_tol=1e-3)
    assert env.observation_spec["observation"].shape == (2, 9)
    td = env.rollout(5, break_when_any_done=False)
    assert td["next", "observation"].shape == (2, 5, 9)


def _left(entries):
    """Steps left, read back from TimeFeature's log(1 + steps left) entries."""
    return [round(math.expm1(x)) for x in entries]


def test_steps_left_count_down_and_the_limit_terminates():
    # env 0 ends on its own after 2 steps (terminated); env 1 would run 9 but the limit is 4
    env = TransformedEnv(EchoEnv(lengths=(2, 9)), TimeFeature(limit=4))
    assert env.observation_spec["observation"].shape == (2, 3)
    check_env_specs(env)
    td = env.reset()
    assert td["observation"][:, -1].tolist() == pytest.approx([math.log(5)] * 2)
    left, terminated = [], []
    for _ in range(6):
        td["action"] = torch.ones(2, 2)
        td_step, td = env.step_and_maybe_reset(td)
        left.append(_left(td_step["next", "observation"][:, -1].tolist()))
        terminated.append(td_step["next", "terminated"].reshape(-1).tolist())
    # env 0: 3, 2 left (its own end), reset, 3, 2 (end), reset, 3, 2
    assert [x[0] for x in left] == [3, 2, 3, 2, 3, 2]
    assert [t[0] for t in terminated] == [False, True, False, True, False, True]
    # env 1: 3, 2, 1, 0 left, where the limit ends it as a termination; the partial reset starts it at 4 again
    assert [x[1] for x in left] == [3, 2, 1, 0, 3, 2]
    assert [t[1] for t in terminated] == [False, False, False, True, False, False]
    assert td_step["next", "done"].reshape(-1).tolist() == [True, False]
    # the raw observation is unchanged in front of the entry
    assert td_step["next", "observation"][:, :2].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_last_steps_stand_apart_for_the_world_model():
    """The world model's encoder symlogs vector observations: the final row's entry must differ from the
    row before it by far more than an elapsed fraction's 1 / limit, or no continue head can find the end."""
    from torchrl_dreamer.dreamer.functional import symlog

    env = TransformedEnv(EchoEnv(lengths=(10_000, 10_000)), TimeFeature(limit=1000))
    td = env.rollout(1000, break_when_any_done=False)
    entry = symlog(td["next", "observation"][0, :, -1])
    assert entry[-1].item() == 0.0
    assert (entry[-2] - entry[-1]).item() > 0.5  # log 2, symlogged
    assert td["next", "terminated"][0, :, 0].tolist() == [False] * 999 + [True]
    assert _left(td["next", "observation"][0, :, -1].tolist()) == list(range(999, -1, -1))  # exact to the step


def test_time_feature_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="limit must be 1 to 100,000 steps"):
        TimeFeature(limit=0)
    with pytest.raises(ValueError, match="limit must be 1 to 100,000 steps"):
        TimeFeature(limit=1_000_000)
    with pytest.raises(ConfigError, match="env.time_feature .* env.pixels=true"):
        make_dreamer_env(env_id="CartPole-v1", pixels=True, time_feature=True)
    with pytest.raises(ConfigError, match="env.time_feature needs a step limit: set env.max_episode_steps"):
        make_dreamer_env(factory="my_package.envs:make", time_feature=True)


def test_gym_env_uses_its_registered_limit_or_the_configured_one():
    env = make_dreamer_env(env_id="LunarLander-v3", num_envs=2, seed=0, time_feature=True)
    assert env.observation_spec["observation"].shape == (2, 9)
    td = env.rollout(3, break_when_any_done=False)
    assert _left(td["next", "observation"][..., -1].reshape(-1).tolist()) == [999, 998, 997] * 2  # limit 1,000
    env = make_dreamer_env(env_id="LunarLander-v3", num_envs=1, seed=0, time_feature=True, max_episode_steps=5)
    td = env.rollout(10, break_when_any_done=True)  # no lander lands or crashes within 5 steps
    assert td.shape[-1] == 5
    assert _left(td["next", "observation"][:, -1].tolist()) == [4, 3, 2, 1, 0]
    assert td["next", "terminated"].reshape(-1).tolist() == [False] * 4 + [True]  # the limit, as a termination


def test_still_count_and_time_feature_together():
    """Both entries, in that order: the count compares only the entries before it (the time always moves)."""
    from torchrl.envs import Compose

    env = TransformedEnv(EchoEnv(lengths=(3, 9)), Compose(StillSteps(tol=0.1), TimeFeature(limit=5)))
    assert env.observation_spec["observation"].shape == (2, 4)
    check_env_specs(env)
    td = env.reset()
    seen = []
    for a in [5.0, 5.0, 5.0, 6.0, 6.0, 6.0]:  # both envs hold still (5.0 = the reset observation), then move once
        td["action"] = torch.full((2, 2), a)
        td_step, td = env.step_and_maybe_reset(td)
        entries = td_step["next", "observation"][:, 2:]
        seen.append([[round(c), left] for c, left in zip(entries[:, 0].tolist(), _left(entries[:, 1].tolist()))])
    # env 0 ends after 3 steps on its own and restarts: count 1, 2, 3 | 0 (moved to 6), 1, 2; steps left 4, 3, 2 | 4..
    assert [s[0] for s in seen] == [[1, 4], [2, 3], [3, 2], [0, 4], [1, 3], [2, 2]]
    # env 1 runs into the limit after 5 steps (terminated) and restarts (moved from the reset 5.0 to 6.0: 0)
    assert [s[1] for s in seen] == [[1, 4], [2, 3], [3, 2], [0, 1], [1, 0], [0, 4]]
    assert td_step["next", "terminated"].reshape(-1).tolist() == [True, False]  # env 0: its own end again


def test_lunarlander_env_gets_both_entries():
    env = make_dreamer_env(env_id="LunarLander-v3", num_envs=1, seed=0, still_tol=1e-3, time_feature=True,
                           max_episode_steps=4)
    td = env.rollout(10, break_when_any_done=True)
    assert td["next", "observation"].shape == (4, 10)
    assert _left(td["next", "observation"][:, -1].tolist()) == [3, 2, 1, 0]



def test_still_count_foresees_lunarlanders_landing_bonus():
    """LunarLander ends with +100 when Box2D puts the resting lander to sleep (~half a simulated second at
    rest, 25 steps): with env.still_tol=0.001 the count stands at that length on the final row, so a world
    model can time the bonus. Gymnasium's scripted pilot lands; then no engine fires."""
    from gymnasium.envs.box2d.lunar_lander import heuristic

    env = make_dreamer_env(env_id="LunarLander-v3", num_envs=1, seed=0, still_tol=1e-3)
    pilot = SimpleNamespace(unwrapped=SimpleNamespace(continuous=False))  # all the heuristic reads of the env
    td = env.reset()
    on_ground = False
    for _ in range(1000):
        obs = td["observation"].reshape(-1)[:8].numpy()
        on_ground = on_ground or bool(obs[6] and obs[7])
        action = 0 if on_ground else heuristic(pilot, obs)
        one_hot = env.action_spec.zero()
        one_hot[..., action] = 1
        td["action"] = one_hot
        td = env.step(td)
        if td["next", "done"].any():
            break
        td = td["next"]
    assert td["next", "terminated"].all() and td["next", "reward"].item() == 100.0
    assert 20 <= td["next", "observation"].reshape(-1)[-1].item() <= 26
