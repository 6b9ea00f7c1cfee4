"""Transforms shared by every recipe.

* :class:`DoneToAgents` copies the env-level ``done``/``terminated``/``truncated`` flags
  (``[*B, 1]``) into every agent group (``[*B, n_agents, 1]``), at reset and at every step, so
  GAE and the losses see flags with the reward's shape. Groups are
  discovered from the env's reward keys; any group name and several groups work.
* :class:`EpisodeRewardSum` is TorchRL's :class:`~torchrl.envs.transforms.RewardSum` over every
  reward key, plus :meth:`EpisodeRewardSum.summarise`, which turns a collected batch into the
  numbers to log: the reward SUM of each *finished* episode (``train/episode_reward_sum``) and,
  clearly apart, the per-step reward mean (``train/step_reward_mean``).
* :class:`CategoricalToOneHot` gives an env with a ``Categorical`` (integer index) action spec a
  ``OneHot`` one, so the agents see one discrete action kind (TorchRL ships no transform for
  this direction; ``DiscreteActionProjection`` maps one-hot to one-hot).
* :class:`WorkerTag` marks every step with the index of the collector worker that ran it.
* :class:`StillSteps` appends to a vector observation how many consecutive steps it has stayed
  (nearly) unchanged, for envs whose episode ends after a hidden period at rest.
* :class:`TimeFeature` appends the steps left before the episode's step limit (log scale) and
  makes the limit a termination, so a time-limited env is Markov for the learner.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torchrl.data import Binary, Categorical, Composite, OneHot
from torchrl.envs import EnvBase, RewardSum, Transform

__all__ = ["reward_keys", "DoneToAgents", "EpisodeRewardSum", "group_name", "CategoricalToOneHot", "WorkerTag",
           "StillSteps", "TimeFeature"]

DONE_FLAGS = ("done", "terminated", "truncated")


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def group_name(reward_key: NestedKey) -> str:
    """``("agents", "reward") -> "agents"``; a root ``"reward"`` -> ``""``."""
    return "/".join(_as_tuple(reward_key)[:-1])


def reward_keys(env: EnvBase) -> list[tuple[str, ...]]:
    """Every reward key of ``env`` as a tuple (``[("agents", "reward")]`` for VMAS)."""
    return [_as_tuple(k) for k in env.reward_keys]


class DoneToAgents(Transform):
    """Expands root done flags into each agent group, in data and at reset.

    Args:
        env: the env to be transformed (used to discover groups, their shapes and which flags
            exist). Every reward key with a prefix (``(group, "reward")``) defines a group; the
            expanded flags take that reward's shape ``[*B, n_agents, 1]``.
        flags: which root flags to copy; those the env does not have are skipped.

    After the transform ``td[group, "done"]`` (and ``td["next", group, "done"]``) equals the root
    flag broadcast to the group's reward shape, for every group. The new entries are declared as
    observations (not done keys), so TorchRL's reset logic is unchanged.

    (TorchRL's ``ExpandAs`` does the same for one key, but inside a nested ``Compose`` its reset
    path looks up its parent and fails with ``IndexError`` in torchrl 0.14.1, so this transform
    does the broadcast itself from shapes read once at construction.)
    """

    def __init__(self, env: EnvBase, flags: Sequence[str] = DONE_FLAGS) -> None:
        root_done = {_as_tuple(k) for k in env.done_keys}
        n_batch = len(env.batch_size)
        self.expansions: list[tuple[str, tuple[str, ...], torch.Size]] = []
        self.groups: list[tuple[str, ...]] = []
        for reward_key in reward_keys(env):
            group = reward_key[:-1]
            if not group:
                continue
            self.groups.append(group)
            group_shape = env.full_reward_spec[reward_key].shape[n_batch:]  # [n_agents, 1]
            for flag in flags:
                if (flag,) in root_done and (*group, flag) not in root_done:
                    self.expansions.append((flag, (*group, flag), group_shape))
        if not self.expansions:
            raise ValueError(
                "DoneToAgents found nothing to expand: the env has no reward key inside a group "
                f"(reward keys: {env.reward_keys}) or no root done flags (done keys: {env.done_keys})"
            )
        super().__init__(
            in_keys=[flag for flag, _, _ in self.expansions],
            out_keys=[out for _, out, _ in self.expansions],
        )

    @staticmethod
    def _expand(flag: torch.Tensor, group_shape: torch.Size) -> torch.Tensor:
        # flag: [*B, 1] -> [*B, *group_shape]; every agent gets the env's value.
        batch_shape = flag.shape[:-1]
        view = flag.reshape(*batch_shape, *([1] * len(group_shape)))
        return view.expand(*batch_shape, *group_shape)

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        for flag, out_key, group_shape in self.expansions:
            value = next_tensordict.get(flag, None)
            if value is not None:
                next_tensordict.set(out_key, self._expand(value, group_shape).clone())
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        parent_done = self.parent.full_done_spec if self.parent is not None else None
        for flag, out_key, group_shape in self.expansions:
            if parent_done is not None:
                flag_spec = parent_done[flag]
                batch_shape = flag_spec.shape[:-1]
                spec = Binary(
                    n=group_shape[-1],
                    shape=(*batch_shape, *group_shape),
                    dtype=flag_spec.dtype,
                    device=flag_spec.device,
                )
            else:
                spec = Binary(n=group_shape[-1], shape=group_shape, dtype=torch.bool)
            observation_spec[out_key] = spec
        return observation_spec


class EpisodeRewardSum(RewardSum):
    """``RewardSum`` over every reward key of an env, with a batch summary for logging.

    ``env`` provides the reward keys; the running sums are written to ``(group, "episode_reward")``.
    """

    def __init__(self, env: EnvBase) -> None:
        self.reward_keys_ = reward_keys(env)
        out_keys = [(*k[:-1], "episode_reward") for k in self.reward_keys_]
        super().__init__(in_keys=list(self.reward_keys_), out_keys=out_keys)

    def summarise(self, batch: TensorDictBase, prefix: str = "train") -> dict[str, float]:
        """Numbers to log from a collected batch ``[*B, T]``.

        * ``{prefix}/episode_reward_sum``: mean over every finished episode (and agent) of the
          reward summed over that episode. Only entries where ``("next", group, "done")`` is True
          count, so unfinished episodes never dilute it. ``NaN`` if no episode finished.
        * ``{prefix}/episode_reward_sum/<group>``: the same per group when there are several.
        * ``{prefix}/episodes_finished``: number of finished (env) episodes in the batch.
        * ``{prefix}/step_reward_mean``: reward per env step, averaged over steps and agents. This
          is NOT a measure of performance; it is logged so nobody mistakes one for the other.
        """
        out: dict[str, float] = {}
        sums, step_means = [], []
        root_done = batch.get(("next", "done"))
        for reward_key, out_key in zip(self.reward_keys_, self.out_keys):
            group = reward_key[:-1]
            reward = batch.get(("next", *reward_key))
            done = batch.get(("next", *group, "done"), None)
            if done is None:  # group without an expanded flag: broadcast the root flag
                done = root_done
                while done.ndim < reward.ndim:
                    done = done.unsqueeze(-2)
                done = done.expand_as(reward)
            finished = batch.get(("next", *out_key))[done.expand_as(reward)]
            sums.append(finished)
            step_means.append(reward.float().mean())
            if len(self.reward_keys_) > 1:
                name = "/".join(group) or "root"
                out[f"{prefix}/episode_reward_sum/{name}"] = (
                    finished.float().mean().item() if finished.numel() else float("nan")
                )
        all_sums = torch.cat([s.float().reshape(-1) for s in sums])
        out[f"{prefix}/episode_reward_sum"] = all_sums.mean().item() if all_sums.numel() else float("nan")
        out[f"{prefix}/episodes_finished"] = float(root_done.sum().item())
        out[f"{prefix}/step_reward_mean"] = torch.stack(step_means).mean().item()
        return out


class CategoricalToOneHot(Transform):
    """A ``Categorical(n)`` action spec becomes ``OneHot(n)``: the policy writes one-hot actions
    ``[*B, n]`` and the env receives their index (``[*B]``, or ``[*B, 1]`` when its spec has that
    trailing dim) with the spec's dtype. ``action_key`` names the action (root ``"action"``)."""

    def __init__(self, action_key: NestedKey = "action") -> None:
        super().__init__(in_keys=[], out_keys=[], in_keys_inv=[action_key], out_keys_inv=[action_key])
        self.action_key = action_key
        self._trailing_one = False
        self._dtype = torch.int64

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return next_tensordict

    def _inv_apply_transform(self, action: torch.Tensor) -> torch.Tensor:
        index = action.to(torch.uint8).argmax(-1).to(self._dtype)
        return index.unsqueeze(-1) if self._trailing_one else index

    def transform_input_spec(self, input_spec: Composite) -> Composite:
        key = ("full_action_spec", *_as_tuple(self.action_key))
        spec = input_spec[key]
        if not isinstance(spec, Categorical):
            raise TypeError(f"CategoricalToOneHot needs a Categorical action spec at {self.action_key!r}, got "
                            f"{type(spec).__name__}")
        n = int(spec.space.n)
        self._trailing_one = len(spec.shape) > 0 and spec.shape[-1] == 1 and n != 1
        self._dtype = spec.dtype
        lead = spec.shape[:-1] if self._trailing_one else spec.shape
        input_spec = input_spec.clone()
        mask = getattr(spec, "mask", None)
        input_spec[key] = OneHot(n, shape=(*lead, n), device=spec.device, dtype=torch.int64)
        if mask is not None:
            input_spec[key].update_mask(mask.reshape(*lead, n))
        return input_spec


class WorkerTag(Transform):
    """Writes the constant ``worker`` index (int64, one per env of the batch) into every reset and step
    output, so a learner receiving batches from several collector workers (processes or Ray actors,
    in any order) knows which worker's envs a batch row belongs to and keeps one replay stream per
    env. Everything else passes through unchanged."""

    def __init__(self, worker: int, key: str = "worker") -> None:
        super().__init__(in_keys=[], out_keys=[key])
        self.worker, self.key = int(worker), key

    def _tag(self, td: TensorDictBase) -> TensorDictBase:
        td.set(self.key, torch.full(td.batch_size, self.worker, dtype=torch.int64, device=td.device))
        return td

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._tag(next_tensordict)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._tag(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        from torchrl.data import Unbounded

        observation_spec[self.key] = Unbounded(shape=observation_spec.shape, dtype=torch.int64,
                                               device=observation_spec.device)
        return observation_spec


class _AppendedEntry(Transform):
    """One float entry appended to the vector observation ``key`` (``initial`` after a reset; the rows that go on
    keep theirs at a partial reset). A subclass computes it in ``_step``; it reads its own previous value
    at the observation's width where it appends, so several such entries stack in order."""

    initial: float = 0.0  # the entry after a reset

    def __init__(self, key: NestedKey) -> None:
        super().__init__(in_keys=[key], out_keys=[key])
        self.key = key

    def _next_entry(self, raw: torch.Tensor, previous_raw: torch.Tensor, previous_entry: torch.Tensor,
                    next_tensordict: TensorDictBase) -> torch.Tensor:
        """The entry for the step's new observation ``raw`` (``[..., 1]``), from the previous observation's
        own entries and this transform's entry; may also set flags in ``next_tensordict``. The base class
        appends nothing of its own: a subclass defines this."""
        raise NotImplementedError(f"{type(self).__name__} subclasses _AppendedEntry without defining _next_entry")

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        raw = next_tensordict.get(self.key)
        n = raw.shape[-1]  # entries before this transform's; the previous observation has this entry at n
        previous = tensordict.get(self.key)  # (and whatever later transforms append after it)
        entry = self._next_entry(raw, previous[..., :n], previous[..., n:n + 1], next_tensordict)
        next_tensordict.set(self.key, torch.cat([raw, entry.to(raw.dtype)], -1))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        raw = tensordict_reset.get(self.key)
        entry = torch.full_like(raw[..., :1], self.initial)
        reset = tensordict.get("_reset", None) if tensordict is not None else None
        previous = tensordict.get(self.key, None) if tensordict is not None else None
        n = raw.shape[-1]
        if reset is not None and previous is not None and previous.shape[-1] > n:
            entry = torch.where(reset.reshape(entry.shape), entry, previous[..., n:n + 1])
        tensordict_reset.set(self.key, torch.cat([raw, entry], -1))
        return tensordict_reset

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        from torchrl.data import Unbounded

        name = type(self).__name__
        if self.key not in observation_spec.keys(True):
            raise KeyError(f"{name} appends to the observation {self.key!r}, which this env does not have "
                           f"(observations: {sorted(map(str, observation_spec.keys(True, True)))})")
        spec = observation_spec[self.key]
        if len(spec.shape) == len(observation_spec.shape):
            raise ValueError(f"{name} needs a vector observation at {self.key!r}, got shape {tuple(spec.shape)}")
        observation_spec[self.key] = Unbounded(shape=(*spec.shape[:-1], spec.shape[-1] + 1), dtype=spec.dtype,
                                               device=spec.device)
        return observation_spec


class StillSteps(_AppendedEntry):
    """Appends one entry to the vector observation ``key``: the number of consecutive steps over
    which every entry of the (raw) observation changed by less than ``tol``, 0 after a reset.

    Some envs end an episode after the state has been at rest for a while, on a timer the
    observation does not show. Gymnasium's LunarLander is one: the landing bonus (+100) and the
    episode's end come when Box2D puts the resting lander to sleep, about half a simulated second
    after it stopped, and the last observation equals the ones before it. A world model then
    cannot tell the final row from the rows before it, so it predicts neither the bonus nor the
    end. With this count in the observation both become predictable. The observation spec gains
    one entry (``[..., n] -> [..., n + 1]``); the count is a float.
    """

    def __init__(self, tol: float, key: NestedKey = "observation") -> None:
        if not tol > 0:
            raise ValueError(f"StillSteps tol must be > 0, got {tol}")
        super().__init__(key)
        self.tol = float(tol)

    def _next_entry(self, raw, previous_raw, previous_entry, next_tensordict):
        still = (raw - previous_raw).abs().amax(-1, keepdim=True) < self.tol
        return torch.where(still, previous_entry + 1, torch.zeros_like(previous_entry))


class TimeFeature(_AppendedEntry):
    """Appends one entry to the vector observation ``key``: ``log(1 + steps left)`` before the
    episode's step limit (``log(1 + limit)`` after a reset, ``log 2`` one step before the limit, 0 at
    it), and ends the episode at the limit as a termination (``terminated`` and ``done`` set on the
    step that reaches it).

    A time limit the agent cannot see makes the state non-Markov: the same observation is worth
    more at step 10 than at step 990. The usual fix is to bootstrap at truncation, which keeps the
    learner blind to the limit; an agent that hovers until the limit is then valued as if it could
    still land later. With the time in the observation the limit is part of the state, so the
    episode's end there is a real termination the world model can predict (Pardo et al., 2018,
    "Time Limits in Reinforcement Learning"). The entry is logarithmic so that the last steps stand
    apart: a world model's continue head has to tell the final row from the one before it, which an
    elapsed fraction (0.999 against 1.0 at a limit of 1,000) does not let it do. The observation
    spec gains one entry (``[..., n] -> [..., n + 1]``).
    """

    def __init__(self, limit: int, key: NestedKey = "observation") -> None:
        if not 1 <= int(limit) <= 100_000:
            # the count is read back from the float32 entry: exact to the step up to 100,000
            raise ValueError(f"TimeFeature limit must be 1 to 100,000 steps, got {limit}")
        super().__init__(key)
        self.limit = int(limit)
        self.initial = math.log1p(self.limit)

    def _next_entry(self, raw, previous_raw, previous_entry, next_tensordict):
        left = torch.round(torch.expm1(previous_entry.double())) - 1
        at_limit = left <= 0
        for flag in ("terminated", "done"):
            value = next_tensordict.get(flag, None)
            if value is not None:
                next_tensordict.set(flag, value | at_limit.reshape(value.shape))
        return torch.log1p(left.clamp_min(0))
