"""Plots a person looks at: learning curves of a run."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs write PNGs; no screen is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402

__all__ = ["plot_learning_curves"]


def plot_learning_curves(metrics_csv: str | Path, png: str | Path, title: str | None = None,
                         num_classes: int | None = None) -> None:
    """Draw a run's learning curves from its ``metrics.csv``: train/validation loss; validation accuracy
    and quadratic weighted kappa with the chance accuracy and the best epoch marked; the learning rate.

    Args:
        metrics_csv: The run's metrics file (columns ``epoch``, ``lr``, ``train_loss``, ``val_loss``,
            ``val_accuracy``, ``val_qwk``).
        png: Where to write the figure (atomically).
        title: Figure title (default: the run directory, as ``parent/name``).
        num_classes: Draws the chance accuracy ``1 / num_classes`` when given.
    """
    rows = list(csv.DictReader(Path(metrics_csv).open()))
    epochs = [int(r["epoch"]) for r in rows]
    accuracy = [float(r["val_accuracy"]) for r in rows]
    best = epochs[accuracy.index(max(accuracy))]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.5))
    loss_ax.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train")
    loss_ax.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, accuracy, "o-", color="tab:green", label="accuracy")
    acc_ax.plot(epochs, [float(r["val_qwk"]) for r in rows], "s--", color="tab:purple", label="kappa (QWK)")
    if num_classes:
        acc_ax.axhline(1 / num_classes, color="grey", linestyle=":", label=f"chance (1/{num_classes})")
    acc_ax.axvline(best, color="tab:red", alpha=0.4, label=f"best epoch {best} ({max(accuracy):.3f})")
    acc_ax.set(xlabel="epoch", ylabel="score", title="validation", ylim=(min(0.0, acc_ax.get_ylim()[0]), 1))
    acc_ax.legend(fontsize="small")
    lr_ax.plot(epochs, [float(r["lr"]) for r in rows], "o-", color="tab:orange")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate (start of epoch)")
    run_dir = Path(metrics_csv).resolve().parent
    fig.suptitle(title or f"{run_dir.parent.name}/{run_dir.name}")
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
