"""Replay rows from collector transitions, slices that never mix episodes without is_first, and
checkpoints of the rows in use."""
import io

import pytest
import torch
from tensordict import TensorDict

from torchrl_dreamer.dreamer.replay import (SequenceWriter, load_replay_state_dict, make_replay_buffer,
                                           replay_state_dict)


def _transitions(E, T, done_at, start_obs=0.0, first_at=()):
    """A synthetic collector batch: obs counts up per env; ``done_at`` = [(env, t, terminated)]."""
    obs = start_obs + torch.arange(T).float().expand(E, T).clone() + 1000 * torch.arange(E)[:, None]
    next_obs = obs + 0.5
    done = torch.zeros(E, T, 1, dtype=torch.bool)
    term = torch.zeros(E, T, 1, dtype=torch.bool)
    first = torch.zeros(E, T, 1, dtype=torch.bool)
    for e, t in first_at:
        first[e, t] = True
    for e, t, terminated in done_at:
        done[e, t] = True
        term[e, t] = terminated
        if t + 1 < T:
            first[e, t + 1] = True
    action = torch.nn.functional.one_hot(torch.arange(E * T).reshape(E, T) % 2, 2)
    return TensorDict({
        "observation": obs.unsqueeze(-1), "action": action, "is_first": first,
        "next": {"observation": next_obs.unsqueeze(-1), "reward": (obs + 0.25).unsqueeze(-1), "done": done,
                 "terminated": term},
    }, [E, T])


def test_rows_add_the_final_state_and_shift_rewards():
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    batch = _transitions(2, 5, done_at=[(0, 2, True), (1, 4, False)], first_at=[(0, 0), (1, 0)])
    rows = w(batch)
    assert rows.shape == (12,)  # 10 transitions + 2 final states
    env0 = rows[rows["stream"] == 0]
    assert env0["observation"].squeeze(-1).tolist() == [0, 1, 2, 2.5, 3, 4]  # final obs of the episode kept
    assert env0["is_last"].tolist() == [False, False, False, True, False, False]
    assert env0["is_terminal"].tolist() == [False, False, False, True, False, False]
    assert env0["is_first"].tolist() == [True, False, False, False, True, False]
    # r_t is the reward received on arriving at x_t: 0 at an episode start, then the previous transition's
    assert env0["reward"].tolist() == [0, 0.25, 1.25, 2.25, 0, 3.25]
    assert (env0["action"][3] == 0).all()  # no action at the final state
    env1 = rows[rows["stream"] == 1]
    assert env1["is_last"][-1] and not env1["is_terminal"][-1]  # truncation: last, not terminal
    assert env1["step"].tolist() == list(range(6))
    # the next batch continues the streams: step counters and the carried reward
    rows2 = w(_transitions(2, 3, done_at=[], start_obs=5))
    env0b = rows2[rows2["stream"] == 0]
    assert env0b["step"].tolist() == [6, 7, 8]
    assert env0b["reward"][0].item() == 4.25  # last transition of the previous batch (not done)
    env1b = rows2[rows2["stream"] == 1]
    assert env1b["reward"][0].item() == 0.0  # previous batch ended with done


def test_slices_never_mix_episodes_without_is_first_marker():
    torch.manual_seed(0)
    E, T = 3, 40
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=E)
    rb = make_replay_buffer(500, batch_size=8, seq_len=10)
    g = torch.Generator().manual_seed(0)
    episode_id = torch.arange(E)
    next_id = E
    pending_first = [True] * E  # episodes start at t=0 of the first batch and after a done at t=T-1
    for batch_idx in range(6):
        done_at = [(e, t, bool(torch.rand(1, generator=g) < 0.5)) for e in range(E) for t in range(T)
                   if torch.rand(1, generator=g) < 0.08]
        first_at = [(e, 0) for e in range(E) if pending_first[e]]
        pending_first = [any(d[0] == e and d[1] == T - 1 for d in done_at) for e in range(E)]
        batch = _transitions(E, T, done_at, start_obs=batch_idx * T, first_at=first_at)
        # encode the episode id in the observation so a window's content reveals mixing
        ep = torch.zeros(E, T)
        for e in range(E):
            for t in range(T):
                ep[e, t] = episode_id[e]
                if batch["next", "done"][e, t]:
                    episode_id[e] = next_id
                    next_id += 1
        batch["observation"] = ep.unsqueeze(-1)
        batch["next", "observation"] = ep.unsqueeze(-1)
        rb.extend(w(batch))  # the ring buffer wraps after ~500 rows: gaps must split windows too
    for _ in range(50):
        s = rb.sample().reshape(8, 10)
        assert (s["stream"] == s["stream"][:, :1]).all()  # one env stream per window
        assert (s["step"][:, 1:] - s["step"][:, :-1] == 1).all()  # consecutive rows, no gap
        ep, first = s["observation"].squeeze(-1), s["is_first"]
        changed = ep[:, 1:] != ep[:, :-1]
        assert (first[:, 1:] | ~changed).all()  # the episode only changes at an is_first row
        assert (~first[:, 1:] | changed).all()  # and every is_first inside a window starts a new one


def test_replay_state_dict_round_trip():
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    rb = make_replay_buffer(100, batch_size=2, seq_len=4)
    rb.extend(w(_transitions(2, 20, done_at=[(0, 5, True)], first_at=[(0, 0), (1, 0)])))
    state = rb.state_dict()
    rb2 = make_replay_buffer(100, batch_size=2, seq_len=4)
    rb2.load_state_dict(state)
    assert len(rb2) == len(rb)
    assert torch.equal(rb2.storage[:]["observation"], rb.storage[:]["observation"])
    w2 = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    w2.load_state_dict(w.state_dict())
    assert torch.equal(w2.next_step, w.next_step)


def _filled(capacity, batches, T=20):
    """A buffer of ``capacity`` rows after ``batches`` collector batches of 2 envs x ``T`` steps."""
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    rb = make_replay_buffer(capacity, batch_size=2, seq_len=4)
    for i in range(batches):
        rb.extend(w(_transitions(2, T, done_at=[(0, 5, True), (1, 12, False)], start_obs=100.0 * i,
                                 first_at=[(0, 0), (1, 0)] if i == 0 else ())))
    return rb, w


def _saved_and_loaded(rb, capacity):
    """``rb`` through replay_state_dict -> torch.save -> torch.load -> a fresh buffer."""
    buf = io.BytesIO()
    torch.save(replay_state_dict(rb), buf)
    buf.seek(0)
    rb2 = make_replay_buffer(capacity, batch_size=2, seq_len=4)
    load_replay_state_dict(rb2, torch.load(buf, weights_only=False))
    return rb2


def _same_rows(a, b):
    return len(a) == len(b) and (a.storage[:] == b.storage[:]).all()


def _same_samples(a, b, seed=0):
    torch.manual_seed(seed)
    x = a.sample()
    torch.manual_seed(seed)
    y = b.sample()
    return bool((x == y).all())


def _extend_both(a, b, w):
    more = w(_transitions(2, 15, done_at=[(1, 3, True)], start_obs=5000.0))
    a.extend(more.clone())
    b.extend(more.clone())


@pytest.mark.parametrize("capacity,batches", [(1000, 2), (100, 4)], ids=["partly_filled", "wrapped"])
def test_replay_rows_in_use_round_trip(capacity, batches):
    rb, w = _filled(capacity, batches)
    state = replay_state_dict(rb)
    assert state["_storage"]["_storage"]["observation"].shape[0] == len(rb)
    wrapped = batches == 4
    assert (len(rb) == capacity and state["_writer"]["_cursor"] != 0) if wrapped else len(rb) < capacity
    rb2 = _saved_and_loaded(rb, capacity)
    assert _same_rows(rb, rb2)
    assert _same_samples(rb, rb2, seed=0) and _same_samples(rb, rb2, seed=1)
    # the next rows go to the same storage positions (ring order, write cursor) in both
    _extend_both(rb, rb2, w)
    assert _same_rows(rb, rb2)
    assert _same_samples(rb, rb2, seed=2)


def test_replay_state_loads_older_full_capacity_checkpoints():
    rb, w = _filled(1000, 2)
    rb2 = make_replay_buffer(1000, batch_size=2, seq_len=4)
    load_replay_state_dict(rb2, rb.state_dict())  # what checkpoints held before replay_state_dict
    assert _same_rows(rb, rb2) and _same_samples(rb, rb2)
    _extend_both(rb, rb2, w)
    assert _same_rows(rb, rb2)


def test_replay_state_size_scales_with_rows_in_use_not_capacity():
    rb, _ = _filled(100_000, 7)  # 2 envs x 20 steps x 7 batches + final rows ~ 300 rows
    assert 280 <= len(rb) <= 320

    def nbytes(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.tell()

    small, full = nbytes(replay_state_dict(rb)), nbytes(rb.state_dict())
    assert small < 0.01 * full, (small, full)


def test_replay_state_into_a_smaller_capacity_raises():
    rb, _ = _filled(1000, 8)
    n = len(rb)
    with pytest.raises(ValueError, match=rf"replay.capacity=100 is smaller than the {n} rows in the checkpoint; "
                                         rf"resume with replay.capacity >= {n}"):
        _saved_and_loaded(rb, 100)


def test_wrapped_replay_into_a_larger_capacity_keeps_ring_order():
    rb, w = _filled(100, 4)
    cursor = rb.state_dict()["_writer"]["_cursor"]
    oldest_first = torch.cat([rb.storage[:][cursor:], rb.storage[:][:cursor]])
    rb2 = _saved_and_loaded(rb, 150)
    assert len(rb2) == 100 and (rb2.storage[:] == oldest_first).all()
    more = w(_transitions(2, 10, done_at=[], start_obs=9000.0))
    rb2.extend(more)
    assert len(rb2) == 100 + len(more) and (rb2.storage[:][100:] == more).all()


def _windows(rb, n=64, seed=0):
    torch.manual_seed(seed)
    return torch.stack([rb.sample()["observation"] for _ in range(n)])


def _rebuilt_runs(rb):
    """The sampler's runs (stream, first step, slots) as kept incrementally, and as a rebuild from storage finds them."""
    sampler = rb._sampler

    def runs():
        return [(r.stream, r.first_step, r.buf[r.lo:r.hi].tolist()) for s in sorted(sampler._runs) for r in sampler._runs[s]]

    sampler._refresh(rb.storage)
    kept = runs()
    sampler._full_rebuild(rb.storage)
    return kept, runs()


@pytest.mark.parametrize("capacity", [10_000, 157], ids=["growing", "wrapping"])
def test_stream_sampler_keeps_the_runs_a_rebuild_finds(capacity):
    """Extend by extend (episode ends, the ring buffer overwriting the oldest rows, a resumed run's new
    stream ids), the runs kept incrementally equal those a sort of the whole storage finds, and the
    windows drawn under a seed equal a freshly loaded buffer's."""
    g = torch.Generator().manual_seed(1)
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=3)
    rb = make_replay_buffer(capacity, batch_size=4, seq_len=6)
    for i in range(12):
        if i == 7:  # as after --resume: the writer continues under new stream ids
            w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=3, stream_offset=3)
        done_at = [(e, int(t), bool(t % 2)) for e in range(3) for t in torch.randint(0, 17, (2,), generator=g)]
        rb.extend(w(_transitions(3, 17, done_at, start_obs=100.0 * i, first_at=[(0, 0), (1, 0), (2, 0)] if i in (0, 7) else ())))
        rb.sample()  # the sampler indexes what was written
        kept, rebuilt = _rebuilt_runs(rb)
        assert kept == rebuilt
    streams = {s for s, _, _ in kept}
    assert streams == ({0, 1, 2, 3, 4, 5} if capacity > 1000 else {3, 4, 5})
    assert torch.equal(_windows(rb), _windows(_saved_and_loaded_at(rb, capacity, seq_len=6)))


def _saved_and_loaded_at(rb, capacity, seq_len):
    buf = io.BytesIO()
    torch.save(replay_state_dict(rb), buf)
    buf.seek(0)
    rb2 = make_replay_buffer(capacity, batch_size=4, seq_len=seq_len)
    load_replay_state_dict(rb2, torch.load(buf, weights_only=False))
    return rb2


def test_stream_sampler_draws_every_window_uniformly():
    """Two streams of 30 and 10 rows, windows of 5: 26 + 6 windows fit, each drawn about equally often
    (uniform over windows, not over streams), and none starts where fewer than 5 rows follow."""
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=1)
    w2 = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=1, stream_offset=1)
    rb = make_replay_buffer(1000, batch_size=400, seq_len=5)
    rb.extend(w(_transitions(1, 29, [], first_at=[(0, 0)])[0]))  # 29 transitions + nothing: 29 rows
    rb.extend(w(_transitions(1, 1, [(0, 0, True)], start_obs=29.0)[0]))  # + 1 and the final row: 31 rows
    rb.extend(w2(_transitions(1, 10, [], start_obs=5000.0, first_at=[(0, 0)])[0]))
    n31, n10 = 31, 10
    torch.manual_seed(0)
    starts = torch.cat([rb.sample().reshape(400, 5)["observation"][:, 0, 0] for _ in range(40)])
    first_obs = starts.unique()
    assert len(first_obs) == (n31 - 4) + (n10 - 4)
    counts = torch.stack([(starts == v).sum() for v in first_obs]).float()
    expected = len(starts) / len(first_obs)
    assert counts.min() > 0.75 * expected and counts.max() < 1.25 * expected


def test_stream_sampler_says_when_no_stream_holds_a_window():
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    rb = make_replay_buffer(100, batch_size=2, seq_len=8)
    rb.extend(w(_transitions(2, 5, [], first_at=[(0, 0), (1, 0)])))
    with pytest.raises(RuntimeError, match="no stream holds 8 consecutive rows yet"):
        rb.sample()


@pytest.mark.parametrize("capacity", [10_000, 157], ids=["growing", "wrapping"])
def test_terminal_fraction_draws_that_share_of_windows_around_terminal_rows(capacity):
    """``terminal_fraction=0.5``: the first half of each batch's windows hold a terminal row, at every
    position of the window, every stored terminal drawn; a ring buffer that overwrote terminal rows never
    yields them; each window is consecutive steps of one stream; a reloaded buffer draws the same windows."""
    g = torch.Generator().manual_seed(3)
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=2)
    rb = make_replay_buffer(capacity, batch_size=8, seq_len=6, terminal_fraction=0.5)
    written = 0
    for i in range(10):
        done_at = [(e, int(t), bool((t + e + i) % 2)) for e in range(2) for t in torch.randint(0, 23, (1,), generator=g)]
        rows = w(_transitions(2, 23, done_at, start_obs=100.0 * i, first_at=[(0, 0), (1, 0)] if i == 0 else ()))
        written += int(rows["is_terminal"].sum())
        rb.extend(rows)
        if i >= 2:  # the sampler indexes each write as it comes (a first sample rebuilds from storage)
            batch = rb.sample().reshape(8, 6)
            assert batch["is_terminal"].reshape(8, 6)[:4].any(1).all()
    rows = rb.storage[:len(rb)]
    stored = {(int(s), int(t)) for s, t, x in zip(rows["stream"], rows["step"], rows["is_terminal"]) if x}
    assert len(stored) >= 3 and (written > len(stored)) == (capacity < 1000)  # wrapping: some were overwritten
    seen, positions = set(), set()
    torch.manual_seed(0)
    for _ in range(200):
        batch = rb.sample().reshape(8, 6)
        steps, streams, term = batch["step"], batch["stream"], batch["is_terminal"].reshape(8, 6)
        assert (streams == streams[:, :1]).all() and (steps[:, 1:] == steps[:, :-1] + 1).all()
        assert term[:4].any(1).all()
        for win in range(4):
            for pos in term[win].nonzero().squeeze(-1).tolist():
                seen.add((int(streams[win, pos]), int(steps[win, pos])))
                positions.add(pos)
    assert seen == stored and positions == set(range(6))
    assert torch.equal(_windows(rb), _windows(_reloaded_with_terminals(rb, capacity)))


def _reloaded_with_terminals(rb, capacity):
    buf = io.BytesIO()
    torch.save(replay_state_dict(rb), buf)
    buf.seek(0)
    rb2 = make_replay_buffer(capacity, batch_size=8, seq_len=6, terminal_fraction=0.5)
    load_replay_state_dict(rb2, torch.load(buf, weights_only=False))
    return rb2


def test_terminal_fraction_falls_back_to_uniform_windows_and_checks_its_range():
    w = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=1)
    rb = make_replay_buffer(1000, batch_size=4, seq_len=5, terminal_fraction=1.0)
    rb.extend(w(_transitions(1, 30, [(0, 12, False)], first_at=[(0, 0)])))  # a truncation only: no terminal row
    batch = rb.sample().reshape(4, 5)
    assert not batch["is_terminal"].any() and (batch["step"][:, 1:] == batch["step"][:, :-1] + 1).all()
    with pytest.raises(ValueError, match="terminal_fraction must be in"):
        make_replay_buffer(1000, batch_size=4, seq_len=5, terminal_fraction=1.5)
