"""Same-process A/B of our compiled Dreamer update: the package against edited copies of it.

    cp -r torchrl_dreamer /tmp/pkgs/torchrl_dreamer_b            # edit the copy
    python benchmarks/dreamer_update_ab.py --pkgs /tmp/pkgs cur b --rounds 12 --per-round 15
    python benchmarks/dreamer_update_ab.py --pkgs /tmp/pkgs b b+aggr c+noguard

Each spec is ``NAME[+FLAG...]``: ``cur`` is the installed ``torchrl_dreamer``, any other NAME the copy
``<pkgs>/torchrl_dreamer_NAME``. Every spec builds the throughput benchmark's update (137k-parameter
sizes, batch 8 x 16, horizon 15, ``--compile-full`` as the recipe compiles it; one thread,
``tune_malloc``), warms it up, and then the specs run in alternating rounds (the order flips every
round), so they share the machine's drift. Prints each spec's median updates/s and phase times,
and the median, min and max of the per-round ratios against the first spec.

A spec compiles its own graphs only if its code differs: ``torch.compile`` reuses the compiled
graphs of an identical code object, so compare inductor flags on a copy (``b+aggr``), not on
``cur+aggr``. Flags (inductor settings while the spec compiles, or how it runs):

* ``simd256``: ``cpp.simdlen=256`` (8-wide vectors);
* ``aggr``: ``aggressive_fusion=True``;
* ``hfuse``: ``cpp.max_horizontal_fusion_size=64``;
* ``dmmN`` / ``dmmNoM``: decompose matmuls whose first dimension is <= N (other dimensions <= M,
  default 1024) into fused multiply-sum loops (the ``decompose_mm_pass`` post-grad pass);
* ``noguard``: run with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` after warm-up
  (unsafe: a bound on what dynamo's guard checks cost, not a setting to use);
* ``nocw``: inductor's Python host code instead of the C++ wrapper.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreamer_throughput import build_ours  # noqa: E402
from torchrl_reference_dreamer import RefSizes  # noqa: E402

from torchrl_dreamer.cpu import tune_malloc  # noqa: E402


def _inductor_patch(flags: list[str]):
    patch: dict = {}
    if "simd256" in flags:
        patch["cpp.simdlen"] = 256
    if "aggr" in flags:
        patch["aggressive_fusion"] = True
    if "hfuse" in flags:
        patch["cpp.max_horizontal_fusion_size"] = 64
    for flag in flags:
        if flag.startswith("dmm"):
            import torch._inductor.fx_passes.decompose_mem_bound_mm as dmm

            first, _, other = flag[3:].partition("o")
            # the pass reads these module globals when it runs (set once; they only matter while
            # a spec with the pass enabled compiles)
            dmm.cpu_max_first_dimension_decomposition = int(first)
            dmm.cpu_max_other_dimension_decomposition = int(other or 1024)
            patch["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    return torch._inductor.config.patch(**patch) if patch else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="NAME[+FLAG...]; the first is the baseline of the ratios")
    parser.add_argument("--pkgs", type=Path, default=None, help="folder holding the torchrl_dreamer_NAME copies")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (checks the harness itself)")
    args = parser.parse_args()
    if args.pkgs is not None:
        sys.path.insert(0, str(args.pkgs))
    torch.set_num_threads(1)
    print("tune_malloc:", tune_malloc())
    runs = {}
    for spec in args.specs:
        name, *flags = spec.split("+")
        package = "torchrl_dreamer" if name == "cur" else f"torchrl_dreamer_{name}"
        if package != "torchrl_dreamer" and (args.pkgs is None or not (args.pkgs / package).is_dir()):
            raise SystemExit(f"no package copy {package} under --pkgs {args.pkgs}")
        t = time.perf_counter()
        with _inductor_patch(flags):
            fn, _ = build_ours(RefSizes(), compile_full=not args.eager, cpp_wrapper="nocw" not in flags,
                               package=package)
            for _ in range(args.warmup):
                fn()
        print(f"{spec}: built and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
        stance = (lambda: torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)) if "noguard" in flags \
            else contextlib.nullcontext
        runs[spec] = {"fn": fn, "stance": stance, "rates": [], "phases": {}}
    for r in range(args.rounds):
        for spec in (args.specs if r % 2 == 0 else args.specs[::-1]):
            run = runs[spec]
            with run["stance"]():
                t = time.perf_counter()
                for _ in range(args.per_round):
                    for k, v in run["fn"]().items():
                        run["phases"].setdefault(k, []).append(v * 1e3)
                run["rates"].append(args.per_round / (time.perf_counter() - t))
    for spec, run in runs.items():
        phases = ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in run["phases"].items())
        print(f"{spec}: median {statistics.median(run['rates']):.2f} updates/s ({phases})")
    base = runs[args.specs[0]]["rates"]
    for spec in args.specs[1:]:
        ratios = [b / a for a, b in zip(base, runs[spec]["rates"])]
        print(f"ratio {spec} / {args.specs[0]}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
