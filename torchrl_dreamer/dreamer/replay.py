"""Replay for DreamerV3: collected transitions -> one row per env state -> fixed-length slices.

TorchRL collectors return *transitions* (x_t, a_t, next: r_{t+1}, x_{t+1}, done). Dreamer trains on
*states* (x_t, a_t, r_t, is_first, is_terminal; layout in :mod:`.world_model`), which differ in
one place that matters: the last observation of an episode (terminal or truncated) exists only
under ``("next", ...)`` and would otherwise never be seen by the world model, so the continue
head could not learn termination. :class:`SequenceWriter` converts a ``[E, T]`` batch into rows,
adding that final row after every ``done`` (vectorised, no Python loop over steps).

Each env is one *stream* of rows (episodes one after another, ``is_first`` at each start).
Rows carry ``stream`` (env id) and ``step`` (position in the stream), and
:func:`make_replay_buffer` samples fixed-length windows of one stream with :class:`StreamSliceSampler`,
however the rows of several envs interleave in storage. A window may cross an episode boundary; the
``is_first`` marker on the new episode's first row makes the world model reset there (DreamerV3
samples its replay the same way), so no padding is needed and no step is wasted. A window never
spans a gap in a stream (e.g. rows overwritten by the ring buffer).

TorchRL's ``SliceSampler(fragmented=True, traj_key="stream", step_key="step")`` samples the same
windows (it was this module's sampler until it was measured): it re-sorts every row in storage after
each ``extend``, two stable argsorts, so its cost per collector batch grows with the buffer. In a
LunarLander run (four streams, one thread, 16 x 32 windows, four updates per collector batch) the time
per update outside the networks grew from ~4 ms at 80k rows to ~19 ms at 520k rows, a third of the
update. :class:`StreamSliceSampler` keeps each stream's slots in step order as they arrive, so an
``extend`` costs what it writes and a sample what it draws.

:func:`replay_state_dict` / :func:`load_replay_state_dict` checkpoint the buffer with the rows in
use only: ``ReplayBuffer.state_dict`` holds the whole pre-allocated ``LazyTensorStorage``
(capacity rows, most of them empty early in a run).
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase, is_tensor_collection
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.data.replay_buffers.samplers import Sampler

__all__ = ["SequenceWriter", "StreamSliceSampler", "make_replay_buffer", "replay_state_dict", "load_replay_state_dict",
           "ROW_KEYS"]

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


class _Run:
    """Storage slots of consecutive steps of one stream, oldest first (a growable buffer)."""

    __slots__ = ("stream", "first_step", "buf", "lo", "hi")

    def __init__(self, stream: int, first_step: int, slots: torch.Tensor) -> None:
        self.stream, self.first_step = stream, first_step
        self.buf = slots.clone()
        self.lo, self.hi = 0, slots.numel()

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def next_step(self) -> int:
        return self.first_step + len(self)

    def append(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if self.hi + n > self.buf.numel():  # compact and grow (amortised O(1) per row)
            live = self.buf[self.lo:self.hi]
            self.buf = torch.empty(max(2 * (len(live) + n), 64), dtype=torch.long)
            self.buf[:len(live)] = live
            self.lo, self.hi = 0, len(live)
        self.buf[self.hi:self.hi + n] = slots
        self.hi += n

    def drop_front(self, n: int) -> None:
        self.lo += n
        self.first_step += n


class StreamSliceSampler(Sampler):
    """Uniform fixed-length windows of consecutive rows of one stream (rows keyed by ``stream`` and
    ``step``, as :class:`SequenceWriter` writes them), drawn uniformly over every window that fits.

    It keeps, per stream, the storage slots in step order: :meth:`extend` (called by the
    ``ReplayBuffer`` with the slots just written) queues them, and the next :meth:`sample` reads their
    ``stream`` and ``step`` and appends them to their stream's run, after dropping the rows the ring
    buffer overwrote (the oldest of their stream). A row whose step does not follow its stream's last
    one starts a new run: windows never span a gap. Anything else (rows written without
    :meth:`extend`, a checkpoint loaded, rows overwritten out of order) rebuilds the runs from the
    storage in one sort. Runs are kept in (stream, step) order, so the windows drawn under a seed
    depend on the rows stored, not on the storage layout or the write history.

    With ``terminal_fraction > 0`` that fraction of each batch's windows (rounded) is drawn around a
    stored terminal row instead: a terminal row uniformly among those stored, at a uniform position in
    its window (moved in where its run is too short on one side). Rare episode ends (a crash or a
    landing among hundreds of steps) then reach the world model's reward and continue heads several
    times per batch instead of about once; the heads see terminals more often than the env produces
    them, so their probabilities lean towards ending (off by default). The rest of the batch stays
    uniform; with no terminal row stored, the whole batch is.

    Args:
        seq_len: rows per window; ``sample(storage, batch_size)`` returns ``batch_size // seq_len``
            windows, one after another (reshape the rows to ``[batch_size // seq_len, seq_len]``).
        traj_key, step_key: the row keys of the stream id and the position in the stream.
        terminal_fraction: share of the windows drawn around a terminal row (``[0, 1]``).
        terminal_key: the row key marking terminal rows.
    """

    def __init__(self, seq_len: int, traj_key: str = "stream", step_key: str = "step", *,
                 terminal_fraction: float = 0.0, terminal_key: str = "is_terminal") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0.0 <= terminal_fraction <= 1.0:
            raise ValueError(f"terminal_fraction must be in [0, 1], got {terminal_fraction}")
        self.seq_len, self.traj_key, self.step_key = int(seq_len), traj_key, step_key
        self.terminal_fraction, self.terminal_key = float(terminal_fraction), terminal_key
        self._empty()

    def _empty(self) -> None:
        self._runs: dict[int, list[_Run]] = {}
        self._slot_stream = torch.empty(0, dtype=torch.long)  # per storage slot; -1 = no row indexed
        self._slot_step = torch.empty(0, dtype=torch.long)
        self._slot_terminal = torch.empty(0, dtype=torch.bool)  # kept only with terminal_fraction > 0
        self._terminals: torch.Tensor | None = None  # slots of the terminal rows, (stream, step) order; None = stale
        self._pending: list[torch.Tensor] = []
        self._revision: int | None = None  # the storage's mutation counter when the runs were last right
        self._rebuild = True

    def extend(self, index: torch.Tensor) -> None:
        self._pending.append(torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu())

    def add(self, index: int) -> None:
        self.extend(torch.as_tensor([index]))

    def state_dict(self) -> dict:
        return {}  # rebuilt from the rows on load

    def load_state_dict(self, state_dict: dict) -> None:
        self._empty()

    def dumps(self, path) -> None:
        return None

    def loads(self, path) -> None:
        self._empty()

    def __repr__(self) -> str:
        extra = f", terminal_fraction={self.terminal_fraction:g}" if self.terminal_fraction else ""
        return f"{type(self).__name__}(seq_len={self.seq_len}{extra}, streams={len(self._runs)})"

    # ------------------------------------------------------------------ keeping the runs
    def _columns(self, storage, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = storage[:]
        stream, step = rows.get(self.traj_key), rows.get(self.step_key)
        if index is not None:
            stream, step = stream[index], step[index]
        return stream.reshape(-1).long().cpu(), step.reshape(-1).long().cpu()

    def _terminal_column(self, storage, index: torch.Tensor | None = None) -> torch.Tensor:
        flag = storage[:].get(self.terminal_key)
        if index is not None:
            flag = flag[index]
        return flag.reshape(-1).bool().cpu()

    def _grow_slots(self, size: int) -> None:
        if size > self._slot_stream.numel():
            grow = max(size, 2 * self._slot_stream.numel()) - self._slot_stream.numel()
            self._slot_stream = torch.cat([self._slot_stream, self._slot_stream.new_full((grow,), -1)])
            self._slot_step = torch.cat([self._slot_step, self._slot_step.new_full((grow,), -1)])
            self._slot_terminal = torch.cat([self._slot_terminal, self._slot_terminal.new_zeros((grow,))])

    def _full_rebuild(self, storage) -> None:
        self._runs, self._pending = {}, []
        n = len(storage)
        self._slot_stream = torch.full((n,), -1, dtype=torch.long)
        self._slot_step = torch.full((n,), -1, dtype=torch.long)
        self._slot_terminal = torch.zeros(n, dtype=torch.bool)
        self._terminals = None
        if n:
            stream, step = self._columns(storage)
            stream, step = stream[:n], step[:n]
            self._slot_stream[:], self._slot_step[:] = stream, step
            if self.terminal_fraction:
                self._slot_terminal[:] = self._terminal_column(storage)[:n]
            order = torch.argsort(step, stable=True)
            order = order[torch.argsort(stream[order], stable=True)]
            s, t = stream[order], step[order]
            new = torch.ones(n, dtype=torch.bool)
            new[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1] + 1)
            if bool(((s[1:] == s[:-1]) & (t[1:] == t[:-1])).any()):
                raise RuntimeError(f"replay rows repeat a ({self.traj_key}, {self.step_key}) pair: stream ids "
                                   "must stay unique over the buffer's life")
            starts = new.nonzero().squeeze(-1).tolist() + [n]
            for a, b in zip(starts[:-1], starts[1:]):
                self._runs.setdefault(int(s[a]), []).append(_Run(int(s[a]), int(t[a]), order[a:b]))
        self._rebuild = False

    def _apply(self, storage, index: torch.Tensor) -> bool:
        """Indexes the rows just written at ``index``; False where only a rebuild is right."""
        self._grow_slots(int(index.max()) + 1)
        old_stream, old_step = self._slot_stream[index], self._slot_step[index]
        overwritten = old_step >= 0
        if bool(overwritten.any()):  # the ring buffer's oldest rows: each the front of its stream's first run
            for stream in old_stream[overwritten].unique().tolist():
                steps = old_step[overwritten & (old_stream == stream)].sort().values
                k, runs = steps.numel(), self._runs.get(stream, [])
                while k:
                    if not runs or int(steps[steps.numel() - k]) != runs[0].first_step:
                        return False
                    take = min(k, len(runs[0]))
                    if int(steps[steps.numel() - k + take - 1]) != runs[0].first_step + take - 1:
                        return False
                    runs[0].drop_front(take)
                    if not len(runs[0]):
                        runs.pop(0)
                    k -= take
                if not runs:
                    self._runs.pop(stream, None)
        stream, step = self._columns(storage, index)
        self._slot_stream[index], self._slot_step[index] = stream, step
        if self.terminal_fraction:
            self._slot_terminal[index] = self._terminal_column(storage, index)
            self._terminals = None
        # rows of one stream arrive in step order: split the write into (stream, consecutive steps) pieces
        cut = torch.ones(index.numel(), dtype=torch.bool)
        cut[1:] = (stream[1:] != stream[:-1]) | (step[1:] != step[:-1] + 1)
        starts = cut.nonzero().squeeze(-1).tolist() + [index.numel()]
        for a, b in zip(starts[:-1], starts[1:]):
            s, t = int(stream[a]), int(step[a])
            runs = self._runs.setdefault(s, [])
            if runs and t < runs[-1].next_step:  # a step seen before, or rows out of order
                return False
            if runs and t == runs[-1].next_step:
                runs[-1].append(index[a:b])
            else:
                runs.append(_Run(s, t, index[a:b]))
        return True

    def _refresh(self, storage) -> None:
        revision = getattr(storage, "_mutation_revision", None)  # TorchRL's write counter (int or 0-d tensor)
        revision = None if revision is None else int(revision)
        pending, self._pending = self._pending, []
        if not self._rebuild and (pending or revision == self._revision):
            for index in pending:
                if not self._apply(storage, index):
                    self._rebuild = True
                    break
        else:
            self._rebuild = True
        if self._rebuild:
            self._full_rebuild(storage)
        self._revision = revision

    # ------------------------------------------------------------------ sampling
    def _sampleable_count(self, storage, batch_size: int) -> int:
        self._refresh(storage)
        return sum(max(len(r) - self.seq_len + 1, 0) for runs in self._runs.values() for r in runs)

    def sample(self, storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        if batch_size % self.seq_len:
            raise ValueError(f"batch_size {batch_size} is not a multiple of seq_len {self.seq_len}")
        if len(storage) == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        self._refresh(storage)
        runs = [r for s in sorted(self._runs) for r in self._runs[s]]
        fits = torch.tensor([max(len(r) - self.seq_len + 1, 0) for r in runs], dtype=torch.long)
        total = int(fits.sum())
        if total == 0:
            longest = max((len(r) for r in runs), default=0)
            raise RuntimeError(f"no stream holds {self.seq_len} consecutive rows yet (longest: {longest}); "
                               "collect more before sampling")
        L, windows = self.seq_len, batch_size // self.seq_len
        pieces = self._terminal_windows(round(self.terminal_fraction * windows)) if self.terminal_fraction else []
        draw = torch.randint(total, (windows - len(pieces),), generator=self._rng)
        ends = torch.cumsum(fits, 0)
        which = torch.searchsorted(ends, draw, right=True)
        offset = draw - (ends[which] - fits[which])
        pieces += [runs[w].buf[runs[w].lo + o:runs[w].lo + o + L] for w, o in zip(which.tolist(), offset.tolist())]
        return torch.cat(pieces), {}

    def _terminal_windows(self, count: int) -> list[torch.Tensor]:
        """``count`` windows, each around a terminal row drawn uniformly (fewer where no terminal row
        lies in a run of ``seq_len`` rows or more)."""
        if count <= 0:
            return []
        if self._terminals is None:
            slots = self._slot_terminal.nonzero().squeeze(-1)
            key = self._slot_stream[slots] * (int(self._slot_step.max()) + 1) + self._slot_step[slots]
            self._terminals = slots[torch.argsort(key)]  # (stream, step) order: independent of the layout
        if not self._terminals.numel():
            return []
        L, out = self.seq_len, []
        picks = torch.randint(self._terminals.numel(), (count,), generator=self._rng)
        where = torch.randint(L, (count,), generator=self._rng)
        for slot, u in zip(self._terminals[picks].tolist(), where.tolist()):
            stream, step = int(self._slot_stream[slot]), int(self._slot_step[slot])
            run = next((r for r in self._runs.get(stream, ()) if r.first_step <= step < r.next_step), None)
            if run is None or len(run) < L:
                continue
            start = min(max(step - u, run.first_step), run.next_step - L) - run.first_step
            out.append(run.buf[run.lo + start:run.lo + start + L])
        return out


def make_replay_buffer(capacity: int, batch_size: int, seq_len: int, *, device: str | torch.device = "cpu",
                       terminal_fraction: float = 0.0) -> ReplayBuffer:
    """Ring buffer of rows; :meth:`sample` returns ``batch_size * seq_len`` rows, ``seq_len``
    consecutive rows of one stream after another (reshape to ``[batch_size, seq_len]``), drawn by
    :class:`StreamSliceSampler` (``terminal_fraction``: its share of windows around terminal rows)."""
    sampler = StreamSliceSampler(seq_len, terminal_fraction=terminal_fraction)
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
