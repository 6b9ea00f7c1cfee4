"""Replay cost per collector batch vs rows stored: our ``StreamSliceSampler`` against TorchRL's
``SliceSampler(fragmented=True)``, the sampler it replaced.

    python benchmarks/replay_sampling.py                          # 50k .. 1M rows, LunarLander shapes
    python benchmarks/replay_sampling.py --rows 20000 100000 --cycles 10 --out /tmp/replay.json

One *cycle* is what the Dreamer recipe does per collector batch at the LunarLander YAML's settings:
``extend`` with the rows of 4 envs x 16 steps (``SequenceWriter``, 8-float observations, one-hot
actions of 4, episodes of ~200 steps), then ``--samples`` draws of ``--batch`` x ``--seq-len``
windows (``replay.train_ratio`` 64 with 32 x 32 windows owes 4 updates per batch). The buffer
(capacity 1,000,000, the recipe's default) is filled to each ``--rows`` figure in large batches
first (not timed), then ``--cycles`` cycles are timed; the median seconds per cycle, and per sample
(cycle / samples, what an update pays on top of the networks), are printed and written to JSON
(``--out``, default ``benchmarks/results/replay_sampling.json``) with the provenance stamp. One
thread (``torch.set_num_threads(1)``), as the recipe's runs. Both samplers draw the same windows
(uniform over the windows that fit, when the streams are equally long; the tests check the windows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from provenance import provenance, write_json  # benchmarks/provenance.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrl.data import LazyTensorStorage, ReplayBuffer, SliceSampler  # noqa: E402

from torchrl_dreamer.dreamer.replay import SequenceWriter, make_replay_buffer  # noqa: E402

ENVS, OBS, ACTIONS = 4, 8, 4


def transitions(T: int, g: torch.Generator, episode_len: int = 200) -> TensorDict:
    """A collector batch of ``ENVS`` x ``T`` LunarLander-shaped transitions with episode ends at random."""
    done = torch.rand(ENVS, T, 1, generator=g) < 1.0 / episode_len
    action = torch.nn.functional.one_hot(torch.randint(ACTIONS, (ENVS, T), generator=g), ACTIONS)
    return TensorDict({
        "observation": torch.randn(ENVS, T, OBS, generator=g), "action": action,
        "is_first": torch.zeros(ENVS, T, 1, dtype=torch.bool),
        "next": {"observation": torch.randn(ENVS, T, OBS, generator=g), "reward": torch.randn(ENVS, T, 1, generator=g),
                 "done": done, "terminated": done.clone()},
    }, [ENVS, T])


def torchrl_buffer(capacity: int, batch: int, seq_len: int) -> ReplayBuffer:
    """The buffer as the recipe built it before ``StreamSliceSampler``."""
    sampler = SliceSampler(slice_len=seq_len, traj_key="stream", step_key="step", fragmented=True,
                           strict_length=True, init_key=None, truncated_key=None)
    return ReplayBuffer(storage=LazyTensorStorage(capacity), sampler=sampler, batch_size=batch * seq_len)


def measure(kind: str, rows_list: list[int], args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rb = (make_replay_buffer(args.capacity, args.batch, args.seq_len) if kind == "ours"
          else torchrl_buffer(args.capacity, args.batch, args.seq_len))
    writer = SequenceWriter({"observation": "observation"}, lambda a: a.float(), num_envs=ENVS)
    out = []
    for target in rows_list:
        while len(rb) + ENVS * 2048 <= target:  # fill, untimed
            rb.extend(writer(transitions(2048, g)))
        while len(rb) < target:
            rb.extend(writer(transitions(16, g)))
        rb.sample()  # the sampler catches up with the fill (TorchRL's indexes it here)
        times = []
        for _ in range(args.cycles):
            t0 = time.perf_counter()
            rb.extend(writer(transitions(args.steps, g)))
            for _ in range(args.samples):
                rb.sample()
            times.append(time.perf_counter() - t0)
        cycle = statistics.median(times)
        out.append({"sampler": kind, "rows": len(rb), "cycle_s": cycle, "per_sample_s": cycle / args.samples,
                    "cycle_min_s": min(times), "cycle_max_s": max(times)})
        print(f"{kind:<8} {len(rb):>10,} rows  {1e3 * cycle:8.2f} ms per cycle  "
              f"{1e3 * cycle / args.samples:7.2f} ms per sample", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[50_000, 250_000, 500_000, 1_000_000])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="steps per env per collector batch")
    parser.add_argument("--samples", type=int, default=4, help="samples (updates) per collector batch")
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replay_sampling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows_list = sorted(r for r in args.rows if r <= args.capacity)
    results = measure("ours", rows_list, args) + measure("torchrl", rows_list, args)
    by = {(r["sampler"], r["rows"] // 1000): r for r in results}
    for r in results:
        if r["sampler"] == "ours":
            other = by.get(("torchrl", r["rows"] // 1000))
            r["torchrl_over_ours"] = other["cycle_s"] / r["cycle_s"] if other else None
            print(f"{r['rows']:>10,} rows: TorchRL's fragmented SliceSampler / ours = {r['torchrl_over_ours']:.1f}x per cycle")
    record = {**provenance(torch_threads_runs=1), "benchmark": "replay_sampling", "capacity": args.capacity,
              "batch": args.batch, "seq_len": args.seq_len, "envs": ENVS, "steps_per_batch": args.steps,
              "samples_per_batch": args.samples, "cycles": args.cycles, "results": results}
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
