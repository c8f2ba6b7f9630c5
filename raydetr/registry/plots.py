"""MLflow metric names from history rows, and the regular-vs-EMA mAP curve plot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def metric_key(name: str) -> str:
    """MLflow-safe metric name: ``map_ema@0.999`` -> ``map_ema_at_0.999``."""
    return re.sub(r"[^\w./\- ]", "_", name.replace("@", "_at_"))


def history_metrics(history: list[dict]) -> list[tuple[str, float, int]]:
    """(key, value, step=epoch number, from 1) for every numeric, finite value of every row."""
    out = []
    for i, row in enumerate(history):
        step = int(row.get("epoch", i + 1))
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                out.append((metric_key(key), float(value), step))
    return out


def deciding_key(history: list[dict]) -> str:
    """The mAP a history's run was decided by: ``map_segm`` (mask mAP) when it has one."""
    return "map_segm" if any("map_segm" in row for row in history) else "map"


def map_series(history: list[dict]) -> list[tuple[str, list[float], list[float]]]:
    """(label, epochs, mAPs) of every curve to draw, each series once: the regular weights, then
    one curve per EMA shadow (``map_ema@<decay>``; ``map_ema`` is the best of them each epoch,
    so it is drawn only when a history has no per-shadow keys). A segmentation run's curves are
    its mask mAP (``map_segm``, ``map_segm_ema@<decay>``): what decided it."""
    metric = deciding_key(history)
    prefix = f"{metric}_ema@"
    shadows = sorted({k for row in history for k in row if k.startswith(prefix)},
                     key=lambda k: float(k.split("@", 1)[1]))
    keys = [(metric, "regular")]
    if shadows:
        keys += [(k, f"EMA decay {k.split('@', 1)[1]}") for k in shadows]
    else:
        keys.append((f"{metric}_ema", "EMA"))
    out = []
    for key, label in keys:
        pts = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(history)
               if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if pts:
            xs, ys = zip(*pts)
            out.append((label, list(xs), list(ys)))
    return out


def map_curves_figure(history: list[dict]) -> Figure:
    """Regular vs EMA mAP per epoch (:func:`map_series`) on a headless (Agg) figure."""
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys in map_series(history):
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    masks = deciding_key(history) == "map_segm"
    ax.set_ylabel("mask mAP@[.50:.95]" if masks else "mAP@[.50:.95]")
    ax.set_title(f"validation {'mask ' if masks else ''}mAP: regular vs EMA weights")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def plot_map_curves(history: list[dict], path: str | Path) -> Path:
    """PNG of :func:`map_curves_figure`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    map_curves_figure(history).savefig(path, format="png")
    return path
