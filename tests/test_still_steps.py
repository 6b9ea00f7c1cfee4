"""StillSteps: the steps-at-rest count appended to a vector observation."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.envs.utils import check_env_specs

from torchrl_dreamer.config import ConfigError
from torchrl_dreamer.dreamer.envs import make_dreamer_env
from torchrl_dreamer.transforms import StillSteps


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
