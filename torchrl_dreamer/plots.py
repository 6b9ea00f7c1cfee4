"""PNG learning curves from a run's ``metrics.jsonl``: users look before they read."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "learning_curves_figure", "plot_learning_curves", "plot_tours"]

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


def learning_curves_figure(
    run_dir: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
    x_label: str = "env frames",
):
    """The matplotlib figure of :func:`plot_learning_curves` (not saved, not closed): one panel per
    group of metrics against the logged ``step``, whose meaning ``x_label`` names."""
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
        ax.set_xlabel(x_label)
        if ax.get_legend_handles_labels()[0]:  # a panel whose metrics are all non-finite has no lines
            ax.legend(fontsize=7)
    fig.suptitle(str(Path(run_dir)), fontsize=8)
    fig.tight_layout()
    return fig


def plot_learning_curves(
    run_dir: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
    filename: str = "curves.png",
    x_label: str = "env frames",
) -> Path:
    """Writes ``run_dir/curves.png``: one panel per group of metrics, against the logged ``step``.

    ``x_label`` says what that step counts (each recipe logs its own unit: env frames, env steps,
    training instances, episodes); it labels every panel's x-axis."""
    import matplotlib.pyplot as plt

    fig = learning_curves_figure(run_dir, panels, x_label)
    path = Path(run_dir) / filename
    try:
        fig.savefig(path, dpi=100)
    finally:  # a failed save (read-only run directory) must not leak the figure
        plt.close(fig)
    return path


def _routes(tour: Sequence[int]) -> list[list[int]]:
    """CVRP node sequence -> routes (customer lists between depot visits)."""
    routes, route = [], []
    for node in tour:
        if node == 0:
            if route:
                routes.append(route)
            route = []
        else:
            route.append(int(node))
    if route:
        routes.append(route)
    return routes


def plot_tours(
    path: str | os.PathLike,
    locs,
    tours: Sequence[Sequence[int]],
    costs: Sequence[float],
    *,
    problem: str = "tsp",
    ref_tours: Sequence[Sequence[int]] | None = None,
    ref_costs: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Side-by-side pictures of routing solutions: row 1 ours, row 2 the reference (if given).

    ``locs [k, N, 2]`` node coordinates (CVRP: node 0 is the depot, drawn as a red square);
    each tour is a node sequence (TSP: a permutation, closed back to its start; CVRP: routes
    separated by visits to node 0, one colour per route). Costs go in the panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    locs = np.asarray(locs)
    k = len(tours)
    rows = 2 if ref_tours is not None else 1
    fig, axes = plt.subplots(rows, k, figsize=(3.2 * k, 3.2 * rows), squeeze=False)

    def draw(ax, pts, tour, cost, label):
        tour = [int(t) for t in tour]
        ax.scatter(pts[:, 0], pts[:, 1], s=10, c="k", zorder=3)
        if problem == "cvrp":
            for i, route in enumerate(_routes(tour)):
                seq = [0, *route, 0]
                ax.plot(pts[seq, 0], pts[seq, 1], "-", lw=1.2, color=plt.cm.tab10(i % 10))
            ax.scatter(pts[0, 0], pts[0, 1], s=60, marker="s", c="red", zorder=4)
        else:
            seq = tour + tour[:1]
            ax.plot(pts[seq, 0], pts[seq, 1], "-", lw=1.2, color="tab:blue")
        ax.set_title(f"{label}: {cost:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")

    for j in range(k):
        draw(axes[0, j], locs[j], tours[j], costs[j], "ours")
        if ref_tours is not None:
            draw(axes[1, j], locs[j], ref_tours[j], ref_costs[j], "reference")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
