"""Replay rows from collector transitions, and slices that never mix episodes without is_first."""
import torch
from tensordict import TensorDict

from torchrl_dreamer.dreamer.replay import SequenceWriter, make_replay_buffer


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
