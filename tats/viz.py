"""Training plots and the confusion matrix, as PNG files (matplotlib's Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(history: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (total, episode and CLS losses) and accuracy.png (train and val) per epoch."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [
        ("loss.png", "loss", [("loss", "total"), ("episode_loss", "episode"), ("cls_loss", "CLS")]),
        (
            "accuracy.png",
            "few-shot accuracy (%)",
            [("train_accuracy", "train episodes"), ("val_accuracy", "val episodes")],
        ),
    ]
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in history if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (row = true class) with the class names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        for i, j in np.ndindex(rates.shape):
            if counts[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
