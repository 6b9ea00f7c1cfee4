"""Env factories that each break one part of the single-agent env contract (for the checker and
the recipes' start-up check). Built on envs/masked_grid.py; each factory has the recipes'
signature. Imported by name (``broken_envs:missing_reward``): tests/ is on sys.path."""
from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data import Binary, Composite, OneHot, Unbounded

from envs.masked_grid import MaskedGridEnv


def _grid(num_envs, seed, device="cpu", **kw):
    return MaskedGridEnv(num_envs=num_envs, seed=seed, device=device, **kw)


class _NoReward(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reward_spec = Composite(shape=self.batch_size)

    def _step(self, td):
        out = super()._step(td)
        del out["reward"]
        return out


def missing_reward(*, num_envs, max_steps, device, seed):
    return _NoReward(num_envs=num_envs, seed=seed, device=device)


class _RenamedObs(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        spec = self.observation_spec
        spec["obs"] = spec.pop("observation")

    def _observation(self):
        out = super()._observation()
        out["obs"] = out.pop("observation")
        return out


def misnamed_key(*, num_envs, max_steps, device, seed):
    return _RenamedObs(num_envs=num_envs, seed=seed, device=device)


class _RenamedReward(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reward_spec = Composite(rew=Unbounded(shape=(*self.batch_size, 1)), shape=self.batch_size)

    def _step(self, td):
        out = super()._step(td)
        out["rew"] = out.pop("reward")
        return out


def misnamed_reward(*, num_envs, max_steps, device, seed):
    return _RenamedReward(num_envs=num_envs, seed=seed, device=device)


class _IntObs(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.observation_spec["observation"] = Unbounded(shape=(*self.batch_size, 4), dtype=torch.int64)

    def _observation(self):
        out = super()._observation()
        out["observation"] = (out["observation"] * (self.size - 1)).round().long()
        return out


def wrong_dtype(*, num_envs, max_steps, device, seed):
    return _IntObs(num_envs=num_envs, seed=seed, device=device)


class _NoDone(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.done_spec = Composite(shape=self.batch_size)

    def _reset(self, td=None, **kw):
        return super()._reset(td).exclude("done", "terminated", "truncated")

    def _step(self, td):
        return super()._step(td).exclude("done", "terminated", "truncated")


def no_done(*, num_envs, max_steps, device, seed):
    return _NoDone(num_envs=num_envs, seed=seed, device=device)


class _OneHotSpecIndexStep(MaskedGridEnv):
    """Declares OneHot actions but its step reads an index (as a Categorical env would)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.action_spec = OneHot(5, shape=(*self.batch_size, 5))

    def _step(self, td):
        action = td["action"]
        td = td.clone(False)
        td["action"] = action.reshape(-1)  # wrong: a [B, 5] one-hot read as [B * 5] indices
        self.one_hot = False
        return super()._step(td)


def categorical_vs_one_hot(*, num_envs, max_steps, device, seed):
    return _OneHotSpecIndexStep(num_envs=num_envs, seed=seed, device=device)


class _ShortMask(MaskedGridEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.observation_spec["action_mask"] = Binary(n=4, shape=(*self.batch_size, 4), dtype=torch.bool)

    def _observation(self):
        out = super()._observation()
        out["action_mask"] = out["action_mask"][:, 1:]
        return out


def mask_wrong_shape(*, num_envs, max_steps, device, seed):
    return _ShortMask(num_envs=num_envs, seed=seed, device=device)


def unbatched(*, num_envs, max_steps, device, seed):
    return MaskedGridEnv(num_envs=1, seed=seed, device=device)  # ignores num_envs


def gymnasium_env(*, num_envs, max_steps, device, seed):
    import gymnasium

    return gymnasium.make("CartPole-v1")


def multi_agent(*, num_envs, max_steps, device, seed):
    from envs.goal_reaching import make_env

    return make_env(num_envs=num_envs, max_steps=max_steps, device=device, seed=seed)


def all_masked_after_reset(*, num_envs, max_steps, device, seed):
    """A masked env whose mask forbids every action (a bug the recipes must name)."""
    env = _grid(num_envs, seed, device)
    env._allowed = torch.zeros_like(env._allowed)
    return env


# name -> (factory, the problem the checker must name)
BROKEN = {
    "missing_reward": ("broken_envs:missing_reward", "reward"),
    "misnamed_key": ("broken_envs:misnamed_key", "observation_key"),
    "misnamed_reward": ("broken_envs:misnamed_reward", "reward_key"),
    "wrong_dtype": ("broken_envs:wrong_dtype", "observation_dtype"),
    "no_done": ("broken_envs:no_done", "done"),
    "categorical_vs_one_hot": ("broken_envs:categorical_vs_one_hot", "rollout"),
    "mask_wrong_shape": ("broken_envs:mask_wrong_shape", "mask_shape"),
    "unbatched": ("broken_envs:unbatched", "batch"),
    "gymnasium_env": ("broken_envs:gymnasium_env", "not_torchrl"),
    "multi_agent": ("broken_envs:multi_agent", "agents"),
}
#: broken for MAPPO (multi-agent)
BROKEN_MAPPO = {
    "multi_agent_misnamed_reward": ("broken_envs:multi_agent_misnamed_reward", "reward_key"),
    "single_agent": ("envs.masked_grid:make_env", "agents"),
}

__all__ = ["BROKEN", "BROKEN_MAPPO", "TensorDict"]


class _RenamedAgentReward:
    """Multi-agent goal reaching whose reward is ('agents', 'rew')."""

    def __new__(cls, **kw):
        from torchrl.envs import RenameTransform, TransformedEnv

        from envs.goal_reaching import make_env

        return TransformedEnv(make_env(**kw), RenameTransform([("agents", "reward")], [("agents", "rew")]))


def multi_agent_misnamed_reward(*, num_envs, max_steps, device, seed):
    return _RenamedAgentReward(num_envs=num_envs, max_steps=max_steps, device=device, seed=seed)
