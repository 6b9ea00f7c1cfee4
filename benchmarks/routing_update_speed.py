"""Time of one routing Dreamer update, by phase, for config variants on the same replay.

    python benchmarks/routing_update_speed.py --env cvrp20 --run-dir runs/dreamer_routing/cvrp20/<stamp> \
        --variant full=ac.stop_when_done=false --variant stop=ac.stop_when_done=true --out NAME

Builds the recipe's agent and update for ``--env`` (its YAMLs, then each variant's overrides), loads
the weights of ``--run-dir``'s checkpoint if given (a trained policy decodes tours of realistic length;
without one the weights are random), decodes ``--episodes`` instances into a replay with that policy
and times ``--updates`` updates per variant after ``--warmup`` (one thread, the recipe's batch and
trimming). The variants run in alternating rounds so that they share the machine's drift. Prints the
median milliseconds per update and per phase (world model, imagination, actor + critic) and writes
``benchmarks/results/<out>.json`` (or ``--out`` itself when it is a path).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_result  # noqa: E402

from recipes import dreamer_routing as recipe  # noqa: E402
from torchrl_dreamer.checkpoint import load_checkpoint  # noqa: E402
from torchrl_dreamer.cli import parse_recipe_args  # noqa: E402
from torchrl_dreamer.config import to_object  # noqa: E402

PHASES = ("time/update_world_model_s", "time/update_imagination_s", "time/update_actor_critic_s")


def build_variant(env: str, overrides: list[str], weights: dict | None, seed: int):
    spec = recipe.RECIPE_SPEC  # the recipe's own layering: base, env YAML, Dreamer's env YAML, overrides
    args = parse_recipe_args(["--env", env, "threads=1", *overrides], schema=spec.schema, config_dir=spec.config_dir,
                             description="", default_env=spec.default_env, env_config_dir=spec.env_config_dir,
                             factory_env=spec.factory_env)
    cfg = to_object(args.cfg)
    torch.manual_seed(seed)
    agent, _, update = recipe.build(cfg)
    if weights is not None:
        try:
            recipe.load_weights(agent, weights)
        except recipe.CheckpointError:
            # a variant that adds modules (e.g. model.actor_encoder=true): the shared weights load, the
            # new modules keep their initial values (the timing does not depend on their values)
            missing, unexpected = agent.load_state_dict(weights, strict=False)
            if unexpected:
                raise
            print(f"note: {len(missing)} tensors of the variant {overrides} are not in the checkpoint; left at init")
    return cfg, agent, update


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cvrp20", help="tsp20 | cvrp20 | tsp50 | cvrp50")
    parser.add_argument("--run-dir", type=Path, default=None, help="a routing Dreamer run whose weights decode the replay")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=k=v,k=v",
                        help="a named set of overrides (repeat; none: the YAMLs as they are)")
    parser.add_argument("--episodes", type=int, default=512, help="instances decoded into the replay")
    parser.add_argument("--updates", type=int, default=10, help="timed updates per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="a name (benchmarks/results/<name>.json) or a path (with a folder, or ending in .json); default: not written")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stamp = provenance(torch_threads_runs=1)
    variants = {}
    for spec in args.variant or ["yaml="]:
        name, _, rest = spec.partition("=")
        variants[name] = [o for o in rest.split(",") if o]
    weights = load_checkpoint(args.run_dir)["agent"] if args.run_dir else None
    built = {name: build_variant(args.env, ov, weights, args.seed) for name, ov in variants.items()}
    cfg, agent, _ = next(iter(built.values()))
    env, rows_bound, rb = recipe.make_stage(cfg, cfg.env.size, 0)
    with torch.no_grad():
        for _ in range(max(1, args.episodes // cfg.train.episodes_per_iter)):
            rows, _ = recipe.dreamer_rollout(env, agent.world_model, agent.actor, mode="sample", max_rows=rows_bound)
            rb.extend(rows)
    times: dict[str, list[float]] = {name: [] for name in built}
    phases: dict[str, list[list[float]]] = {name: [] for name in built}
    def batch_for(c):  # what the recipe's run_updates feeds the update
        batch = rb.sample(c.replay.batch_size)
        return recipe.trim_padding(batch) if c.replay.trim_padding else batch

    for name, (c, _, update) in built.items():
        for _ in range(args.warmup):
            update(batch_for(c))
    for round_ in range(args.rounds):
        order = list(built.items())
        for name, (c, _, update) in (order if round_ % 2 == 0 else order[::-1]):
            torch.manual_seed(args.seed + round_)
            for _ in range(args.updates):
                batch = batch_for(c)
                t0 = time.perf_counter()
                metrics = update(batch)
                times[name].append(time.perf_counter() - t0)
                phases[name].append([float(metrics[k]) for k in PHASES])
    summary = {}
    print("| variant | overrides | ms per update (median) | world model | imagination | actor + critic |")
    print("|---|---|---|---|---|---|")
    for name in built:
        ms = 1000 * statistics.median(times[name])
        per_phase = [1000 * statistics.median(p) for p in zip(*phases[name])]
        summary[name] = {"overrides": variants[name], "ms_per_update": ms, "ms_world_model": per_phase[0],
                         "ms_imagination": per_phase[1], "ms_actor_critic": per_phase[2], "updates": len(times[name])}
        print(f"| {name} | {' '.join(variants[name]) or '-'} | {ms:.0f} | {per_phase[0]:.0f} | {per_phase[1]:.0f} | "
              f"{per_phase[2]:.0f} |")
    record = {"env": args.env, "run_dir": str(args.run_dir) if args.run_dir else None, "episodes": args.episodes,
              "summary": summary, **stamp}
    if args.out:
        write_result(args.out, record)
    return record


if __name__ == "__main__":
    main()
