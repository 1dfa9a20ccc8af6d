"""Plots a person looks at: learning curves of a run, ROC curves and the confusion matrix of an evaluation
(of each fold too), the patch grid and tissue mask of a slide."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # runs write PNGs; no screen is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402

__all__ = ["plot_confusion", "plot_folds_roc", "plot_learning_curves", "plot_roc", "plot_slide_grid"]


def plot_learning_curves(metrics_csv: str | Path, png: str | Path, title: str | None = None,
                         num_classes: int | None = None, best_epoch: int | None = None) -> None:
    """Draw a run's learning curves from its ``metrics.csv``: train/validation loss; validation accuracy
    and quadratic weighted kappa with the chance accuracy and the best epoch marked; the learning rate.

    Args:
        metrics_csv: The run's metrics file (columns ``epoch``, ``lr``, ``train_loss``, ``val_loss``,
            ``val_accuracy``, ``val_qwk``).
        png: Where to write the figure (atomically).
        title: Figure title (default: the run directory, as ``parent/name``).
        num_classes: Draws the chance accuracy ``1 / num_classes`` when given.
        best_epoch: The epoch of ``best.pt`` (``train.monitor`` chose it); default: the best accuracy's.
    """
    rows = list(csv.DictReader(Path(metrics_csv).open()))
    epochs = [int(r["epoch"]) for r in rows]
    evaluated = [r for r in rows if r["val_accuracy"]]  # train.eval_every leaves the others empty
    val_epochs = [int(r["epoch"]) for r in evaluated]
    accuracy = [float(r["val_accuracy"]) for r in evaluated]
    best = best_epoch or val_epochs[accuracy.index(max(accuracy))]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.5))
    loss_ax.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train")
    loss_ax.plot(val_epochs, [float(r["val_loss"]) for r in evaluated], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(val_epochs, accuracy, "o-", color="tab:green", label="accuracy")
    acc_ax.plot(val_epochs, [float(r["val_qwk"]) for r in evaluated], "s--", color="tab:purple", label="kappa (QWK)")
    if num_classes:
        acc_ax.axhline(1 / num_classes, color="grey", linestyle=":", label=f"chance (1/{num_classes})")
    acc_ax.axvline(best, color="tab:red", alpha=0.4, label=f"best epoch {best} ({accuracy[val_epochs.index(best)]:.3f})")
    acc_ax.set(xlabel="epoch", ylabel="score", title="validation", ylim=(min(0.0, acc_ax.get_ylim()[0]), 1))
    acc_ax.legend(fontsize="small")
    lr_ax.plot(epochs, [float(r["lr"]) for r in rows], "o-", color="tab:orange")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate (start of epoch)")
    run_dir = Path(metrics_csv).resolve().parent
    fig.suptitle(title or f"{run_dir.parent.name}/{run_dir.name}")
    _save(fig, png)


def _save(fig, png: str | Path) -> None:
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _curve_classes(num_classes: int) -> list[int]:
    """The classes whose ROC curve is drawn: class 1 of two (the positive class), else every class."""
    return [1] if num_classes == 2 else list(range(num_classes))


def plot_roc(probabilities: np.ndarray, targets: np.ndarray, classes: list[str], png: str | Path,
             title: str) -> None:
    """ROC curves of one evaluation: of the positive class for two classes, else each class one-vs-rest,
    with its AUROC in the legend; a class without images in the set (or alone in it) has none, and says so.

    Args:
        probabilities: ``(N, K)`` class probabilities.
        targets: ``(N,)`` true classes.
        classes: The ``K`` class names.
        png: Where to write the figure (atomically).
        title: Its title.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for k in _curve_classes(len(classes)):
        positive = targets == k
        if positive.all() or not positive.any():
            ax.plot([], [], " ", label=f"{classes[k]}: no curve ({'every' if positive.all() else 'no'} image)")
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUROC {roc_auc_score(positive, probabilities[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, png)


def plot_folds_roc(folds: list[tuple[np.ndarray, np.ndarray]], classes: list[str], png: str | Path,
                   title: str) -> None:
    """Cross-validation ROC curves: each fold's (thin), their mean on a common false-positive grid and a band
    of one standard deviation; one panel for two classes (the positive class), else one per class.

    Args:
        folds: Per fold, ``(probabilities (N, K), targets (N,))`` of its held-out images.
        classes: The class names.
        png: Where to write the figure (atomically).
        title: Its title.
    """
    from sklearn.metrics import auc, roc_curve

    shown = _curve_classes(len(classes))
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.5), squeeze=False)
    grid = np.linspace(0, 1, 101)
    for ax, k in zip(axes[0], shown):
        curves = []
        for i, (probabilities, targets) in enumerate(folds):
            positive = targets == k
            if positive.all() or not positive.any():
                continue
            fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
            ax.plot(fpr, tpr, alpha=0.35, linewidth=1, label=f"fold {i} (AUROC {auc(fpr, tpr):.3f})")
            curves.append(np.interp(grid, fpr, tpr))
            curves[-1][0] = 0.0
        if curves:
            mean, std = np.mean(curves, axis=0), np.std(curves, axis=0)
            ax.plot(grid, mean, color="tab:blue", linewidth=2, label=f"mean (AUROC {auc(grid, mean):.3f})")
            ax.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="tab:blue", alpha=0.15,
                            label="± 1 std")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: {classes[k]}",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize="small", loc="lower right")
    _save(fig, png)


def plot_confusion(confusion: np.ndarray, classes: list[str], png: str | Path, title: str) -> None:
    """The confusion matrix (rows: true class, columns: predicted) with counts and row shares.

    Args:
        confusion: ``(K, K)`` counts.
        classes: The class names.
        png: Where to write the figure (atomically).
        title: Its title.
    """
    confusion = np.asarray(confusion)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = 2.8 + 0.5 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for t in range(len(classes)):
        for p in range(len(classes)):
            ax.text(p, t, f"{confusion[t, p]}\n{shares[t, p]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[t, p] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    fig.colorbar(image, ax=ax, label="share of the true class")
    _save(fig, png)


# Background cells are dimmed, the border of the tissue cells is green, grid lines are dark grey.
_BACKGROUND_DIM = 0.6
_TISSUE_BORDER = np.array([0, 200, 0])
_GRID_LINE = np.array([60, 60, 60])
_MIN_CELL_PIXELS = 4  # grid lines are drawn only where cells are at least this wide in the picture


def plot_slide_grid(thumbnail: np.ndarray, mask: np.ndarray, height: int, width: int, patch_size: int,
                    png: str | Path, title: str | None = None) -> None:
    """Draw the patch grid and its tissue cells on a thumbnail of a slide.

    Background cells are dimmed and the tissue cells outlined in green; grid lines are drawn when a cell
    is at least 4 thumbnail pixels wide (otherwise they would cover the picture).

    Args:
        thumbnail: ``(h, w, 3)`` or ``(h, w, 1)`` uint8 picture of the whole image.
        mask: ``(m, n)`` bool, True on tissue cells.
        height: The image height at the grid's resolution.
        width: The image width at the grid's resolution.
        patch_size: The grid's patch side.
        png: Where to write the picture (atomically).
        title: A line of text written in the top-left corner.
    """
    from PIL import Image, ImageDraw, ImageFont

    picture = np.repeat(thumbnail, 3, axis=2) if thumbnail.shape[2] == 1 else thumbnail
    h, w = picture.shape[:2]
    mask = np.asarray(mask, dtype=bool)
    # The cell under every thumbnail pixel (its centre mapped back to the image).
    rows = np.minimum(((np.arange(h) + 0.5) * height / h // patch_size).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * width / w // patch_size).astype(int), mask.shape[1] - 1)
    tissue = mask[rows][:, cols]
    out = np.where(tissue[:, :, None], picture.astype(np.float32), picture * _BACKGROUND_DIM)
    if patch_size * min(h / height, w / width) >= _MIN_CELL_PIXELS:
        out[np.flatnonzero(np.diff(rows)) + 1, :] = _GRID_LINE
        out[:, np.flatnonzero(np.diff(cols)) + 1] = _GRID_LINE
    # Border: pixels next to a pixel of the other kind, two pixels wide (one on each side).
    border = np.zeros_like(tissue)
    changes_down, changes_right = tissue[1:] != tissue[:-1], tissue[:, 1:] != tissue[:, :-1]
    border[1:] |= changes_down
    border[:-1] |= changes_down
    border[:, 1:] |= changes_right
    border[:, :-1] |= changes_right
    out[border] = _TISSUE_BORDER
    image = Image.fromarray(out.round().astype(np.uint8))
    if title:
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(10, w // 70))
        left, top, right, bottom = draw.textbbox((4, 4), title, font=font)
        draw.rectangle((0, 0, right + 4, bottom + 4), fill=(255, 255, 255))
        draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    with atomic_file(png) as tmp:
        image.save(tmp, format="PNG")
