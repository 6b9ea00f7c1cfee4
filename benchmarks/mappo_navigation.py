"""MAPPO on VMAS navigation (3 agents, TorchRL-tutorial settings): learning and speed.

Runs our recipe (``recipes/mappo_vmas.py``, default navigation config) for ``--iters``
iterations and, interleaved with it in the same process, the plain tutorial-style reference
loop (``mappo_plain_reference.py``: ``Collector`` + ``ReplayBuffer`` + ``ClipPPOLoss`` + ``GAE``,
450 minibatch steps per iteration) with ``--ref-threads`` threads (and ``--ref-threads-also``).
One reference iteration runs right after each of our iterations listed in ``--ref-at``; the two
never run at the same time. Interleaving matters: this shared 2-core machine drifts by 30-50%
over minutes, so timings taken minutes apart are not comparable.

Speed-up = median over pairs of (reference iteration seconds / our adjacent iteration seconds).
``--ref-at`` avoids our evaluation iterations (every 5th) and iteration 1 (compile warm-up), so
both sides of a pair do the same work: collect 6000 frames, GAE, 30 epochs x 15 minibatches.

Prints per iteration the training episode reward SUM, collection frames/s and seconds per
iteration; then the reward targets (>= 2.7 at iteration 10, >= 2.9 mean over 20-30), the
ratios and where our time goes. Writes JSON and a PNG curve. With ``--seeds 0 1 2`` the reward
targets are reported per seed (the reference is interleaved with the first seed only).

    python benchmarks/mappo_navigation.py                        # ~6 min on the 2-core machine
    python benchmarks/mappo_navigation.py --seeds 0 1 2          # ~15 min
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from mappo_plain_reference import iter_plain_mappo  # noqa: E402

from recipes.mappo_vmas import CONFIG_DIR, MAPPOConfig, train  # noqa: E402
from torchrl_dreamer.config import load_config, to_object  # noqa: E402
from torchrl_dreamer.cpu import minor_page_faults, tune_malloc  # noqa: E402
from provenance import provenance, write_json  # noqa: E402 (benchmarks/ is on sys.path when run)


def _show_ref(name: str, r: dict) -> None:
    print(
        f"[{name}] iter {r['iteration']:3d}  reward_sum {r['episode_reward_sum']:7.3f}  "
        f"collect {r['frames_per_s']:7.0f} frames/s  {r['iter_s']:6.2f} s/iter "
        f"(collect {r['collect_s']:.2f}, train {r['train_s']:.2f})",
        flush=True,
    )


def run_ours(iters: int, threads: int, seed: int, overrides: list[str], refs: dict, ref_at: set[int]) -> list[dict]:
    """Trains our recipe; after each iteration in ``ref_at`` runs one iteration of each reference."""
    cfg_dict = load_config(
        MAPPOConfig,
        [CONFIG_DIR / "base.yaml", CONFIG_DIR / "navigation.yaml"],
        [f"collector.iterations={iters}", f"threads={threads}", f"seed={seed}", "run.progress=false", *overrides],
    )
    cfg = to_object(cfg_dict)
    print(f"\n== seed {seed}: ours (recipes/mappo_vmas.py) {iters} iterations, {threads} thread(s), "
          f"ppo.impl={cfg.ppo.impl}, compile={cfg.ppo.compile}"
          + (f"; references {', '.join(refs)} after iterations {sorted(ref_at)}" if refs else "") + " ==", flush=True)
    records: list[dict] = []
    mark = [minor_page_faults()]  # page faults since the end of the previous callback: our iteration only

    def show(m: dict) -> None:
        m = {**m, "ours_minor_faults": minor_page_faults() - mark[0]}
        records.append(m)
        ev = m.get("eval/episode_reward_sum")
        it = int(m["train/iteration"])
        print(
            f"[ours {threads}t] iter {it:3d}  reward_sum {m['train/episode_reward_sum']:7.3f}  "
            f"collect {m['time/collect_frames_per_s']:7.0f} frames/s  {m['time/iteration_s']:6.2f} s/iter "
            f"(collect {m['time/collect_s']:.2f}, gae {m['time/advantage_s']:.2f}, update {m['time/update_s']:.2f})"
            + (f"  eval {ev:.3f}" if ev is not None else ""),
            flush=True,
        )
        if it in ref_at:
            for name, ref in refs.items():
                faults = minor_page_faults()
                record = next(ref["iterator"], None)
                if record is None:
                    continue
                record["minor_faults"] = minor_page_faults() - faults
                record["paired_with_ours_iteration"] = it
                record["ours_iter_s"] = m["time/iteration_s"]
                ref["records"].append(record)
                _show_ref(name, record)
                print(f"  minor page faults: ours {m['ours_minor_faults']}, {name} {record['minor_faults']}", flush=True)
        mark[0] = minor_page_faults()

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp), on_iteration=show)
    return records


def plot(path: Path, runs: dict, refs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, run in runs.items():
        ours = run["records"]
        it = [m["train/iteration"] for m in ours]
        line = ax1.plot(it, [m["train/episode_reward_sum"] for m in ours], label=f"ours seed {seed} (train)")[0]
        ev = [(m["train/iteration"], m["eval/episode_reward_sum"]) for m in ours if "eval/episode_reward_sum" in m]
        if ev:
            ax1.plot(*zip(*ev), "o--", color=line.get_color(), label=f"ours seed {seed} (eval)")
    ax1.axhline(2.7, color="grey", ls=":", lw=1)
    ax1.set_xlabel("iteration (6000 frames)")
    ax1.set_ylabel("episode reward sum")
    ax1.set_title("VMAS navigation, 3 agents")
    ax1.legend()
    first = next(iter(runs.values()))["records"]
    ax2.plot([m["train/iteration"] for m in first], [m["time/iteration_s"] for m in first], label="ours")
    for name, recs in refs.items():
        ax2.plot([r["paired_with_ours_iteration"] for r in recs], [r["iter_s"] for r in recs], "x-",
                 label=f"{name} (run after that iteration)")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("seconds per iteration")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30, help="iterations of our recipe")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for our recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for our recipe")
    parser.add_argument("--ref-at", type=int, nargs="*", default=[2, 4, 8, 12, 17, 23, 28],
                        help="our iterations after which one reference iteration runs (empty = no reference)")
    parser.add_argument("--ref-threads", type=int, default=1, help="threads for the reference (the published anchor: 1)")
    parser.add_argument("--ref-threads-also", type=int, default=2,
                        help="also time the reference with this many threads (0 = skip)")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="apply torchrl_dreamer.cpu.tune_malloc() first (process-wide: both sides); the MAPPO "
                             "recipe itself does not, so the default keeps glibc's allocator settings")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mappo_navigation")
    parser.add_argument("overrides", nargs="*", help="config overrides for our recipe (key=value)")
    args = parser.parse_args()
    stamp = provenance()  # before the runs: the code they ran
    args.out.parent.mkdir(parents=True, exist_ok=True)
    malloc_tuned = tune_malloc() if args.tune_malloc else False
    print(f"allocator: {'tune_malloc' if malloc_tuned else 'glibc defaults'}")

    ref_threads = [args.ref_threads] + (
        [args.ref_threads_also] if args.ref_threads_also and args.ref_threads_also != args.ref_threads else []
    )
    refs = {}
    if args.ref_at:
        for t in ref_threads:
            refs[f"plain {t}t"] = {
                "iterator": iter_plain_mappo(n_iters=len(args.ref_at), seed=args.seeds[0], threads=t),
                "records": [],
            }
    runs = {}
    for i, seed in enumerate(args.seeds):
        t0 = time.perf_counter()
        ours = run_ours(args.iters, args.threads, seed, args.overrides, refs if i == 0 else {}, set(args.ref_at))
        runs[seed] = {"records": ours, "wall_s": time.perf_counter() - t0}

    print("\n== summary ==")
    summary: dict = {"threads": args.threads, "iterations": args.iters, "malloc_tuned": malloc_tuned, "seeds": {}}
    for seed, run in runs.items():
        rewards = [m["train/episode_reward_sum"] for m in run["records"]]
        at10 = rewards[9] if len(rewards) >= 10 else float("nan")
        late = rewards[19:30]
        late_mean = sum(late) / len(late) if late else float("nan")
        evals = [m["eval/episode_reward_sum"] for m in run["records"] if "eval/episode_reward_sum" in m]
        steady = [m for m in run["records"][1:] if int(m["train/iteration"]) % 5]
        per_iter = statistics.median(m["time/iteration_s"] for m in steady) if steady else float("nan")
        summary["seeds"][seed] = {
            "reward_sum_at_iter10": at10,
            "reward_sum_mean_iter20_30": late_mean,
            "final_eval_reward_sum": evals[-1] if evals else None,
            "median_s_per_iter": per_iter,
            "median_update_s": statistics.median(m["time/update_s"] for m in steady) if steady else None,
            "median_collect_s": statistics.median(m["time/collect_s"] for m in steady) if steady else None,
            "first_iter_s": run["records"][0]["time/iteration_s"],
            "wall_s": run["wall_s"],
        }
        print(f"seed {seed}: reward sum at iteration 10 = {at10:.3f} (target >= 2.7: {'OK' if at10 >= 2.7 else 'MISSED'}); "
              f"mean over iterations 20-{19 + len(late)} = {late_mean:.3f} (target >= 2.9: "
              f"{'OK' if late_mean >= 2.9 else 'MISSED'}); last eval {evals[-1] if evals else float('nan'):.3f}; "
              f"median {per_iter:.2f} s/iter (update {summary['seeds'][seed]['median_update_s']:.2f} s, "
              f"collect {summary['seeds'][seed]['median_collect_s']:.2f} s; iteration 1 "
              f"{summary['seeds'][seed]['first_iter_s']:.1f} s incl. compile warm-up); wall {run['wall_s']:.0f} s")
    if len(runs) > 1:
        for key in ("reward_sum_at_iter10", "reward_sum_mean_iter20_30"):
            values = [v[key] for v in summary["seeds"].values()]
            summary[f"mean_{key}"] = sum(values) / len(values)
            print(f"mean over seeds of {key}: {summary[f'mean_{key}']:.3f}")
    for name, ref in refs.items():
        recs = ref["records"]
        if not recs:
            continue
        ratios = [r["iter_s"] / r["ours_iter_s"] for r in recs]
        key = name.replace(" ", "_")
        summary[f"{key}_median_s_per_iter"] = statistics.median(r["iter_s"] for r in recs)
        summary[f"speedup_vs_{key}"] = statistics.median(ratios)
        summary[f"{key}_median_minor_faults"] = statistics.median(r["minor_faults"] for r in recs)
        ours_faults = [next(m["ours_minor_faults"] for m in runs[args.seeds[0]]["records"]
                            if int(m["train/iteration"]) == r["paired_with_ours_iteration"]) for r in recs]
        summary[f"ours_paired_with_{key}_median_minor_faults"] = statistics.median(ours_faults)
        print(f"{name}: median {summary[f'{key}_median_s_per_iter']:.2f} s/iter; speed-up of ours, median of "
              f"{len(ratios)} adjacent pairs: {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
              f"minor page faults per iteration, median: {name} {summary[f'{key}_median_minor_faults']:.0f}, "
              f"ours (paired iterations) {summary[f'ours_paired_with_{key}_median_minor_faults']:.0f}")
    result = {
        "summary": summary,
        "ours": {seed: run["records"] for seed, run in runs.items()},
        "reference": {name: ref["records"] for name, ref in refs.items()},
        "argv": sys.argv[1:],
    }
    write_json(args.out.with_suffix(".json"), {**result, **stamp}, announce=False)
    plot(args.out.with_suffix(".png"), runs, {n: r["records"] for n, r in refs.items()})
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
