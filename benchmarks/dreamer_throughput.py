"""Gradient updates per second: our full DreamerV3 update vs TorchRL 0.14's built-in one, same sizes.

    python benchmarks/dreamer_throughput.py                      # 137k-parameter sizes, 8x16, H=15, 1 thread
    python benchmarks/dreamer_throughput.py --rounds 7 --per-round 10
    python benchmarks/dreamer_throughput.py --ours-only --batch 16 --seq-len 64 --size tiny
    python benchmarks/dreamer_throughput.py --ours-only --size tiny --batch 32 --seq-len 32 --compile-full \
        --no-cpp-wrapper --start-fraction 0.25 --replay-value 0 --obs-dim 8 --action-dim 4 \
        --profile 10   # the LunarLander YAML's update at the tiny size

One "update" is the whole thing on a fixed ``[batch, seq_len]`` batch of random vector observations
(CartPole-shaped by default: 4 floats, 2 actions; ``--obs-dim`` / ``--action-dim`` for another env): world-model
loss forward + backward, imagination for ``horizon`` steps from every posterior state, critic
(imagined lambda-returns + slow-critic regulariser + the 0.3-weighted replay-value loss, which
TorchRL's ``DreamerV3Loss`` includes by default) and actor losses, backward, optimizer step
(TorchRL's ``DreamerV3Optimizer`` in both), slow-critic EMA.

TorchRL's side is ``benchmarks/torchrl_reference_dreamer.py`` (its modules and losses, run by its
own ``DreamerV3OptimizationStepper``, with the options that differ from the DreamerV3 reference set
to the reference values; see that file). Ours is ``torchrl_dreamer.dreamer.update.DreamerUpdate``
with the same widths, depths, latent sizes, bins, batch and horizon.

The machine is shared and drifts, so the two are *interleaved*: each round times ``--per-round``
updates of ours, then of TorchRL's; the ratio reported is the median of the per-round ratios.

Allocator: the process applies :func:`torchrl_dreamer.cpu.tune_malloc` first, as the recipes do
(``--default-malloc``: glibc's defaults). It is process-wide, so both updates run under it. With
glibc's defaults the page faults of freed-and-reallocated blocks fall unevenly: interleaved, TorchRL's
update paid 3-8k minor faults per update and ours 0-150, which flattered the ratio. The minor page
faults per update of each side are printed and stored.

Prints figures and writes ``benchmarks/results/dreamer_throughput.json`` (``--ours-only``:
``dreamer_throughput_ours.json``; ``--out`` for another file).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).parent))
from torchrl_reference_dreamer import RefSizes, build_torchrl_update  # noqa: E402

from torchrl_dreamer.cpu import minor_page_faults, tune_malloc  # noqa: E402
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)


def build_ours(s: RefSizes, *, size: str | None = None, seed: int = 0, replay_value: float = 0.3,
               compile_scan: bool = False, compile_full: bool = False, cpp_wrapper: bool = True,
               package: str = "torchrl_dreamer", start_fraction: float = 1.0):
    """Our update at the sizes of ``s`` (or a named preset). Returns (fn, param counts). Compiled
    as the recipe compiles it (``inductor_options``: on CPU inductor's C++ wrapper unless
    ``cpp_wrapper=False``). ``package``: build it from another importable copy of the package
    (``benchmarks/dreamer_update_ab.py`` compares edited copies in one process)."""
    mod = lambda name: importlib.import_module(f"{package}.{name}")  # noqa: E731
    inductor_options = mod("cpu").inductor_options
    make_agent, preset = mod("dreamer.agent").make_agent, mod("dreamer.agent").preset
    ImaginationModule = mod("dreamer.imagination").ImaginationModule
    losses, update_mod = mod("dreamer.losses"), mod("dreamer.update")
    DreamerPolicyLoss, DreamerCriticLoss, DreamerWorldModelLoss = losses.DreamerPolicyLoss, losses.DreamerCriticLoss, losses.DreamerWorldModelLoss
    DreamerUpdate, make_optimizer = update_mod.DreamerUpdate, update_mod.make_optimizer
    kw = inductor_options("cpu", cpp_wrapper) if (compile_scan or compile_full) else {}
    torch.manual_seed(seed)
    sizes = preset(size) if size else preset("tiny", deter=s.deter, hidden=s.hidden, units=s.hidden,
                                               layers=s.mlp_layers, stoch=s.stoch, classes=s.classes,
                                               blocks=s.blocks, bins=s.bins)
    agent = make_agent({"observation": (s.obs_dim,)}, s.action_dim, True, sizes)
    imagination = ImaginationModule(agent.world_model, agent.actor, s.horizon, start_fraction=start_fraction)
    if compile_scan:
        agent.world_model.rssm.enable_compile(**kw)
        imagination.enable_compile(**kw)
    if compile_full:  # whole imagination rollout as a single graph (as the recipe's model.compile_mode=full)
        imagination.enable_compile(mode="loop", **kw)
    critic = DreamerCriticLoss(agent.critic, replay_scale=replay_value)
    actor = DreamerPolicyLoss(agent.actor)
    for loss in (critic, actor):
        loss.make_value_estimator(gamma=0.997, lmbda=0.95)
        if compile_full:  # the critic and actor losses' tensor cores, forward and backward
            loss.enable_compile(**kw)
    wm_loss = DreamerWorldModelLoss(agent.world_model)
    if compile_full:  # the whole world-model loss (encoder, posterior scan, heads, KL), forward and backward
        wm_loss.enable_compile(**kw)
    update = DreamerUpdate(agent, wm_loss, critic, actor,
                           imagination,
                           make_optimizer(agent, warmup_steps=0, compile=compile_full, compile_kwargs=kw))
    if compile_full:  # critic + return normalisation + actor + replay value as one graph (as the recipe)
        update.enable_compile(**kw)
    g = torch.Generator().manual_seed(seed)
    B, T = s.batch, s.seq_len
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_terminal = torch.zeros(B, T, dtype=torch.bool)
    is_terminal[0, T // 2] = True
    is_first[0, T // 2 + 1] = True
    batch = TensorDict({
        "observation": torch.randn(B, T, s.obs_dim, generator=g),
        "action": F.one_hot(torch.randint(0, s.action_dim, (B, T), generator=g), s.action_dim).float(),
        "reward": torch.rand(B, T, generator=g), "is_first": is_first, "is_terminal": is_terminal,
    }, [B, T])

    def fn() -> dict[str, float]:
        m = update(batch)
        return {"world_model": float(m["time/update_world_model_s"]),
                "imagination": float(m["time/update_imagination_s"]),
                "actor_critic": float(m["time/update_actor_critic_s"])}

    counts = agent.parameter_counts()
    counts["total"] = sum(counts.values())
    return fn, counts


def timed(fn, n: int) -> tuple[float, dict[str, float], float]:
    """(updates/s, mean phase seconds, minor page faults per update) over ``n`` updates."""
    phases: dict[str, float] = {}
    faults = minor_page_faults()
    t = time.perf_counter()
    for _ in range(n):
        for k, v in fn().items():
            phases[k] = phases.get(k, 0.0) + v / n
    rate = n / (time.perf_counter() - t)
    return rate, phases, (minor_page_faults() - faults) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=15)
    parser.add_argument("--obs-dim", type=int, default=4, help="observation floats (CartPole 4, LunarLander 8)")
    parser.add_argument("--action-dim", type=int, default=2, help="discrete actions (CartPole 2, LunarLander 4)")
    parser.add_argument("--size", default=None, help="ours-only: a named preset instead of the 137k sizes")
    parser.add_argument("--start-fraction", type=float, default=1.0,
                        help="ours-only: imagine from this share of the posterior states (recipe: ac.start_fraction; "
                             "the LunarLander YAML 0.25)")
    parser.add_argument("--replay-value", type=float, default=0.3,
                        help="weight of our replay-value critic loss (TorchRL's default 0.3; recipe: "
                             "ac.replay_value_scale, default 0)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed rounds, run N more of our updates under torch.profiler and print "
                             "the ops by self CPU time and the share spent in matrix multiplies")
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our RSSM scan and imagination steps")
    parser.add_argument("--compile-full", action="store_true",
                        help="torch.compile our whole RSSM scan, whole imagination loop (noise drawn up front) and "
                             "the world-model/critic/actor losses and the optimizer step (recipe: model.compile=true model.compile_mode=full)")
    parser.add_argument("--no-cpp-wrapper", action="store_true",
                        help="compiled: inductor's Python host code instead of its C++ one (recipe: model.compile_cpp_wrapper=false)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocator settings instead of torchrl_dreamer.cpu.tune_malloc() "
                             "(which the recipes apply at start-up; process-wide, so it applies to both sides)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file (default: results/dreamer_throughput.json, with --ours-only "
                             "results/dreamer_throughput_ours.json)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / (
            "dreamer_throughput_ours.json" if args.ours_only else "dreamer_throughput.json")
    if not args.ours_only and args.start_fraction != 1.0:
        parser.error("--start-fraction is ours-only (TorchRL's update imagines from every state)")
    stamp = provenance()  # before the runs: the code they ran
    torch.set_num_threads(args.threads)
    # the recipes' allocator settings, for both updates alike (same process). glibc's defaults
    # return freed blocks to the OS, and the next update pays for them again in page faults: how
    # many depends on what else the process allocated, so without this the two sides pay unequally
    # (measured: TorchRL's update 3-8k minor faults per update, ours 0-150 once TorchRL's has grown
    # the heap; ours alone ~2k)
    malloc_tuned = False if args.default_malloc else tune_malloc()
    sizes = RefSizes(batch=args.batch, seq_len=args.seq_len, horizon=args.horizon, obs_dim=args.obs_dim,
                     action_dim=args.action_dim)
    ours, our_counts = build_ours(sizes, size=args.size, compile_scan=args.compile, compile_full=args.compile_full,
                                  cpp_wrapper=not args.no_cpp_wrapper, start_fraction=args.start_fraction,
                                  replay_value=args.replay_value)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {args.batch}x{args.seq_len}, "
          f"horizon {args.horizon}; allocator: {'tune_malloc' if malloc_tuned else 'glibc defaults'}")
    print("ours     parameters: " + ", ".join(f"{k} {v:,}" for k, v in our_counts.items()))
    theirs = None
    if not args.ours_only:
        theirs, _ = build_torchrl_update(sizes, mode="stepper")
        print("TorchRL  parameters: " + ", ".join(f"{k} {v:,}" for k, v in theirs.param_counts.items()))
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        ours()
    warmup_s = time.perf_counter() - t_warm
    print(f"ours: {args.warmup} warm-up updates took {warmup_s:.1f} s (includes any torch.compile time)")
    for _ in range(args.warmup):
        if theirs is not None:
            theirs()
    rounds = []
    for r in range(args.rounds):
        ours_rate, ours_phases, ours_faults = timed(ours, args.per_round)
        row = {"ours": ours_rate, "ours_phases": ours_phases, "ours_faults_per_update": ours_faults}
        if theirs is not None:
            row["torchrl"], row["torchrl_phases"], row["torchrl_faults_per_update"] = timed(theirs, args.per_round)
            row["ratio"] = ours_rate / row["torchrl"]
        rounds.append(row)
        print(f"round {r + 1}: ours {ours_rate:6.2f} updates/s" + (
            f" | TorchRL {row['torchrl']:5.2f} updates/s | ratio {row['ratio']:.2f}x" if theirs else ""), flush=True)
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    phases = {k: statistics.median(r["ours_phases"][k] for r in rounds) for k in rounds[0]["ours_phases"]}
    total = sum(phases.values())
    result = {"threads": args.threads, "malloc_tuned": malloc_tuned, "compile": "full" if args.compile_full else ("step" if args.compile else "none"),
              "cpp_wrapper": (args.compile or args.compile_full) and not args.no_cpp_wrapper,
              "ours_warmup_s": warmup_s, "batch": args.batch, "seq_len": args.seq_len, "horizon": args.horizon,
              "obs_dim": args.obs_dim, "action_dim": args.action_dim, "size": args.size or "reference 137k",
              "start_fraction": args.start_fraction, "replay_value": args.replay_value, "ours_only": args.ours_only,
              "ours_params": our_counts, "ours_updates_per_s": med("ours"), "ours_phase_s": phases,
              "rounds": rounds}
    print(f"\nours: {med('ours'):.2f} updates/s (median of {args.rounds} rounds x {args.per_round}); breakdown "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in phases.items())
          + f"; minor page faults per update {med('ours_faults_per_update'):.0f}")
    if theirs is not None:
        result.update({"torchrl_params": theirs.param_counts, "torchrl_updates_per_s": med("torchrl"),
                       "ratio_median": med("ratio"), "ratio_min": min(r["ratio"] for r in rounds),
                       "ratio_max": max(r["ratio"] for r in rounds)})
        print(f"TorchRL built-in: {med('torchrl'):.2f} updates/s; minor page faults per update "
              f"{med('torchrl_faults_per_update'):.0f}")
        print(f"ratio ours / TorchRL: {med('ratio'):.2f}x (median of per-round ratios; "
              f"min {result['ratio_min']:.2f}, max {result['ratio_max']:.2f})")
    if args.profile:
        result["profile_updates"] = args.profile
        result["matmul_share"] = profile_ours(ours, args.profile)
    write_json(args.out, {**result, **stamp})


def profile_ours(fn, n: int) -> float:
    """Prints the top ops of ``n`` updates by self CPU time and returns the share in matrix multiplies."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(n):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"matrix multiplies (aten::mm, addmm, bmm): {matmul / total:.0%} of the self CPU time of {n} updates")
    return matmul / total


if __name__ == "__main__":
    main()
