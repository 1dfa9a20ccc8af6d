"""Plots a person looks at: learning curves of a run."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs write PNGs; no screen is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402

__all__ = ["plot_learning_curves"]


def plot_learning_curves(metrics_csv: str | Path, png: str | Path, title: str | None = None) -> None:
    """Draw train/validation loss and validation accuracy per epoch from a run's ``metrics.csv``.

    Args:
        metrics_csv: The run's metrics file (columns ``epoch``, ``train_loss``, ``val_loss``,
            ``val_accuracy``).
        png: Where to write the figure (atomically).
        title: Figure title (default: the run directory, as ``parent/name``).
    """
    rows = list(csv.DictReader(Path(metrics_csv).open()))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train")
    loss_ax.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [float(r["val_accuracy"]) for r in rows], "o-", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy", ylim=(0, 1))
    run_dir = Path(metrics_csv).resolve().parent
    fig.suptitle(title or f"{run_dir.parent.name}/{run_dir.name}")
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
