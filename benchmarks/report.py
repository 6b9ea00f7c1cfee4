"""Writes ``benchmarks/RESULTS.md``: the benchmark results that carry a provenance stamp, one table per kind.

    python benchmarks/report.py            # (re)write benchmarks/RESULTS.md
    python benchmarks/report.py --check    # exit 1 if benchmarks/RESULTS.md is missing or out of date

A result carries the stamp of ``benchmarks/provenance.py`` when it has a ``git_commit`` key, at its top
level (``{**provenance(), ...}``) or in a nested object (``"provenance": {...}``, ``"machine": {...}``).
Results without one are counted at the end of the page, not listed. The kind of a result is its
``"benchmark"`` field, else the benchmark script its file name starts with (``crash_resume_corrupt4.json``:
``crash_resume``), else its file name. Each row ends with the short commit (``+dirty`` when the tree had
uncommitted changes), the date of the stamp (UTC), the torch threads of the measured runs and links to the
JSON and to the PNG of the same name when there is one.

The output depends only on the JSON files (sorted, no generation time), so ``--check`` can compare it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
OUT = HERE / "RESULTS.md"

#: keys of the stamp itself (not figures of the benchmark)
STAMP_KEYS = {"git_commit", "git_dirty", "git_dirty_note", "torch", "torchrl", "tensordict", "python", "cpu", "cpu_count", "argv", "date"}

Record = dict[str, Any]
Row = dict[str, Any]


# --- reading ---------------------------------------------------------------------------------------------------

def find_stamp(record: Any) -> dict | None:
    """The object holding ``git_commit``: the record itself, else the first nested one (breadth first)."""
    queue = [record]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("git_commit"), str):
                return node
            queue.extend(node.values())
        elif isinstance(node, list):
            queue.extend(node)
    return None


def load_results(results_dir: Path) -> tuple[list[tuple[Path, Record, dict]], list[Path], list[Path]]:
    """``(stamped, unstamped, unreadable)``: stamped as ``(path, record, stamp)``, all sorted by file name."""
    stamped, unstamped, unreadable = [], [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            unreadable.append(path)  # e.g. a benchmark writing it right now
            continue
        stamp = find_stamp(record)
        if stamp is None:
            unstamped.append(path)
        else:
            stamped.append((path, record, stamp))
    return stamped, unstamped, unreadable


def known_prefixes(results_dir: Path) -> set[str]:
    """Kinds a file name can start with: those with their own table and the benchmark scripts next to results/."""
    scripts = {p.stem for p in Path(results_dir).parent.glob("*.py")} - {"report", "provenance"}
    return set(KINDS) | scripts


def kind_of(path: Path, record: Record, prefixes: Iterable[str]) -> str:
    if isinstance(record, dict) and isinstance(record.get("benchmark"), str) and record["benchmark"]:
        return record["benchmark"]
    stem = path.stem
    matches = [p for p in prefixes if stem == p or stem.startswith(p + "_")]
    return max(matches, key=len) if matches else stem


# --- formatting ------------------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = " ".join(text.split())
    if len(text) > 60:
        text = text[:59] + "…"
    return text.replace("|", "\\|")


def short_commit(stamp: dict) -> str:
    commit = stamp.get("git_commit") or "unknown"
    return commit[:8] + ("+dirty" if stamp.get("git_dirty") else "")


def stamp_date(stamp: dict) -> str:
    date = str(stamp.get("date") or "—")
    return date[:16].replace("T", " ")  # minutes are enough to tell runs apart; the JSON has the rest


def stamp_threads(stamp: dict, record: Record) -> Any:
    """Threads of the measured runs; else the benchmark's own ``threads``; else the harness's."""
    for value in (stamp.get("torch_threads_runs"), record.get("threads") if isinstance(record, dict) else None,
                  stamp.get("torch_threads_harness")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def link(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target, out_dir)).as_posix()


# --- per-kind columns --------------------------------------------------------------------------------------------

def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def rows_dreamer_vs_ppo(record: Record) -> list[Row]:
    return [{"env": r.get("env"), "algorithm": r.get("algo"), "best eval": r.get("best_eval"),
             "final eval": r.get("final_eval"), "env steps": r.get("env_steps"), "seconds": r.get("wall_clock_s"),
             "budget s": record.get("budget_s")} for r in record.get("results", [])]


def rows_ppo_single_agent(record: Record) -> list[Row]:
    return [{"env": r.get("env"), "best eval": r.get("best_eval"), "final eval": r.get("final_eval"),
             "env steps": r.get("env_steps"), "seconds": r.get("wall_clock_s"), "solved at": r.get("solved_at"),
             "reached after s": r.get("reached_s"), "budget s": record.get("budget_s")}
            for r in record.get("results", [])]


def rows_crash_resume(record: Record) -> list[Row]:
    summary, final = record.get("summary", {}), record.get("final", {})
    return [{"cycles": summary.get("cycles"), "kills random / write": f"{summary.get('kills_random')} / "
             f"{summary.get('kills_write')}", "corrupted": summary.get("corrupted"),
             "fallbacks": summary.get("fallbacks"), "stray files removed": summary.get("stray_files_removed"),
             "failed checks": len(record.get("failures", [])), "final run ok": final.get("metrics_ok"),
             "all ok": record.get("ok"), "seconds": record.get("wall_s")}]


def rows_checkpoint_size(record: Record) -> list[Row]:
    return [{"env": r.get("env"), "env steps": r.get("env_steps"), "replay rows": r.get("replay_rows"),
             "checkpoint bytes": r.get("checkpoint_bytes"), "old format bytes": r.get("old_format_bytes"),
             "old / new": r.get("old_over_new")} for r in record.get("results", [])]


def rows_replay_sampling(record: Record) -> list[Row]:
    """``replay_sampling.py``: one row per sampler and buffer size."""
    return [{"sampler": r.get("sampler"), "rows stored": r.get("rows"), "ms per collector batch": ms(r.get("cycle_s")),
             "ms per sample": ms(r.get("per_sample_s")), "TorchRL / ours": r.get("torchrl_over_ours"),
             "windows": f"{record.get('batch')} x {record.get('seq_len')}"} for r in record.get("results", [])]


def ms(seconds: Any) -> Any:
    return seconds * 1e3 if isinstance(seconds, (int, float)) else seconds


def rows_dreamer_throughput(record: Record) -> list[Row]:
    ours, theirs = record.get("ours_updates_per_s"), record.get("torchrl_updates_per_s")
    ratio = record.get("ratio_median")
    if ratio is None and isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
        ratio = ours / theirs
    lo, hi = record.get("ratio_min"), record.get("ratio_max")
    batch, seq = record.get("batch"), record.get("seq_len")
    obs, act = record.get("obs_dim", 4), record.get("action_dim", 2)  # older files: CartPole's shapes
    shape = f"{batch}x{seq}, obs {obs} / {act} actions" if batch is not None and seq is not None else None
    return [{"size": record.get("size", "reference 137k"), "batch, shapes": shape,
             "compile": record.get("compile"), "malloc tuned": record.get("malloc_tuned"), "ratio": ratio,
             "ratio min – max": f"{fmt(lo)} – {fmt(hi)}" if lo is not None and hi is not None else None,
             "ours updates/s": ours, "TorchRL updates/s": theirs}]


def rows_dreamer_learning(record: Record) -> list[Row]:
    """``dreamer_cartpole.py`` (any env): one row per seed."""
    return [{"env": record.get("env"), "seed": s.get("seed"), "target": record.get("threshold"),
             "reached": s.get("reached"), "minutes": (s.get("wall_clock_s") or math.nan) / 60,
             "env steps": s.get("env_steps"), "best eval": s.get("best_eval"), "final eval": s.get("final_eval")}
            for s in record.get("seeds", [])]


def rows_mappo_navigation(record: Record) -> list[Row]:
    summary = record.get("summary", {})
    rows = [{"seed": seed, "reward sum at iter 10": v.get("reward_sum_at_iter10"),
             "mean iter 20-30": v.get("reward_sum_mean_iter20_30"), "final eval": v.get("final_eval_reward_sum"),
             "s/iter": v.get("median_s_per_iter"), "speed-up vs plain loop (1 thread)": None}
            for seed, v in sorted(summary.get("seeds", {}).items())]
    if rows:
        rows[0]["speed-up vs plain loop (1 thread)"] = summary.get("speedup_vs_plain_1t")
    return rows


def rows_routing_ppo(record: Record) -> list[Row]:
    return [{"env": record.get("env"), "minutes": record.get("budget_min"),
             "greedy gap % (final)": record.get("final_greedy_gap_pct"),
             "greedy gap % (best)": record.get("best_greedy_gap_pct"), "greedy x8 %": record.get("gap_pct_greedy_x8"),
             "multi-start %": record.get("gap_pct_multistart_x1"), "multi-start x8 %": record.get("gap_pct_multistart_x8"),
             "instances/s": record.get("instances_per_s_median")}]


def rows_vmas_scenarios(record: Record) -> list[Row]:
    runs = record.get("results") or record.get("scenarios") or []
    if isinstance(runs, dict):
        runs = [{"scenario": k, **v} for k, v in runs.items()]
    return [{k: v for k, v in r.items() if k != "run_dir" and (v is None or isinstance(v, (str, int, float, bool)))}
            for r in runs]


def rows_scaling(record: Record) -> list[Row]:
    """Throughput rows, then (when present) collect-only worker rates, learning runs and the estimate."""
    rows = [{"env": r.get("env"), "collector": r.get("setup"), "env frames/s": r.get("frames_per_s"),
             "updates/s": r.get("updates_per_s")} for r in record.get("throughput", [])]
    rows += [{"env": r.get("env"), "collector": f"process:{r.get('workers')}, collect only",
              "env frames/s": r.get("collect_only_frames_per_s")} for r in record.get("worker_rates", [])]
    rows += [{"env": "cartpole", "collector": c.get("setup"), "learning: seed": c.get("seed"),
              "final eval": c.get("final"), "best eval": c.get("best"), "first >= 475 (s)": c.get("first_475_s")}
             for c in record.get("learning", [])]
    for e in record.get("estimates", []):
        rows += [{"env": e.get("env"), "collector": f"estimate: {r.get('workers')} workers",
                  "env frames/s": r.get("frames_per_s"), "learner-bound": r.get("learner_bound"),
                  "USD per million frames": r.get("usd_per_million_frames")} for r in e.get("rows", [])]
    return rows


def rows_vmas_heuristics(record: Record) -> list[Row]:
    """``vmas_heuristics.py``: scripted reference policies through the MAPPO evaluation."""
    return [{"scenario": r.get("scenario"), "policy": r.get("policy"), "eval reward sum (mean)": r.get("mean"),
             "sd over repeats": r.get("std"), "repeats x envs": f"{r.get('repeats')} x {r.get('num_envs')}"}
            for r in record.get("results", [])]


def rows_dreamer_ablation(record: Record) -> list[Row]:
    """``dreamer_ablation.py``: one row per (variant, seed)."""
    return [{"env": record.get("env"), "variant": r.get("variant"), "seed": r.get("seed"),
             "budget (min)": record.get("budget_min"), "reached": r.get("reached"),
             "minutes to target": (r.get("reached_s") or math.nan) / 60, "best eval": r.get("best_eval"),
             "final eval": r.get("final_eval"), "re-scored final": r.get("confirm_final"),
             "re-scored best.pt": r.get("confirm_best"), "env steps": r.get("env_steps"),
             "updates": r.get("updates")}
            for r in record.get("runs", [])]


def rows_episode_ends(record: Record) -> list[Row]:
    """``dreamer_lunarlander_episode_ends.py``: one row per kind of episode end."""
    return [{"checkpoint env steps": record.get("env_steps"), "end": end, "episodes": r.get("episodes"),
             "mean return": r.get("return"), "continue prob. (final row)": r.get("continue_final"),
             "final reward received": r.get("final_reward"), "final reward predicted": r.get("predicted_final_reward"),
             "obs change (last step)": r.get("obs_change_last_step")}
            for end, r in sorted(record.get("summary", {}).items())]


def rows_value_check(record: Record) -> list[Row]:
    """``dreamer_value_check.py``: one row per (episode end, legs) group: what the critic and imagination
    believe against what the env delivered."""
    def pair(s: dict, a: str, b: str) -> str | None:
        x, y = s.get(a), s.get(b)
        return None if x is None or y is None else f"{fmt(x)} / {fmt(y)}"
    return [{"run": Path(str(record.get("run_dir", ""))).name, "checkpoint env steps": record.get("env_steps"),
             "actions": record.get("actions"), "end, legs": group, "rows": s.get("rows"),
             "critic value": s.get("value"), "return that followed": s.get("return"),
             "horizon reward: imagined / real": pair(s, "imagined_reward", "real_reward"),
             "value after the horizon: imagined / open loop / real":
                 None if s.get("open_loop_end_value") is None else
                 f"{pair(s, 'imagined_end_value', 'open_loop_end_value')} / {fmt(s.get('real_end_value'))}"}
            for group, s in sorted(record.get("summary", {}).items())]


def rows_eval_actions(record: Record) -> list[Row]:
    """``eval_actions.py``: one row per checkpoint, scored with mode and with sampled actions."""
    return [{"run": Path(str(r.get("run_dir", ""))).name, "seed": r.get("seed"), "weights": r.get("weights"),
             "env steps": r.get("env_steps"), "episodes": record.get("episodes"),
             "mode": (r.get("mode") or {}).get("episode_reward_sum"),
             "sample": (r.get("sample") or {}).get("episode_reward_sum")}
            for r in record.get("rows", [])]


def rows_generic(record: Record) -> list[Row]:
    """The record's top-level scalar fields (stamp fields left out)."""
    if not isinstance(record, dict):
        return [{}]
    return [{k: v for k, v in record.items() if k not in STAMP_KEYS and not k.startswith("torch_threads_")
             and (v is None or isinstance(v, (str, int, float, bool)))}]


#: kind -> rows of one record (columns in the order of the first row's keys)
KINDS: dict[str, Callable[[Record], list[Row]]] = {
    "checkpoint_size": rows_checkpoint_size,
    "crash_resume": rows_crash_resume,
    "dreamer_throughput": rows_dreamer_throughput,
    "replay_sampling": rows_replay_sampling,
    "dreamer_vs_ppo": rows_dreamer_vs_ppo,
    "ppo_single_agent": rows_ppo_single_agent,
    "dreamer_cartpole": rows_dreamer_learning,
    "mappo_navigation": rows_mappo_navigation,
    "routing_ppo": rows_routing_ppo,
    "vmas_scenarios": rows_vmas_scenarios,
    "vmas_heuristics": rows_vmas_heuristics,
    "dreamer_ablation": rows_dreamer_ablation,
    "dreamer_lunarlander_episode_ends": rows_episode_ends,
    "eval_actions": rows_eval_actions,
    "dreamer_value_check": rows_value_check,
    "scaling": rows_scaling,
}
PROVENANCE_COLUMNS = ["commit", "date (UTC)", "threads", "files"]


# --- the page ------------------------------------------------------------------------------------------------------

def table_rows(results_dir: Path, out_dir: Path | None = None) -> dict[str, list[Row]]:
    """Rows per kind (kinds and rows sorted), each with the provenance columns; links relative to ``out_dir``
    (default: the folder above ``results_dir``, where RESULTS.md lives)."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir.parent
    prefixes = known_prefixes(results_dir)
    stamped, _, _ = load_results(results_dir)
    by_kind: dict[str, list[Row]] = {}
    for path, record, stamp in stamped:
        kind = kind_of(path, record, prefixes)
        rows = KINDS.get(kind, rows_generic)(record) or [{}]
        files = f"[json]({link(path, out_dir)})"
        png = path.with_suffix(".png")
        if png.exists():
            files += f" [png]({link(png, out_dir)})"
        for row in rows:
            row.update({"commit": short_commit(stamp), "date (UTC)": stamp_date(stamp),
                        "threads": stamp_threads(stamp, record), "files": files, "_file": path.name})
            by_kind.setdefault(kind, []).append(row)
    return dict(sorted(by_kind.items()))


def markdown_table(rows: list[Row]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns and c not in PROVENANCE_COLUMNS and not c.startswith("_")]
    columns += PROVENANCE_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["files"] if c == "files" else fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results_dir: Path = RESULTS_DIR, out_dir: Path | None = None) -> str:
    """The text of RESULTS.md for the JSON files in ``results_dir``."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir.parent
    _, unstamped, unreadable = load_results(results_dir)
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON files in `benchmarks/results/`; do not edit "
             "(`python benchmarks/report.py --check` tells whether it is up to date).",
             "Only results that carry the provenance stamp of `benchmarks/provenance.py` (commit, library versions, "
             "CPU, threads, command line, date) appear here. Each row ends with the commit the numbers were "
             "measured on (`+dirty`: with uncommitted changes), the stamp's date, the torch threads of the measured "
             "runs and the result files.", ""]
    scripts = {p.stem for p in results_dir.parent.glob("*.py")}
    for kind, rows in table_rows(results_dir, out_dir).items():
        lines += [f"## {kind}", ""]
        if kind in scripts:
            lines += [f"Script: [`{kind}.py`]({link(results_dir.parent / (kind + '.py'), out_dir)}).", ""]
        lines += markdown_table(rows) + [""]
    n = len(unstamped)
    lines.append(f"{n} older result {'file carries' if n == 1 else 'files carry'} no provenance stamp and "
                 f"{'is' if n == 1 else 'are'} not listed.")
    if unreadable:
        lines.append(f"{len(unreadable)} result {'file' if len(unreadable) == 1 else 'files'} could not be read as "
                     f"JSON: {', '.join(p.name for p in unreadable)}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the output file is missing or differs from what would be written")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the result JSONs")
    parser.add_argument("--out", type=Path, default=OUT, help="the Markdown file")
    args = parser.parse_args(argv)
    text = render(args.results, args.out.resolve().parent)
    if args.check:
        current = args.out.read_text() if args.out.exists() else None
        if current != text:
            state = "missing" if current is None else "out of date"
            print(f"{args.out} is {state}: run `python benchmarks/report.py`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
