"""A small multi-agent TorchRL env, written as the example of plugging your own env into a recipe.

``n_agents`` point agents on the plane each steer toward their own goal. Everything is batched
over ``num_envs`` (no Python loop over envs) and follows TorchRL conventions: specs declared,
rewards emitted by ``step``, partial resets through ``"_reset"``.

Keys (``B = num_envs``, ``A = n_agents``):

* ``("agents", "observation")`` ``[B, A, 4]``: own position and vector to own goal.
* ``("agents", "action")`` ``[B, A, 2]`` in ``[-1, 1]``: velocity; position moves by ``0.1 * action``.
* ``("agents", "reward")`` ``[B, A, 1]``: decrease of the agent's distance to its goal, plus 1 when
  every agent is within 0.05 of its goal (then the episode terminates).
* ``done``/``terminated``/``truncated`` ``[B, 1]``: env-level flags (truncated after ``max_steps``).

Use it from a recipe with ``env.factory=envs.goal_reaching:make_env env.kwargs.n_agents=2``.
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = ["GoalReachingEnv", "make_env"]


class GoalReachingEnv(EnvBase):
    """Batched multi-agent goal reaching (see module docstring)."""

    batch_locked = True

    def __init__(
        self,
        num_envs: int = 8,
        n_agents: int = 2,
        max_steps: int = 50,
        device: str | torch.device = "cpu",
        seed: int = 0,
        step_size: float = 0.1,
        goal_radius: float = 0.05,
    ) -> None:
        if num_envs < 1 or n_agents < 1 or max_steps < 0:
            raise ValueError("num_envs >= 1, n_agents >= 1 and max_steps >= 0 (0 = the default 50) are required")
        max_steps = max_steps or 50
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.n_agents = n_agents
        self.max_steps = max_steps
        self.step_size = step_size
        self.goal_radius = goal_radius
        B, A = num_envs, n_agents
        self.observation_spec = Composite(
            agents=Composite(
                observation=Unbounded(shape=(B, A, 4), device=self.device), shape=(B, A), device=self.device
            ),
            step_count=Unbounded(shape=(B, 1), dtype=torch.int64, device=self.device),
            shape=(B,),
            device=self.device,
        )
        self.action_spec = Composite(
            agents=Composite(
                action=Bounded(low=-1.0, high=1.0, shape=(B, A, 2), device=self.device), shape=(B, A), device=self.device
            ),
            shape=(B,),
            device=self.device,
        )
        self.reward_spec = Composite(
            agents=Composite(reward=Unbounded(shape=(B, A, 1), device=self.device), shape=(B, A), device=self.device),
            shape=(B,),
            device=self.device,
        )
        self.done_spec = Composite(
            done=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            terminated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            truncated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            shape=(B,),
            device=self.device,
        )
        self._pos = torch.zeros(B, A, 2, device=self.device)
        self._goal = torch.zeros(B, A, 2, device=self.device)
        self._steps = torch.zeros(B, 1, dtype=torch.int64, device=self.device)
        self.set_seed(seed)

    def _set_seed(self, seed: int | None) -> None:
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(0 if seed is None else int(seed))

    def _uniform(self, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=self._rng) * 2 - 1).to(self.device)

    def _observation(self) -> torch.Tensor:
        return torch.cat([self._pos, self._goal - self._pos], dim=-1)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B, A = self.batch_size[0], self.n_agents
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(B)
        if mask is None:
            mask = torch.ones(B, dtype=torch.bool, device=self.device)
        n = int(mask.sum())
        if n:
            self._pos[mask] = self._uniform(n, A, 2)
            self._goal[mask] = self._uniform(n, A, 2)
            self._steps[mask] = 0
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        return TensorDict(
            {
                "agents": TensorDict({"observation": self._observation()}, batch_size=(B, A)),
                "step_count": self._steps.clone(),
                "done": zeros.clone(),
                "terminated": zeros.clone(),
                "truncated": zeros,
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        B, A = self.batch_size[0], self.n_agents
        action = tensordict.get(("agents", "action")).clamp(-1.0, 1.0)
        dist_before = (self._goal - self._pos).norm(dim=-1, keepdim=True)
        self._pos = self._pos + self.step_size * action
        dist_after = (self._goal - self._pos).norm(dim=-1, keepdim=True)
        self._steps = self._steps + 1
        all_reached = (dist_after <= self.goal_radius).all(dim=1)  # [B, 1]
        reward = (dist_before - dist_after) + all_reached.unsqueeze(1).float()
        terminated = all_reached
        truncated = self._steps >= self.max_steps
        return TensorDict(
            {
                "agents": TensorDict({"observation": self._observation(), "reward": reward}, batch_size=(B, A)),
                "step_count": self._steps.clone(),
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
            batch_size=self.batch_size,
            device=self.device,
        )


def make_env(*, num_envs: int, max_steps: int, device: str | torch.device, seed: int, **kwargs) -> GoalReachingEnv:
    """Factory with the signature recipes call: ``num_envs``, ``max_steps``, ``device``, ``seed`` + kwargs."""
    return GoalReachingEnv(num_envs=num_envs, max_steps=max_steps, device=device, seed=seed, **kwargs)
