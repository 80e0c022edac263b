"""Training curves: one PNG with the losses on the left and every other metric on the right."""

from __future__ import annotations

import math
from pathlib import Path


def plot_curves(history: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    """Plot ``history`` (one dict per epoch, e.g. ``{"epoch": 3, "train_loss": 0.4, "val_dice": 0.8}``).

    Keys containing ``loss`` go on the left axes, other numeric keys on the right; ``epoch`` (or the
    row number) is the x axis. The training engine refreshes the file each epoch with
    ``overwrite=True``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsight.io import atomic_path

    keys: list[str] = []
    for row in history:
        for key, value in row.items():
            if (
                key != "epoch"
                and key not in keys
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                keys.append(key)
    epochs = [row.get("epoch", n) for n, row in enumerate(history)]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        for key in keys:
            ax = loss_ax if "loss" in key else metric_ax
            points = [
                (e, float(row[key]))
                for e, row in zip(epochs, history, strict=True)
                if isinstance(row.get(key), int | float) and math.isfinite(float(row[key]))
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, ms=3, label=key)
        for ax, name in ((loss_ax, "loss"), (metric_ax, "metrics")):
            ax.set_xlabel("epoch")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path, overwrite) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
