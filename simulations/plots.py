"""Sweep plots (matplotlib, PNG): accuracy against each swept knob, and heatmaps for two knobs.

Each figure's title names the sweep and the settings it held fixed; the legend sits beside the axes,
not on the data; normalized accuracy has a dotted line at 1.0 (the clients' own models). The dashed
pre-trained base is the mean over the sweep's seeds: every seed pre-trains its own base, so it differs
from the base of a single run with one seed."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmerge.io import atomic_path

METRICS = (("accuracy", "global test accuracy"), ("normalized_accuracy", "normalized accuracy"))


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _axis(values: Sequence[Any]) -> tuple[list[Any], bool]:
    """Sorted distinct values, and whether a log axis suits them (positive, spanning ≥ 20×)."""
    distinct = sorted(set(values)) if _numeric(values) else list(dict.fromkeys(map(str, values)))
    log = _numeric(distinct) and min(distinct) > 0 and max(distinct) / min(distinct) >= 20  # type: ignore[operator]
    return distinct, log


BASE_NOTE = "pre-trained base: mean over seeds (each seed pre-trains its own base)"


def plot_knob(rows: Sequence[dict[str, Any]], knob: str, path: Path, title: str = "") -> Path:
    """Mean over seeds (and other knobs) per strategy, with the min–max band, for both metrics;
    ``title`` names the sweep and its fixed settings."""
    plt = pyplot()
    xs, log = _axis([r[knob] for r in rows])
    position = {x: (x if _numeric(xs) else i) for i, x in enumerate(xs)}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS) + 2, 4.6), squeeze=False,
                             layout="constrained")
    for ax, (metric, label) in zip(axes[0], METRICS):
        by_strategy: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
        base: dict[Any, list[float]] = defaultdict(list)
        for r in rows:
            x = r[knob] if _numeric(xs) else str(r[knob])
            if r[metric] is not None and not (isinstance(r[metric], float) and math.isnan(r[metric])):
                by_strategy[r["strategy"]][x].append(r[metric])
            if metric == "accuracy":
                base[x].append(r["base_accuracy"])
        colors = plt.get_cmap("tab20").colors  # ten colours are too few for the whole zoo
        for i, (strategy, points) in enumerate(by_strategy.items()):
            keys = [x for x in xs if x in points]
            px = [position[x] for x in keys]
            mean = [sum(points[x]) / len(points[x]) for x in keys]
            color = colors[(2 * i) % 20 + (2 * i) // 20]
            ax.plot(px, mean, marker="osD^v<>"[i % 7], color=color, label=strategy)
            ax.fill_between(px, [min(points[x]) for x in keys], [max(points[x]) for x in keys], alpha=0.12,
                            color=color)
        if base:
            keys = [x for x in xs if x in base]
            ax.plot([position[x] for x in keys], [sum(base[x]) / len(base[x]) for x in keys], "k--",
                    label="pre-trained base")
        if metric == "normalized_accuracy":  # the clients' own models
            ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1)
        if log:
            ax.set_xscale("log")
        if not _numeric(xs):
            ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(knob)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    heading = f"{knob}: mean over seeds, band = min–max; {BASE_NOTE}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_heatmap(rows: Sequence[dict[str, Any]], knobs: Sequence[str], path: Path, title: str = "") -> Path:
    """Mean test accuracy over seeds for every pair of values of two knobs, one panel per strategy."""
    plt = pyplot()
    kx, ky = knobs
    xs, _ = _axis([r[kx] for r in rows])
    ys, _ = _axis([r[ky] for r in rows])
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    cols = min(4, len(strategies))
    nrows = math.ceil(len(strategies) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    key = lambda v, axis: v if _numeric(axis) else str(v)
    for ax, strategy in zip(axes.flat, strategies):
        cells: dict[tuple[Any, Any], list[float]] = defaultdict(list)
        for r in rows:
            if r["strategy"] == strategy:
                cells[(key(r[kx], xs), key(r[ky], ys))].append(r["accuracy"])
        grid = [[(sum(v) / len(v)) if (v := cells.get((x, y))) else float("nan") for x in xs] for y in ys]
        image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(xs)), [f"{x:g}" if _numeric(xs) else x for x in xs], fontsize=7)
        ax.set_yticks(range(len(ys)), [f"{y:g}" if _numeric(ys) else y for y in ys], fontsize=7)
        ax.set_title(strategy, fontsize=9)
        ax.set_xlabel(kx, fontsize=8)
        ax.set_ylabel(ky, fontsize=8)
    for ax in list(axes.flat)[len(strategies):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="global test accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_sweep(rows: Sequence[dict[str, Any]], knobs: Sequence[str], out: Path, title: str = "") -> list[Path]:
    """Every figure of a sweep; ``title`` names the sweep and its fixed settings."""
    paths = [plot_knob(rows, knob, out / f"accuracy-vs-{knob}.png", title) for knob in knobs]
    if len(knobs) == 2:
        paths.append(plot_heatmap(rows, knobs, out / f"heatmap-{knobs[0]}-{knobs[1]}.png", title))
    return paths
