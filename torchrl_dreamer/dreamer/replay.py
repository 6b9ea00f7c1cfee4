"""Replay for DreamerV3: collected transitions -> one row per env state -> fixed-length slices.

TorchRL collectors return *transitions* (x_t, a_t, next: r_{t+1}, x_{t+1}, done). Dreamer trains on
*states* (x_t, a_t, r_t, is_first, is_terminal; layout in :mod:`.world_model`), which differ in
one place that matters: the last observation of an episode (terminal or truncated) exists only
under ``("next", ...)`` and would otherwise never be seen by the world model, so the continue
head could not learn termination. :class:`SequenceWriter` converts a ``[E, T]`` batch into rows,
adding that final row after every ``done`` (vectorised, no Python loop over steps).

Each env is one *stream* of rows (episodes one after another, ``is_first`` at each start).
Rows carry ``stream`` (env id) and ``step`` (position in the stream), and
:func:`make_replay_buffer` samples fixed-length windows with TorchRL's ``SliceSampler`` in
``fragmented`` mode, which rebuilds each stream from ``(stream, step)`` however the rows of several
envs interleave in storage. A window may cross an episode boundary; the ``is_first`` marker on
the new episode's first row makes the world model reset there (DreamerV3 samples its replay the
same way), so no padding is needed and no step is wasted. A window never spans a gap in a
stream (e.g. rows overwritten by the ring buffer).

:func:`replay_state_dict` / :func:`load_replay_state_dict` checkpoint the buffer with the rows in
use only: ``ReplayBuffer.state_dict`` holds the whole pre-allocated ``LazyTensorStorage``
(capacity rows, most of them empty early in a run).
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase, is_tensor_collection
from torchrl.data import LazyTensorStorage, ReplayBuffer, SliceSampler

__all__ = ["SequenceWriter", "make_replay_buffer", "replay_state_dict", "load_replay_state_dict", "ROW_KEYS"]

ROW_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal", "stream", "step")


class SequenceWriter:
    """Turns collector batches into Dreamer rows, carrying per-env state across batches.

    Args:
        obs_keys: ``{row name: env key}`` of the observations to store.
        action_transform: env action -> actor units (one-hot float, or ``[-1, 1]``).
        num_envs: envs in the collector batch (the batch is ``[num_envs, T]`` or ``[T]`` for one).
        stream_offset: added to the env index to form the ``stream`` id.
        reward_scale: rewards are multiplied by this before they reach the rows (the world model,
            critic and actor learn scaled returns; logged episode sums stay in env units).
    """

    def __init__(self, obs_keys: dict[str, object], action_transform, num_envs: int, stream_offset: int = 0,
                 reward_scale: float = 1.0) -> None:
        self.obs_keys = dict(obs_keys)
        self.reward_scale = float(reward_scale)
        self.action_transform = action_transform
        self.num_envs = num_envs
        self.stream_offset = stream_offset
        self.carry_reward = torch.zeros(num_envs)
        self.next_step = torch.zeros(num_envs, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"carry_reward": self.carry_reward.clone(), "next_step": self.next_step.clone(),
                "stream_offset": self.stream_offset}

    def load_state_dict(self, state: dict) -> None:
        self.carry_reward = state["carry_reward"].clone()
        self.next_step = state["next_step"].clone()
        self.stream_offset = state["stream_offset"]

    def __call__(self, batch: TensorDictBase, first_env: int | None = None) -> TensorDictBase:
        """``batch [E, T]`` (or ``[T]``) of transitions -> rows ``[N]`` (env-major, in time order).

        ``first_env``: the batch holds envs ``first_env .. first_env + E - 1`` of the writer's
        ``num_envs`` (one collector worker's share); by default all of them."""
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(0)
        E, T = batch.batch_size
        if first_env is None:
            if E != self.num_envs:
                raise ValueError(f"SequenceWriter was built for {self.num_envs} envs, got a batch of {E}")
            first_env = 0
        if not 0 <= first_env <= self.num_envs - E:
            raise ValueError(f"envs {first_env}..{first_env + E - 1} are outside the writer's {self.num_envs} envs")
        envs = slice(first_env, first_env + E)
        flag = lambda key: batch.get(key).reshape(E, T).bool()  # noqa: E731
        done, terminated, is_first = flag(("next", "done")), flag(("next", "terminated")), flag("is_first")
        reward = batch.get(("next", "reward")).reshape(E, T).float()
        if self.reward_scale != 1.0:
            reward = reward * self.reward_scale
        prev_reward = torch.cat([self.carry_reward[envs].to(reward.device).unsqueeze(1), reward[:, :-1]], 1)
        prev_reward = torch.where(is_first, torch.zeros_like(prev_reward), prev_reward)

        counts = 1 + done.long().reshape(-1)  # one row per transition, two after a done
        pos = torch.cumsum(counts, 0) - counts  # row of each transition's state
        n_rows = int(counts.sum())
        extra = pos[done.reshape(-1)] + 1  # rows of the final states
        base = pos

        def scatter(base_values: torch.Tensor, extra_values: torch.Tensor | None, fill=0) -> torch.Tensor:
            out = torch.full((n_rows, *base_values.shape[2:]), fill, dtype=base_values.dtype, device=base_values.device)
            out[base] = base_values.reshape(E * T, *base_values.shape[2:])
            if extra_values is not None and extra.numel():
                out[extra] = extra_values.to(out.dtype)
            return out

        rows = {}
        for name, key in self.obs_keys.items():
            rows[name] = scatter(batch.get(key), batch.get(("next", key))[done])
        action = self.action_transform(batch.get("action"))
        action = action.reshape(E, T, -1).float()
        rows["action"] = scatter(action, torch.zeros(int(extra.numel()), action.shape[-1]))
        rows["reward"] = scatter(prev_reward, reward[done])
        rows["is_first"] = scatter(is_first, None, False)
        is_last = torch.zeros(n_rows, dtype=torch.bool)
        is_last[extra] = True
        rows["is_last"] = is_last
        is_terminal = torch.zeros(n_rows, dtype=torch.bool)
        is_terminal[extra] = terminated[done]
        rows["is_terminal"] = is_terminal
        env_of_row = torch.repeat_interleave(torch.arange(E).repeat_interleave(T), counts)
        rows_per_env = counts.reshape(E, T).sum(1)
        env_start = torch.cumsum(rows_per_env, 0) - rows_per_env
        rows["stream"] = env_of_row + first_env + self.stream_offset
        rows["step"] = self.next_step[envs][env_of_row] + torch.arange(n_rows) - env_start[env_of_row]
        self.next_step[envs] += rows_per_env
        self.carry_reward[envs] = torch.where(done[:, -1], torch.zeros(E), reward[:, -1].cpu())
        return TensorDict(rows, batch_size=[n_rows])


def make_replay_buffer(capacity: int, batch_size: int, seq_len: int, *, device: str | torch.device = "cpu") -> ReplayBuffer:
    """Ring buffer of rows; :meth:`sample` returns ``batch_size * seq_len`` rows, ``seq_len``
    consecutive rows of one stream after another (reshape to ``[batch_size, seq_len]``)."""
    sampler = SliceSampler(
        slice_len=seq_len, traj_key="stream", step_key="step", fragmented=True, strict_length=True,
        init_key=None,  # is_first is data here: a window starting mid-episode is not an episode start
        truncated_key=None,
    )
    return ReplayBuffer(storage=LazyTensorStorage(capacity, device=device), sampler=sampler,
                        batch_size=batch_size * seq_len)


# marks a replay_state_dict (an older checkpoint holds the plain ReplayBuffer.state_dict instead)
REPLAY_STATE_FORMAT = "rows_in_use/1"


def replay_state_dict(rb: ReplayBuffer) -> dict:
    """A checkpoint of ``rb`` that holds the ``len(rb)`` rows in use, not the storage's capacity.

    The result is ``rb.state_dict()`` (same keys and layout, so the writer's ``_cursor`` and
    ``_write_count``, the sampler's state, transforms, batch size and RNG are TorchRL's own) with
    ``["_storage"]["_storage"]`` cut to the rows in use: the flat ``TensorDict.state_dict`` of
    ``rb.storage[:]`` (storage rows ``0 .. len(rb) - 1``; once the ring buffer has wrapped, all
    ``capacity`` rows in storage order, the writer's cursor saying which is oldest). Two more keys:
    ``"_format"`` (:data:`REPLAY_STATE_FORMAT`) and ``"capacity"`` (the storage's ``max_size``).
    Partly filled buffers get a copy of their rows (``torch.save`` of a view would write the whole
    underlying storage); a full one is stored by reference, without a copy.
    """
    state = dict(rb.state_dict())
    storage = dict(state["_storage"])
    if storage.get("initialized") and len(rb.storage):
        rows = rb.storage[:]  # a view of rows 0 .. len - 1, the whole storage once it is full
        if len(rb.storage) < rb.storage.max_size:
            rows = rows.clone()
        storage["_storage"] = rows.state_dict() if is_tensor_collection(rows) else rows
    else:
        storage["_storage"] = {}
    state["_storage"] = storage
    state["_format"] = REPLAY_STATE_FORMAT
    state["capacity"] = int(rb.storage.max_size)
    return state


def load_replay_state_dict(rb: ReplayBuffer, state: dict) -> None:
    """Loads :func:`replay_state_dict`'s ``state`` into ``rb`` (a fresh buffer from
    :func:`make_replay_buffer`); a plain ``ReplayBuffer.state_dict`` (checkpoints written before
    :func:`replay_state_dict`) goes to ``rb.load_state_dict``.

    With the capacity the state was saved at, the rows land at the same storage positions and
    the writer's cursor is restored, so ``len(rb)``, the rows, the next write positions and the
    samples drawn under a given seed match the saved buffer. With a larger capacity, a wrapped
    buffer's rows are stored oldest first and the cursor goes after the newest.

    Raises:
        ValueError: ``rb``'s capacity is smaller than the rows in ``state``.
    """
    if state.get("_format") is None:  # full-capacity rb.state_dict() of an older checkpoint
        rb.load_state_dict(state)
        return
    if state["_format"] != REPLAY_STATE_FORMAT:
        raise ValueError(f"unknown replay checkpoint format {state['_format']!r} (expected {REPLAY_STATE_FORMAT!r})")
    saved = state["_storage"]
    n, capacity, saved_capacity = int(saved["_len"]), int(rb.storage.max_size), int(state["capacity"])
    if n > capacity:
        raise ValueError(f"replay.capacity={capacity} is smaller than the {n} rows in the checkpoint; "
                         f"resume with replay.capacity >= {n}")
    state = {k: v for k, v in state.items() if k not in ("_format", "capacity")}
    if saved.get("initialized") and n:
        rows = saved["_storage"]
        if isinstance(rows, dict):  # as LazyTensorStorage.load_state_dict rebuilds a flat state_dict
            rows = TensorDict().load_state_dict(rows, strict=False)
        writer = dict(state["_writer"])
        if capacity != saved_capacity:
            cursor = int(writer["_cursor"])
            if n == saved_capacity and cursor:  # wrapped: storage order -> oldest row first
                rows = torch.cat([rows[cursor:], rows[:cursor]])
            writer["_cursor"] = n % capacity
        state["_writer"] = writer
        # allocates the storage at rb's capacity (lazily, as a first extend would) and writes the rows
        rb.storage.set(slice(0, n), rows, set_cursor=False)
    # the storage now holds the rows: its own state (the same tensors, not copied) with the saved length
    state["_storage"] = {**rb.storage.state_dict(), "_len": n}
    rb.load_state_dict(state)
