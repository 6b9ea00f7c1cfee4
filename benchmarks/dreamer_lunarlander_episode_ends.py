"""How a LunarLander Dreamer checkpoint's episodes end, and whether its world model sees the end coming.

    python benchmarks/dreamer_lunarlander_episode_ends.py runs/dreamer/LunarLander-v3/<stamp> --episodes 20

Plays ``--episodes`` episodes with mode actions (as the recipe evaluates) and sorts the ends:
``landed`` (terminated with the +100 bonus: the lander came to rest), ``crashed`` (terminated with
the -100 penalty: body contact or out of the screen) or ``truncated`` (1,000 steps: usually hovering).
For each kind of ending it reports, from the posterior states of the episodes:

* the continue head's probability at the final (terminal) row and at the row before it
  (a calibrated head: ~0 and ~1);
* the reward head's prediction at the final row against the reward received there;
* how much the observation changed over the last step (max |x_T - x_{T-1}|): a terminal state
  that looks like its predecessor cannot be told apart by the observation alone.

A second table looks at the rows where both legs touch the ground (the landing bonus comes once Box2D
puts the lander to sleep; whether engine use on the ground delays that is what the table lets one
check). Per kind of ending: steps on the ground, the share of them spent firing an engine, and the
actor's mean probabilities there. Few ground steps in truncated episodes mean the lander hovered. Last, the
reward received over the 100 steps before the final row against the reward head's predictions there
(a bonus the head cannot time is spread over the rows before it).

Writes ``benchmarks/results/<--out>.json`` (or to ``--out`` itself when it is a path) with the provenance stamp.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from dreamer_cartpole_episode_ends import inspect, play  # noqa: E402
from provenance import provenance, write_result  # noqa: E402
from recipes import dreamer as D  # noqa: E402
from torchrl_dreamer.dreamer.envs import time_limit  # noqa: E402



def kind(final_reward: float, length: int, max_steps: int) -> str:
    if length >= max_steps:
        return "truncated"
    return "landed" if final_reward > 50 else "crashed" if final_reward < -50 else "other"


ACTIONS = ("none", "left", "main", "right")  # LunarLander-v3's discrete actions, in order


@torch.no_grad()
def on_ground(agent, feat: torch.Tensor, obs: torch.Tensor, act: torch.Tensor) -> dict[str, float]:
    """Steps after which both leg contacts (entries 6 and 7) are set, the share of them that fired an
    engine, and the actor's mean action probabilities there (NaN if none). ``feat``: the episode's
    posterior features, one row per observation (``inspect(...)["feat"]``)."""
    after = obs[1:]
    rows = ((after[:, 6] > 0.5) & (after[:, 7] > 0.5)).nonzero().reshape(-1)
    out = {"ground_steps": float(len(rows))}
    if not len(rows):
        return {**out, "ground_engine_share": float("nan"), **{f"ground_prob_{a}": float("nan") for a in ACTIONS}}
    nxt = rows + 1  # the observation after each such step, where the next action is chosen
    probs = agent.actor(feat[nxt]).probs
    taken = act[nxt[nxt < act.shape[0]]].argmax(-1)  # the actions taken there (none after the final row)
    share = float((taken != 0).float().mean()) if len(taken) else float("nan")
    return {**out, "ground_engine_share": share,
            **{f"ground_prob_{name}": float(probs[:, i].mean()) for i, name in enumerate(ACTIONS)}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="agent steps per episode at most (default: the episode limit, 1,000 frames, in agent steps)")
    parser.add_argument("--out", default="dreamer_lunarlander_episode_ends", help="a name (benchmarks/results/<name>.json) or a path (with a folder, or ending in .json)")
    args = parser.parse_args(argv)
    stamp = provenance()
    torch.manual_seed(0)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D.DreamerConfig),
                                              OmegaConf.load(args.run_dir / "config.yaml")))
    args.max_steps = args.max_steps or time_limit(cfg.env.name, "", cfg.env.max_episode_steps, cfg.env.action_repeat)
    scale = cfg.env.reward_scale
    # env.still_tol and env.time_feature each append one entry to the 8 state entries (the count first)
    still = cfg.env.still_tol > 0
    extra = int(still) + int(cfg.env.time_feature)
    env_steps, agent, episodes = play(args.run_dir, args.episodes, args.max_steps, obs_shape=(8 + extra,))
    rows: dict[str, list[dict]] = {}
    for obs, act, rew in episodes:
        L = act.shape[0]
        out = inspect(agent, obs, act)
        k = kind(float(rew[-1]), L, args.max_steps)
        ground = on_ground(agent, out["feat"], obs, act)
        rows.setdefault(k, []).append({
            "length": L, "return": float(rew.sum()), "final_reward": float(rew[-1]),
            "predicted_final_reward": float(out["reward"][-1]) / scale,
            "continue_final": float(out["cont"][-1]), "continue_before": float(out["cont"][-2]),
            "obs_change_last_step": float((obs[-1, :8] - obs[-2, :8]).abs().max()),
            **({"still_steps_final": float(obs[-1, 8])} if still else {}),
            **ground,
            # the reward head over the 100 steps before the final row (the row after each step predicts
            # that step's reward): a landing bonus it cannot time shows up here, spread over the ground rows
            "reward_before_end": float(rew[-101:-1].sum()),
            "predicted_reward_before_end": float(out["reward"][1:][-101:-1].sum()) / scale,
        })
    def mean(xs):  # NaN entries (an episode that never touched the ground) are left out
        xs = [x for x in xs if x == x]
        return statistics.fmean(xs) if xs else float("nan")
    print(f"checkpoint at {env_steps} env steps; {args.episodes} episodes with mode actions")
    print("| end | episodes | mean return | continue prob. at the final row / the row before | "
          "final reward: received / predicted | max obs change over the last step |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for k, rs in sorted(rows.items()):
        s = {key: mean([r[key] for r in rs]) for key in rs[0]}
        summary[k] = {"episodes": len(rs), **s}
        print(f"| {k} | {len(rs)} | {s['return']:.1f} | {s['continue_final']:.3f} / {s['continue_before']:.3f} | "
              f"{s['final_reward']:.1f} / {s['predicted_final_reward']:.1f} | {s['obs_change_last_step']:.3f} |"
              + (f" steps at rest at the end: {s['still_steps_final']:.1f}" if still else ""))
    print("\nOn the ground (both legs touching):")
    print("| end | episodes | steps on the ground | share firing an engine there | actor's mean probabilities there: "
          "none / left / main / right |")
    print("|---|---|---|---|---|")
    for k, rs in sorted(rows.items()):
        s = summary[k]
        probs = " / ".join(f"{s[f'ground_prob_{a}']:.2f}" for a in ACTIONS)
        print(f"| {k} | {len(rs)} | {s['ground_steps']:.1f} | {s['ground_engine_share']:.2f} | {probs} |")
    print("\nReward over the 100 steps before the final row, received / predicted by the reward head:")
    for k, rs in sorted(rows.items()):
        s = summary[k]
        print(f"  {k}: {s['reward_before_end']:.1f} / {s['predicted_reward_before_end']:.1f}")
    result = {"run_dir": str(args.run_dir), "env_steps": env_steps, "episodes": args.episodes, "summary": summary,
              "per_episode": rows, **stamp}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
