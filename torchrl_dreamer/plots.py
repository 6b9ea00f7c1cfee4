"""PNG learning curves from a run's ``metrics.jsonl``: users look before they read."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "plot_learning_curves"]

DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("episode reward sum", ("train/episode_reward_sum", "eval/episode_reward_sum")),
    ("losses", ("loss/objective", "loss/critic", "loss/entropy")),
    ("diagnostics", ("diag/entropy", "diag/clip_fraction", "diag/kl_approx")),
    ("seconds per iteration", ("time/iteration_s", "time/update_s", "time/collect_s")),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (non-finite values come back as floats)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.append({k: (float(v) if isinstance(v, str) and k != "step" else v) for k, v in record.items()})
    return records


def plot_learning_curves(
    run_dir: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
    filename: str = "curves.png",
) -> Path:
    """Writes ``run_dir/curves.png``: one panel per group of metrics, against env frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                style = "o--" if key.startswith("eval/") else "-"
                ax.plot(*zip(*points), style, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("env frames")
        ax.legend(fontsize=7)
    fig.suptitle(str(Path(run_dir)), fontsize=8)
    fig.tight_layout()
    path = Path(run_dir) / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
