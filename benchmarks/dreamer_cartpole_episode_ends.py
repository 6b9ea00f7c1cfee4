"""How a CartPole Dreamer checkpoint's evaluation episodes end, and what its world model thinks there.

    python benchmarks/dreamer_cartpole_episode_ends.py runs/dreamer/CartPole-v1/<stamp> --episodes 10

The script loads the run's checkpoint and plays ``--episodes`` episodes with mode actions (as the
recipe evaluates). For each episode it prints:

* the length, and the final cart position x, velocity v and pole angle theta;
* why the episode ended: ``x-out`` (|x| > 2.4), ``angle-out`` (|theta| > 12 degrees) or ``truncated``;
* along the last steps, the continue head's probability and the critic's value from the posterior
  states of that episode. At a terminal state both should be near 0.

It then prints the decoder's mean absolute error of each state variable, binned by |x|. This
tells you whether the world model still knows where the cart is near the edges.

Only for CartPole's 4-float state vector.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchrl.envs.utils import ExplorationType, set_exploration_type

from recipes import dreamer as D
from torchrl_dreamer.checkpoint import load_checkpoint
from torchrl_dreamer.dreamer.functional import symexp

X_LIMIT, THETA_LIMIT = 2.4, math.radians(12)  # CartPole-v1's termination bounds


def play(run_dir: Path, episodes: int, max_steps: int = 500, obs_shape: tuple = (4,), sample: bool = False):
    """Checkpoint env steps, agent, and per episode ``(observations [L+1, *obs_shape]`` (terminal one
    included), ``one-hot actions [L, A]``, ``rewards [L])``. Mode actions (as the recipe evaluates), or
    actions sampled from the actor (as in training) with ``sample``."""
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{run_dir}: no config.yaml here; pass a Dreamer run directory (runs/dreamer/<env>/<stamp>)")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D.DreamerConfig), OmegaConf.load(run_dir / "config.yaml")))
    cfg.model.compile = False
    cfg.device = "cpu"
    state = load_checkpoint(run_dir, map_location="cpu")
    env = D.make_env_from_config(cfg, num_envs=episodes, seed=cfg.seed + 20_000)
    shape = tuple(env.observation_spec["observation"].shape[len(env.batch_size):]) \
        if "observation" in env.observation_spec.keys() else None
    if cfg.env.pixels or shape != tuple(obs_shape):
        raise SystemExit(f"{run_dir}: observation shape {shape} (pixels={cfg.env.pixels}), this script reads "
                         f"state vectors of shape {tuple(obs_shape)}")
    agent, policy = D.build_agent(cfg, env)
    agent.load_state_dict(state["agent"])
    D.with_policy_state(env, policy)
    policy.random_actions = False
    td = env.reset()
    obs, acts, rews, lengths = [td["observation"].clone()], [], [], torch.full((episodes,), -1)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM if sample else ExplorationType.DETERMINISTIC):
        for t in range(max_steps):
            td = policy(td)
            acts.append(td["action"].clone())
            td, td_next = env.step_and_maybe_reset(td)
            obs.append(td["next", "observation"].clone())
            rews.append(td["next", "reward"].reshape(episodes).clone())
            done = td["next", "done"].reshape(episodes)
            lengths[done & (lengths < 0)] = t + 1
            if bool((lengths > 0).all()):
                break
            td = td_next
    env.close()
    lengths[lengths < 0] = len(acts)
    O, A, R = torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(rews, 1)
    n_actions = agent.world_model.rssm.action_dim
    out = []
    for i in range(episodes):
        L = int(lengths[i])
        a = A[i, :L].reshape(L, -1)
        a = a.float() if a.shape[-1] == n_actions else F.one_hot(a.long().reshape(L), n_actions).float()
        out.append((O[i, :L + 1], a, R[i, :L]))
    return state["env_steps"], agent, out


def end_reason(last: torch.Tensor, length: int, max_steps: int) -> str:
    if abs(float(last[0])) > X_LIMIT:
        return "x-out"
    if abs(float(last[2])) > THETA_LIMIT:
        return "angle-out"
    return "truncated" if length >= max_steps else "?"


@torch.no_grad()
def inspect(agent, obs: torch.Tensor, act: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posterior pass over one episode: features, continue probability, critic value, decoded state per row."""
    wm, critic = agent.world_model, agent.critic
    L = act.shape[0]
    a = torch.cat([act, torch.zeros(1, act.shape[-1])])[None]  # no action is taken at the final row
    is_first = torch.zeros(1, L + 1, dtype=torch.bool)
    is_first[0, 0] = True
    post = wm.observe({"observation": obs[None]}, a, is_first)
    feat = post["feat"]
    return {"feat": feat[0], "cont": torch.sigmoid(wm.continue_head(feat)).reshape(-1),
            "value": critic.mean(critic(feat)).reshape(-1),
            "reward": wm.reward_head.mean(wm.reward_head(feat)).reshape(-1),
            "decoded": symexp(wm.decoders["observation"](feat))[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--last", type=int, default=8, help="steps printed before each episode's end")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env_steps, agent, episodes = play(args.run_dir, args.episodes, args.max_steps)
    print(f"checkpoint at {env_steps} env steps; {args.episodes} episodes with mode actions")
    reasons, errors = [], {}
    for i, (obs, act, _) in enumerate(episodes):
        L = act.shape[0]
        last = obs[-1]
        reason = end_reason(last, L, args.max_steps)
        reasons.append(reason)
        out = inspect(agent, obs, act)
        print(f"episode {i}: {L} steps, {reason}: x {last[0]:+.2f} v {last[1]:+.2f} theta {last[2]:+.3f}")
        for t in range(max(0, L + 1 - args.last), L + 1):
            print(f"    t {t:3d}  x {obs[t, 0]:+.2f} v {obs[t, 1]:+.2f} theta {obs[t, 2]:+.3f} | "
                  f"continue {out['cont'][t]:.3f}  value {out['value'][t]:6.1f}  decoded x {out['decoded'][t, 0]:+.2f}")
        err = (out["decoded"] - obs).abs()
        for t in range(L + 1):
            errors.setdefault(min(int(abs(float(obs[t, 0])) / 0.4), 5), []).append(err[t])
    print("decoder mean absolute error by |x| (all rows):")
    table = {}
    for b in sorted(errors):
        e = torch.stack(errors[b]).mean(0)
        table[b] = e.tolist()
        print(f"  |x| in [{b * 0.4:.1f}, {b * 0.4 + 0.4:.1f}){'+' if b == 5 else ''}: {len(errors[b]):5d} rows | "
              f"x {e[0]:.3f}  v {e[1]:.3f}  theta {e[2]:.4f}  omega {e[3]:.3f}")
    summary = {r: reasons.count(r) for r in sorted(set(reasons))}
    print("ends:", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return {"env_steps": env_steps, "ends": summary, "decoder_error_by_abs_x": table}


if __name__ == "__main__":
    main()
