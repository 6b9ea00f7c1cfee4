"""A single-agent TorchRL env with masked discrete actions: the worked example of plugging your own
masked env into a recipe (Dreamer or PPO).

An agent walks on a ``size x size`` grid with pillars (every cell with both coordinates odd) toward a
goal. Five actions: 0 stay, 1 up, 2 down, 3 left, 4 right. A move off the grid or into a pillar is
**masked**: the env publishes ``action_mask`` (True = allowed) with every observation and, with
``strict=True`` (the default), raises :class:`MaskedActionError` when an agent takes a masked action,
as a real simulator with hard constraints would. Everything is batched over ``num_envs`` and
partial resets go through ``"_reset"``.

Keys (``B = num_envs``):

* ``observation`` ``[B, 4]`` float: agent ``(x, y)`` and goal ``(x, y)``, divided by ``size - 1``.
* ``action_mask`` ``[B, 5]`` bool: the allowed actions at the agent's cell.
* ``action``: ``Categorical(5)`` (an index ``[B]``) by default, ``action_spec="one_hot"`` for ``OneHot(5)``.
* ``reward`` ``[B, 1]``: ``+1`` on reaching the goal (the episode terminates), ``-step_cost`` otherwise.
* ``done``/``terminated``/``truncated`` ``[B, 1]``; truncated after ``max_steps`` (0 = ``4 * size``).

Reference policy: :func:`scripted_action` walks a shortest path (breadth-first distances to the
goal), so the best mean return is known (``benchmarks/dreamer_vs_ppo.py`` prints it).

Use it from a recipe with ``env.factory=envs.masked_grid:make_env`` (``--env custom`` does), and
give Dreamer the exact imagined masks with ``env.mask_rule=envs.masked_grid:mask_rule``.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Categorical, Composite, OneHot, Unbounded
from torchrl.envs import EnvBase

__all__ = ["MaskedGridEnv", "MaskedActionError", "make_env", "mask_rule", "allowed_table", "scripted_action"]

MOVES = torch.tensor([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]])  # stay, up, down, left, right


class MaskedActionError(RuntimeError):
    """An agent took an action its ``action_mask`` forbids."""


@lru_cache(maxsize=8)
def _layout(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(free [size*size] bool, allowed [size*size, 5] bool, distance [size*size, size*size] long)``;
    cell index ``x * size + y``."""
    xs, ys = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    free = ~((xs % 2 == 1) & (ys % 2 == 1))
    nx, ny = xs[:, None] + MOVES[:, 0], ys[:, None] + MOVES[:, 1]
    inside = (nx >= 0) & (nx < size) & (ny >= 0) & (ny < size)
    target = (nx.clamp(0, size - 1) * size + ny.clamp(0, size - 1))
    allowed = inside & free[target] & free[:, None]
    n = size * size
    dist = torch.full((n, n), n, dtype=torch.long)  # breadth-first distances between free cells
    for src in range(n):
        if not free[src]:
            continue
        dist[src, src] = 0
        frontier = [src]
        while frontier:
            nxt = []
            for c in frontier:
                for a in range(1, 5):
                    if allowed[c, a]:
                        t = int(target[c, a])
                        if dist[src, t] > dist[src, c] + 1:
                            dist[src, t] = dist[src, c] + 1
                            nxt.append(t)
            frontier = nxt
    return free, allowed, dist


def allowed_table(size: int = 5) -> torch.Tensor:
    """``[size*size, 5]`` bool: the allowed actions of every cell (``x * size + y``)."""
    return _layout(size)[1].clone()


def _cells(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised ``(x, y)`` ``[..., 2]`` -> cell index (rounded, clamped to the grid)."""
    xy = (positions * (size - 1)).round().long().clamp(0, size - 1)
    return xy[..., 0] * size + xy[..., 1]


def mask_rule(obs: dict[str, torch.Tensor], size: int = 5) -> torch.Tensor:
    """The action mask as a function of the observation (for ``env.mask_rule``): ``obs["observation"]
    [N, 4]`` (possibly a world model's decoded, inexact one) -> ``[N, 5]`` bool, for the default grid
    ``size=5`` (other sizes: wrap it, e.g. ``functools.partial(mask_rule, size=7)`` in your module)."""
    observation = obs["observation"]
    allowed = _layout(size)[1].to(observation.device)
    return allowed[_cells(observation[..., :2], size)]


def scripted_action(observation: torch.Tensor, size: int = 5) -> torch.Tensor:
    """A shortest-path action index ``[N]`` for observations ``[N, 4]`` (the reference policy)."""
    _, allowed, dist = _layout(size)
    here, goal = _cells(observation[..., :2], size), _cells(observation[..., 2:], size)
    xy = torch.stack([here // size, here % size], -1)
    nxt = (xy[:, None, :] + MOVES).clamp(0, size - 1)
    nxt_cell = nxt[..., 0] * size + nxt[..., 1]
    d = dist[nxt_cell, goal[:, None]].masked_fill(~allowed[here], 10 ** 6)
    return d.argmin(-1)


class MaskedGridEnv(EnvBase):
    """Batched grid walk with masked moves (see module docstring)."""

    batch_locked = True

    def __init__(self, num_envs: int = 8, size: int = 5, max_steps: int = 0, step_cost: float = 0.04,
                 strict: bool = True, action_spec: str = "categorical", device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        if num_envs < 1 or size < 3 or max_steps < 0:
            raise ValueError("num_envs >= 1, size >= 3 and max_steps >= 0 are required")
        if action_spec not in ("categorical", "one_hot"):
            raise ValueError(f"action_spec must be 'categorical' or 'one_hot', got '{action_spec}'")
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.size, self.max_steps, self.step_cost, self.strict = size, max_steps or 4 * size, step_cost, strict
        self.one_hot = action_spec == "one_hot"
        B = num_envs
        free, allowed, _ = _layout(size)
        self._free_cells = free.nonzero().squeeze(-1)
        self._allowed = allowed.to(self.device)
        self.observation_spec = Composite(
            observation=Unbounded(shape=(B, 4), device=self.device),
            action_mask=Binary(n=5, shape=(B, 5), dtype=torch.bool, device=self.device),
            step_count=Unbounded(shape=(B, 1), dtype=torch.int64, device=self.device),
            shape=(B,), device=self.device)
        self.action_spec = (OneHot(5, shape=(B, 5), device=self.device) if self.one_hot
                            else Categorical(5, shape=(B,), device=self.device))
        self.reward_spec = Unbounded(shape=(B, 1), device=self.device)
        self.done_spec = Composite(
            done=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            terminated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            truncated=Categorical(2, shape=(B, 1), dtype=torch.bool, device=self.device),
            shape=(B,), device=self.device)
        self._cell = torch.zeros(B, dtype=torch.long, device=self.device)
        self._goal = torch.zeros(B, dtype=torch.long, device=self.device)
        self._steps = torch.zeros(B, 1, dtype=torch.int64, device=self.device)
        self.set_seed(seed)

    def _set_seed(self, seed: int | None) -> None:
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(0 if seed is None else int(seed))

    def _observation(self) -> TensorDict:
        s = self.size
        xy = lambda c: torch.stack([c // s, c % s], -1).float() / (s - 1)  # noqa: E731
        return TensorDict({"observation": torch.cat([xy(self._cell), xy(self._goal)], -1),
                           "action_mask": self._allowed[self._cell].clone(), "step_count": self._steps.clone()},
                          batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B = self.batch_size[0]
        reset = None if tensordict is None else tensordict.get("_reset", None)
        reset = torch.ones(B, dtype=torch.bool, device=self.device) if reset is None else reset.reshape(B)
        n = int(reset.sum())
        if n:
            k = len(self._free_cells)
            start = torch.randint(k, (n,), generator=self._rng)
            goal = (start + 1 + torch.randint(k - 1, (n,), generator=self._rng)) % k  # never the start cell
            self._cell[reset] = self._free_cells[start].to(self.device)
            self._goal[reset] = self._free_cells[goal].to(self.device)
            self._steps[reset] = 0
        out = self._observation()
        zeros = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        out.update({"done": zeros, "terminated": zeros.clone(), "truncated": zeros.clone()})
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action")
        index = action.to(torch.uint8).argmax(-1) if self.one_hot else action.reshape(-1).long()
        legal = self._allowed[self._cell, index]
        if self.strict and not bool(legal.all()):
            bad = int((~legal).nonzero()[0, 0])
            raise MaskedActionError(f"a masked action was taken: env {bad} chose action {int(index[bad])} "
                                    f"at cell {int(self._cell[bad])} (allowed {self._allowed[self._cell[bad]].tolist()})")
        s = self.size
        xy = torch.stack([self._cell // s, self._cell % s], -1) + MOVES.to(self.device)[index]
        moved = xy[:, 0].clamp(0, s - 1) * s + xy[:, 1].clamp(0, s - 1)
        self._cell = torch.where(legal, moved, self._cell)  # strict=False: a masked move stays put
        self._steps = self._steps + 1
        reached = (self._cell == self._goal).unsqueeze(-1)
        truncated = (self._steps >= self.max_steps) & ~reached
        out = self._observation()
        out.update({"reward": torch.where(reached, 1.0, -self.step_cost), "done": reached | truncated,
                    "terminated": reached, "truncated": truncated})
        return out


def make_env(*, num_envs: int, max_steps: int, device: str | torch.device, seed: int, **kwargs) -> MaskedGridEnv:
    """Factory with the signature recipes call: ``num_envs``, ``max_steps`` (0 = the env's own
    limit), ``device``, ``seed`` + ``env.kwargs`` (``size``, ``step_cost``, ``strict``, ``action_spec``)."""
    return MaskedGridEnv(num_envs=num_envs, max_steps=max_steps, device=device, seed=seed, **kwargs)
