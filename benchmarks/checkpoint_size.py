"""Dreamer ``checkpoint.pt`` size vs env steps: replay rows in use vs the old full-capacity replay.

    python benchmarks/checkpoint_size.py                                  # CartPole state + pixels
    python benchmarks/checkpoint_size.py --state-steps 100 400 --pixel-steps 100 --out /tmp/sizes.json

Runs the Dreamer recipe (``recipes.dreamer.main``) with the shipped YAMLs' replay capacity
(``cartpole``: 1,000,000 rows from ``base.yaml``; ``cartpole_pixels``: 200,000 rows of 64x64x3
uint8) and tiny networks (the recipe tests' sizes, eager, 1 thread, a train ratio of 1 so that a few
updates run), once per env-step count, each in a fresh run directory, and reports the size in bytes
of the ``checkpoint.pt`` it writes (runs stop after whole collector batches of 2 envs x 8 steps, so
"env steps" is the run's count, e.g. 112 when 100 are asked). The checkpoint keeps the replay rows in use
(:func:`torchrl_dreamer.dreamer.replay.replay_state_dict`).

"old format" is the size the same checkpoint had when it stored ``rb.state_dict()`` (the whole
pre-allocated ``LazyTensorStorage``): computed, not run: the checkpoint is loaded, its replay goes
into a fresh buffer of the run's capacity (``load_replay_state_dict``; the tests check this gives
the same rows, cursor and samples), ``state["replay"]`` is replaced by that buffer's
``rb.state_dict()``, and the bytes ``torch.save`` writes for it are counted (written to a byte
counter, so the GBs of the pixel replay are never held in memory or on disk). The same counter on
the checkpoint as loaded gives ``counted_checkpoint_bytes``, which matches the file's size.

Prints a table and writes JSON (``--out``, default ``benchmarks/results/checkpoint_size.json``) with
the machine, versions, git commit and argv.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from provenance import provenance, write_json  # benchmarks/provenance.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import dreamer  # noqa: E402
from torchrl_dreamer.dreamer.replay import load_replay_state_dict, make_replay_buffer  # noqa: E402

# the recipe tests' tiny settings (tests/helpers.py DREAMER_TINY), with few updates and no evaluation
TINY = [
    "model.size=tiny", "model.deter=32", "model.hidden=16", "model.units=16", "model.stoch=4", "model.classes=4",
    "model.blocks=2", "model.cnn_depth=4", "replay.batch_size=2", "replay.seq_len=8", "replay.train_ratio=1",
    "replay.prefill=40", "env.num_envs=2", "train.steps_per_collect=8", "eval.every=0", "run.progress=false",
    "run.tensorboard=false", "run.log_every=64", "ac.horizon=3", "threads=1", "optim.warmup_steps=0",
    "model.compile=false",
]


class ByteCounter:
    """A write-only file for ``torch.save`` that keeps only the number of bytes written."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def saved_bytes(obj) -> int:
    counter = ByteCounter()
    torch.save(obj, counter)
    return counter.n


def measure(env: str, steps: int, root: Path) -> dict:
    t0 = time.perf_counter()
    run_dir = dreamer.main(["--env", env, *TINY, f"run.root={root / f'{env}_{steps}'}", f"train.env_steps={steps}"])
    run_s = time.perf_counter() - t0
    path = Path(run_dir) / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    replay = state["replay"]
    rows, capacity = int(replay["_storage"]["_len"]), int(replay["capacity"])
    rb = make_replay_buffer(capacity, batch_size=2, seq_len=8)
    load_replay_state_dict(rb, replay)
    assert len(rb) == rows
    old_bytes = saved_bytes({**state, "replay": rb.state_dict()})
    new_bytes = path.stat().st_size
    counted_new = saved_bytes(state)  # the byte counter on the checkpoint as written: should equal the file
    state_steps = state["env_steps"]  # whole collector batches: 16 env steps at a time here
    del rb, state
    return {"env": env, "env_steps_asked": steps, "env_steps": int(state_steps), "replay_rows": rows,
            "replay_capacity": capacity, "checkpoint_bytes": new_bytes, "counted_checkpoint_bytes": counted_new,
            "old_format_bytes": old_bytes,
            "old_over_new": old_bytes / new_bytes, "run_s": round(run_s, 2)}


def machine(default_threads: int) -> dict:
    """Provenance of the numbers; the runs set threads=1 (TINY), ``default_threads`` is torch's default here."""
    return provenance(torch_threads_runs=1, torch_threads_default=default_threads)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-steps", type=int, nargs="*", default=[100, 400, 1600],
                        help="env steps of the CartPole (state) runs")
    parser.add_argument("--pixel-steps", type=int, nargs="*", default=[100, 400],
                        help="env steps of the CartPole pixels runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoint_size.json")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()

    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt_size_") as tmp:
        for env, steps_list in (("cartpole", args.state_steps), ("cartpole_pixels", args.pixel_steps)):
            for steps in steps_list:
                results.append(measure(env, steps, Path(tmp)))

    header = f"{'env':<16} {'env steps':>9} {'replay rows':>11} {'capacity':>9} {'checkpoint.pt':>14} " \
             f"{'old format':>14} {'old/new':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['env']:<16} {r['env_steps']:>9} {r['replay_rows']:>11} {r['replay_capacity']:>9} "
              f"{r['checkpoint_bytes']:>14,} {r['old_format_bytes']:>14,} {r['old_over_new']:>7.0f}x")
    print("(bytes; old format = the same checkpoint with rb.state_dict(), counted by torch.save, not run; "
          f"byte counter = file size on every run: {all(r['counted_checkpoint_bytes'] == r['checkpoint_bytes'] for r in results)})")

    report = {"machine": machine(default_threads), "settings": TINY, "results": results}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
