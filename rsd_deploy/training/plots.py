"""``curves.png``: loss terms and accuracies per epoch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss terms (left) and training / validation accuracy (right) against the epoch.

    Writes ``path`` itself: the loop passes a temporary file of its one-step epoch write.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    loss_keys = ["loss"] + sorted({k for h in history for k in h.get("terms", {})})
    for key in loss_keys:
        values = [h["loss"] if key == "loss" else h.get("terms", {}).get(key) for h in history]
        ax_loss.plot(epochs, values, marker="o", label=key, linewidth=2 if key == "loss" else 1)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_loss.legend(fontsize=8)
    for key, label in (("train_acc", "train (full network)"), ("train_acc_student", "train (student)"),
                       ("val_top1", "validation top-1"), ("val_top5", "validation top-5")):
        if all(key in h for h in history):
            ax_acc.plot(epochs, [100 * h[key] for h in history], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
