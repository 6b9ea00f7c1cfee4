"""A deterministic multi-group env for exact tests of transforms and logging.

Env ``i`` runs episodes of ``episode_lengths[i]`` steps (so envs finish at different times:
partial resets). At step ``t`` (1-based) of an episode, agent ``a`` of group number ``g`` gets
reward ``scale_g * (a + 1) * t`` with ``scale_g = 10 ** g``; the episode reward sum of that agent
is therefore ``scale_g * (a + 1) * L * (L + 1) / 2``.
"""
from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase


class ScriptedEnv(EnvBase):
    batch_locked = True

    def __init__(self, episode_lengths=(3, 5), groups=None, nan_obs_at_call: int | None = None):
        num_envs = len(episode_lengths)
        super().__init__(batch_size=torch.Size([num_envs]))
        self.groups = dict(groups or {"agents": 2})
        self.lengths = torch.tensor(episode_lengths).reshape(num_envs, 1)
        self.nan_obs_at_call = nan_obs_at_call
        self._calls = 0
        B = num_envs
        obs, act, rew = {}, {}, {}
        for name, n in self.groups.items():
            obs[name] = Composite(observation=Unbounded(shape=(B, n, 1)), shape=(B, n))
            act[name] = Composite(action=Bounded(-1.0, 1.0, shape=(B, n, 1)), shape=(B, n))
            rew[name] = Composite(reward=Unbounded(shape=(B, n, 1)), shape=(B, n))
        self.observation_spec = Composite(obs, shape=(B,))
        self.action_spec = Composite(act, shape=(B,))
        self.reward_spec = Composite(rew, shape=(B,))
        self.done_spec = Composite(
            done=Categorical(2, shape=(B, 1), dtype=torch.bool),
            terminated=Categorical(2, shape=(B, 1), dtype=torch.bool),
            truncated=Categorical(2, shape=(B, 1), dtype=torch.bool),
            shape=(B,),
        )
        self.t = torch.zeros(B, 1, dtype=torch.int64)

    def expected_episode_sum(self, group_index: int, agent: int, length: int) -> float:
        return 10**group_index * (agent + 1) * length * (length + 1) / 2

    def _set_seed(self, seed):
        pass

    def _groups_td(self, reward=None):
        B = self.batch_size[0]
        out = {}
        for g, (name, n) in enumerate(self.groups.items()):
            entries = {"observation": self.t.float().unsqueeze(-1).expand(B, n, 1).clone()}
            if self.nan_obs_at_call is not None and self._calls >= self.nan_obs_at_call:
                entries["observation"] = entries["observation"] * float("nan")
            if reward is not None:
                agent_scale = torch.arange(1, n + 1, dtype=torch.float32).reshape(1, n, 1)
                entries["reward"] = 10**g * agent_scale * self.t.float().unsqueeze(-1)
            out[name] = TensorDict(entries, batch_size=(B, n))
        return out

    def _reset(self, tensordict=None, **kwargs):
        B = self.batch_size[0]
        mask = torch.ones(B, dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        self.t[mask] = 0
        zeros = torch.zeros(B, 1, dtype=torch.bool)
        return TensorDict(
            {**self._groups_td(), "done": zeros.clone(), "terminated": zeros.clone(), "truncated": zeros.clone()},
            batch_size=self.batch_size,
        )

    def _step(self, tensordict):
        self._calls += 1
        self.t = self.t + 1
        terminated = self.t >= self.lengths
        return TensorDict(
            {
                **self._groups_td(reward=True),
                "done": terminated.clone(),
                "terminated": terminated,
                "truncated": torch.zeros_like(terminated),
            },
            batch_size=self.batch_size,
        )


def make_nan_env(*, num_envs, max_steps, device, seed, nan_obs_at_call=25):
    """Recipe factory: one group of 2 agents whose observations turn NaN after some steps."""
    return ScriptedEnv(episode_lengths=[max_steps] * num_envs, groups={"agents": 2}, nan_obs_at_call=nan_obs_at_call)


class CountingEnv(EnvBase):
    """Single-agent env for the Dreamer recipe: ``observation = [t / L, 1]``, two one-hot actions,
    reward 1 per step, episodes of ``length`` steps (terminated). Observations turn NaN after
    ``nan_obs_at_call`` steps when set."""

    batch_locked = True

    def __init__(self, num_envs: int = 1, length: int = 8, nan_obs_at_call: int | None = None):
        super().__init__(batch_size=torch.Size([num_envs]))
        from torchrl.data import OneHot

        B = num_envs
        self.length = length
        self.nan_obs_at_call = nan_obs_at_call
        self._calls = 0
        self.observation_spec = Composite(observation=Unbounded(shape=(B, 2)), shape=(B,))
        self.action_spec = OneHot(2, shape=(B, 2))
        self.reward_spec = Unbounded(shape=(B, 1))
        from torchrl.data import Categorical

        self.done_spec = Composite({k: Categorical(2, shape=(B, 1), dtype=torch.bool)
                                    for k in ("done", "terminated", "truncated")}, shape=(B,))
        self.t = torch.zeros(B, 1)

    def _set_seed(self, seed):
        pass

    def _obs(self):
        obs = torch.cat([self.t / self.length, torch.ones_like(self.t)], -1)
        if self.nan_obs_at_call is not None and self._calls >= self.nan_obs_at_call:
            obs = obs * float("nan")
        return obs

    def _reset(self, tensordict=None, **kwargs):
        B = self.batch_size[0]
        mask = torch.ones(B, dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        self.t[mask] = 0
        zeros = torch.zeros(B, 1, dtype=torch.bool)
        return TensorDict({"observation": self._obs(), "done": zeros, "terminated": zeros.clone(),
                           "truncated": zeros.clone()}, batch_size=self.batch_size)

    def _step(self, tensordict):
        self._calls += 1
        self.t = self.t + 1
        terminated = self.t >= self.length
        return TensorDict({"observation": self._obs(), "reward": torch.ones_like(self.t), "done": terminated.clone(),
                           "terminated": terminated, "truncated": torch.zeros_like(terminated)},
                          batch_size=self.batch_size)


def make_counting_env(*, num_envs, max_steps, device, seed, length=8, nan_obs_at_call=None):
    """Dreamer-recipe factory for :class:`CountingEnv`."""
    return CountingEnv(num_envs=num_envs, length=length, nan_obs_at_call=nan_obs_at_call)
