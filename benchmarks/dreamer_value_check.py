"""Does imagination promise a Dreamer checkpoint more than the env gives it?

    python benchmarks/dreamer_value_check.py runs/dreamer/LunarLander-v3/<stamp> --episodes 20 --out NAME

Plays ``--episodes`` episodes with the checkpoint's policy (``--actions sample``, the default, acts as in
training, which is the policy the critic is trained to value; ``mode`` as the evaluations), then, at every
``--every``-th row of each episode, compares what the agent believes with what the env delivered:

* **critic**: the critic's value of the posterior state, against the discounted return that followed in
  the episode (``ac.discount``; a truncated episode's tail is bootstrapped with the critic's value at its last
  row, so truncations do not count as failures of the critic; with ``env.time_feature`` the limit is a
  termination and its tail is 0);
* **imagination over the horizon**: from the same posterior state, ``--samples`` trajectories imagined
  with the actor for ``ac.horizon`` steps, as the actor-critic update does. Their discounted reward sum
  (the continue head's probabilities discounting, as in the update) against the episode's own rewards over
  the next ``ac.horizon`` steps (zero after a terminal row), the imagined probability of still running
  after the horizon against whether the episode did, and the critic's value where imagination ends against
  its value at the episode's own row ``ac.horizon`` steps later (rows whose episode runs that long), with
  in between the value where the model ends when fed the episode's own actions (open loop): imagined above
  open loop means the actor steers imagination towards states the critic likes; open loop above real means
  the model's prior drifts there by itself.

Rows are grouped by how the episode ended (landed / crashed / truncated: the same split as
``dreamer_lunarlander_episode_ends.py``) and by whether both legs touch at the row (LunarLander's
observation entries 6 and 7). If the critic's value exceeds what followed mainly on the rows of
truncated (hovering) episodes, and the imagined reward over the horizon does too, the world model's
short-term predictions are what the actor farms; if the imagined horizon matches the env and only the
value is high, the critic's bootstrap is. Figures are in env reward units (the run's
``env.reward_scale`` undone). Writes ``benchmarks/results/<--out>.json`` (or to ``--out`` itself when it is a path) with the provenance stamp.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from dreamer_cartpole_episode_ends import play  # noqa: E402
from dreamer_lunarlander_episode_ends import kind  # noqa: E402
from provenance import provenance, write_result  # noqa: E402
from recipes import dreamer as D  # noqa: E402
from torchrl_dreamer.dreamer.envs import time_limit  # noqa: E402
from torchrl_dreamer.dreamer.imagination import imagine  # noqa: E402


def discounted_tail(rew: torch.Tensor, gamma: float, bootstrap: float) -> torch.Tensor:
    """``G_t = sum_k gamma^k r_{t+k} + gamma^(L-t) * bootstrap`` for every row ``t`` of an episode of
    ``L = len(rew)`` steps (row ``L``, the final observation, gets ``bootstrap``)."""
    out = torch.empty(len(rew) + 1, dtype=torch.float64)
    out[-1] = bootstrap
    for t in range(len(rew) - 1, -1, -1):
        out[t] = float(rew[t]) + gamma * out[t + 1]
    return out


@torch.no_grad()
def check_episode(agent, obs, act, rew, *, truncated: bool, gamma: float, horizon: int, samples: int,
                  every: int, scale: float, cont_mode: str, start: int = 0) -> list[dict]:
    """One row per checked state ``t`` (every ``every``-th non-final row from ``start`` on): value vs return,
    imagined vs real reward over the horizon, imagined vs real continuation after it. ``[]`` if the episode
    ends before ``start``."""
    wm, critic, actor = agent.world_model, agent.critic, agent.actor
    L = act.shape[0]
    a = torch.cat([act, torch.zeros(1, act.shape[-1])])[None]  # no action is taken at the final row
    is_first = torch.zeros(1, L + 1, dtype=torch.bool)
    is_first[0, 0] = True
    post = wm.observe({"observation": obs[None]}, a, is_first)
    value = critic.mean(critic(post["feat"][0])).reshape(-1).double() / scale  # [L + 1], env units
    r = rew.double()
    # a terminated episode's final row is worth 0; a truncated one's is worth what the critic says
    ret = discounted_tail(r, gamma, float(value[-1]) if truncated else 0.0)
    if start >= L:
        return []
    starts = torch.arange(start, L, every)
    n = len(starts) * samples
    deter = post["deter"][0, starts].repeat_interleave(samples, 0)
    stoch = post["stoch"][0, starts].repeat_interleave(samples, 0)
    traj = imagine(wm, actor, deter, stoch, torch.ones(n), horizon, cont_mode=cont_mode)
    i_rew = traj["reward"][:, 1:].double() / scale  # [n, H]: reward of step k + 1
    i_cont = traj["cont"][:, 1:].double()           # [n, H]: continuation after step k + 1
    alive = torch.cumprod(torch.cat([torch.ones(n, 1, dtype=torch.float64), i_cont], 1), 1)  # [n, H + 1]
    disc = gamma ** torch.arange(horizon, dtype=torch.float64)
    i_sum = (i_rew * alive[:, :-1] * disc).sum(1).reshape(-1, samples).mean(1)
    i_alive = alive[:, -1].reshape(-1, samples).mean(1)
    end_value = critic.mean(critic(traj["feat"][:, -1])).reshape(-1).double() / scale  # [n]: V(s_H)
    i_boot = (end_value * alive[:, -1] * gamma ** horizon).reshape(-1, samples).mean(1)
    i_end_value = end_value.reshape(-1, samples).mean(1)
    # open loop: the same starts stepped through the prior with the episode's own next actions (zero
    # actions past its end; those rows are not reported), so the critic's value at the end compares the
    # model's prediction with the posterior of what happened, without the actor choosing
    rssm = wm.rssm
    idx = (starts[:, None] + torch.arange(horizon)).clamp(max=L - 1)  # [S, H]
    own = act[idx] * (starts[:, None] + torch.arange(horizon) < L)[..., None]
    h, z = deter, stoch
    for k in range(horizon):
        h = rssm.img_step(h, z, own[:, k].repeat_interleave(samples, 0))
        z = rssm.prior_sample(h)
    open_value = (critic.mean(critic(rssm.features(h, z))).reshape(-1).double() / scale).reshape(-1, samples).mean(1)
    legs = (obs[:, 6] > 0.5) & (obs[:, 7] > 0.5)
    rows = []
    for j, t in enumerate(starts.tolist()):
        end = min(t + horizon, L)
        real_sum = float((r[t:end] * disc[:end - t]).sum())
        running = t + horizon < L or (t + horizon == L and truncated)
        # the critic's value where imagination ends against its value at the episode's own row t + H
        # (only where the episode still runs there): imagination drifting towards states the critic
        # likes shows as the first above the second
        real_end = float(value[t + horizon]) if running else float("nan")
        rows.append({"t": t, "ground": bool(legs[t]), "value": float(value[t]), "return": float(ret[t]),
                     "imagined_reward": float(i_sum[j]), "real_reward": real_sum,
                     "imagined_alive": float(i_alive[j]), "real_alive": float(running),
                     "imagined_return": float(i_sum[j] + i_boot[j]),
                     "imagined_end_value": float(i_end_value[j]) if running else float("nan"),
                     "real_end_value": real_end,
                     "open_loop_end_value": float(open_value[j]) if running else float("nan")})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="agent steps per episode at most (default: the episode limit, 1,000 frames, in agent steps)")
    parser.add_argument("--every", type=int, default=10, help="check every N-th row of each episode")
    parser.add_argument("--samples", type=int, default=8, help="imagined trajectories per checked row")
    parser.add_argument("--actions", choices=("sample", "mode"), default="sample")
    parser.add_argument("--from", dest="start", type=int, default=0, metavar="T",
                        help="check rows from step T on only (e.g. 500: the late rows of hovering episodes, where "
                             "early rows that look like any other episode's are left out)")
    parser.add_argument("--out", default="dreamer_value_check", help="a name (benchmarks/results/<name>.json) or a path (with a folder, or ending in .json)")
    args = parser.parse_args(argv)
    if args.every < 1 or args.samples < 1 or args.episodes < 1 or args.start < 0:
        parser.error("--episodes, --every and --samples must be >= 1, --from >= 0")
    stamp = provenance()
    torch.manual_seed(0)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D.DreamerConfig),
                                              OmegaConf.load(args.run_dir / "config.yaml")))
    scale, gamma, horizon = cfg.env.reward_scale, cfg.ac.discount, cfg.ac.horizon
    args.max_steps = args.max_steps or time_limit(cfg.env.name, "", cfg.env.max_episode_steps, cfg.env.action_repeat)
    extra = int(cfg.env.still_tol > 0) + int(cfg.env.time_feature)  # entries appended to the 8 state entries
    env_steps, agent, episodes = play(args.run_dir, args.episodes, args.max_steps, obs_shape=(8 + extra,),
                                      sample=args.actions == "sample")
    limit = time_limit(cfg.env.name, cfg.env.factory, cfg.env.max_episode_steps, cfg.env.action_repeat) \
        if cfg.env.time_feature else 0
    groups: dict[str, list[dict]] = {}
    per_episode = []
    for obs, act, rew in episodes:
        L = act.shape[0]
        k = kind(float(rew[-1]), L, args.max_steps)
        # with env.time_feature the env's step limit is a termination the agent sees coming: no bootstrap
        # there (an episode cut short by --max-steps still gets one)
        bootstrap = k == "truncated" and not (cfg.env.time_feature and L >= limit)
        rows = check_episode(agent, obs, act, rew, truncated=bootstrap, gamma=gamma, horizon=horizon,
                             samples=args.samples, every=args.every, scale=scale, cont_mode=cfg.ac.cont_mode.value,
                             start=args.start)
        per_episode.append({"end": k, "length": L, "return": float(rew.sum()), "rows": rows})
        for row in rows:
            groups.setdefault(f"{k}, {'ground' if row['ground'] else 'air'}", []).append(row)
    keys = ("value", "return", "imagined_return", "imagined_reward", "real_reward", "imagined_alive", "real_alive",
            "imagined_end_value", "real_end_value", "open_loop_end_value")

    def mean(xs):  # NaN entries (rows whose episode ended within the horizon) are left out
        xs = [x for x in xs if x == x]
        return statistics.fmean(xs) if xs else float("nan")
    summary = {g: {"rows": len(rs), **{key: mean([r[key] for r in rs]) for key in keys}}
               for g, rs in sorted(groups.items())}
    ends = {}
    for e in per_episode:
        ends.setdefault(e["end"], []).append(e)
    print(f"checkpoint at {env_steps} env steps; {args.episodes} episodes with {args.actions} actions; "
          f"discount {gamma}, horizon {horizon}, {args.samples} imagined trajectories per row, every {args.every} rows"
          + (f" from step {args.start}" if args.start else ""))
    for k, es in sorted(ends.items()):
        print(f"  {k}: {len(es)} episodes, mean return {statistics.fmean(e['return'] for e in es):.1f}, "
              f"mean length {statistics.fmean(e['length'] for e in es):.0f}")
    print(f"| end, legs | rows | critic value | discounted return that followed | imagined return (horizon + value) | "
          f"reward over the {horizon}-step horizon: imagined / real | still running after it: imagined / real | "
          f"critic value after it: imagined / the episode's own actions through the model / real |")
    print("|---|---|---|---|---|---|---|---|")
    for g, s in summary.items():
        print(f"| {g} | {s['rows']} | {s['value']:.1f} | {s['return']:.1f} | {s['imagined_return']:.1f} | "
              f"{s['imagined_reward']:.2f} / {s['real_reward']:.2f} | {s['imagined_alive']:.3f} / {s['real_alive']:.3f} | "
              f"{s['imagined_end_value']:.1f} / {s['open_loop_end_value']:.1f} / {s['real_end_value']:.1f} |")
    result = {"run_dir": str(args.run_dir), "env_steps": env_steps, "episodes": args.episodes,
              "actions": args.actions, "every": args.every, "from": args.start, "samples": args.samples, "discount": gamma,
              "horizon": horizon, "summary": summary,
              "episodes_detail": [{k: v for k, v in e.items() if k != "rows"} for e in per_episode],
              "per_episode_rows": per_episode, **stamp}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
