"""MLflow metric names from history rows, and the regular-vs-EMA mAP curve plot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path


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


def plot_map_curves(history: list[dict], path: str | Path) -> Path:
    """PNG of regular vs EMA mAP (and every ``map_ema@<decay>``) per epoch. Headless (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = ["map", "map_ema"] + sorted({k for row in history for k in row if k.startswith("map_ema@")})
    labels = {"map": "regular", "map_ema": "EMA"}
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        pts = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(history)
               if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if pts:
            xs, ys = zip(*pts)
            label = labels.get(key) or f"EMA decay {key.split('@', 1)[1]}"
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP@[.50:.95]")
    ax.set_title("validation mAP: regular vs EMA weights")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
