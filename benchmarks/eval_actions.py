"""Mode actions or sampled ones: how a trained Dreamer policy scores under each evaluation.

    python benchmarks/eval_actions.py runs/dreamer/LunarLander-v3/<stamp> [more run dirs] --episodes 50

For each run directory, its final weights (``checkpoint.pt``) and ``best.pt`` play ``--episodes``
episodes twice: with the actor's most likely action (``eval.actions=mode``, the recipe's default)
and with actions drawn from the actor (``eval.actions=sample``, as in training and in DreamerV3's
reference code). Both use the episodes the end-of-run re-score uses (``result.json``: env and torch
seeded with the run's seed + 30,000), so the mode column repeats that file's figures and the two
columns differ only in how actions are picked.

Prints a markdown table (and the mean and range of sample - mode) and writes
``<--out>.json`` with the provenance stamp and per-checkpoint figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from provenance import RESULTS, provenance, write_json  # noqa: E402
from recipes import dreamer as D  # noqa: E402
from torchrl_dreamer.checkpoint import load_checkpoint, load_weights  # noqa: E402


def score(cfg, agent, policy, weights, episodes: int, actions: str) -> dict[str, float]:
    """``episodes`` episodes on the end-of-run re-score's seeds with ``weights`` loaded."""
    load_weights(agent, weights, "checkpoint")
    seed = cfg.seed + 30_000
    env = D.with_policy_state(D.make_env_from_config(cfg, num_envs=episodes, seed=seed), policy)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            env.set_seed(seed)
            m = D.evaluate(policy, env, actions=actions)
    finally:
        env.close(raise_if_closed=False)
    return {"episode_reward_sum": m["eval/episode_reward_sum"], "episode_length": m["eval/episode_length"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_actions",
                        help="output path without suffix (writes <out>.json; default: benchmarks/results/eval_actions)")
    args = parser.parse_args(argv)
    stamp = provenance()
    rows = []
    print("| run | seed | weights (env steps) | mode | sample | sample - mode | episode length: mode / sample |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        if not (run_dir / "config.yaml").exists():
            raise SystemExit(f"Error: {run_dir} is not a run directory (no config.yaml)")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D.DreamerConfig),
                                                  OmegaConf.load(run_dir / "config.yaml")))
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        probe = D.make_env_from_config(cfg, num_envs=1, seed=cfg.seed)
        agent, policy = D.build_agent(cfg, probe)
        probe.close(raise_if_closed=False)
        for name in ("checkpoint.pt", "best.pt"):
            path = run_dir / name
            if not path.exists():
                continue
            state = load_checkpoint(path)
            row = {"run_dir": str(run_dir), "seed": cfg.seed, "weights": name, "env_steps": state["env_steps"],
                   **{a: score(cfg, agent, policy, state["agent"], args.episodes, a) for a in ("mode", "sample")}}
            rows.append(row)
            m, s = row["mode"], row["sample"]
            label = f"{run_dir.parent.parent.parent.name}/{run_dir.name}"
            print(f"| {label} | {cfg.seed} | {name} ({state['env_steps']:,}) "
                  f"| {m['episode_reward_sum']:.1f} | {s['episode_reward_sum']:.1f} "
                  f"| {s['episode_reward_sum'] - m['episode_reward_sum']:+.1f} "
                  f"| {m['episode_length']:.0f} / {s['episode_length']:.0f} |", flush=True)
    diffs = [r["sample"]["episode_reward_sum"] - r["mode"]["episode_reward_sum"] for r in rows]
    summary = {"checkpoints": len(rows), "sample_minus_mode_mean": statistics.fmean(diffs) if diffs else None,
               "sample_minus_mode_min": min(diffs, default=None), "sample_minus_mode_max": max(diffs, default=None),
               "sample_better": sum(d > 0 for d in diffs)}
    if diffs:
        print(f"sample - mode over {len(diffs)} checkpoints: mean {summary['sample_minus_mode_mean']:+.1f}, "
              f"range {summary['sample_minus_mode_min']:+.1f} .. {summary['sample_minus_mode_max']:+.1f}; "
              f"sample higher on {summary['sample_better']}")
    result = {"episodes": args.episodes, "summary": summary, "rows": rows, **stamp}
    out = Path(args.out)
    write_json(out if out.suffix == ".json" else out.with_name(out.name + ".json"), result)
    return result


if __name__ == "__main__":
    main()
