"""Plots a person looks at: learning curves of a run, the patch grid and tissue mask of a slide."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # runs write PNGs; no screen is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402

__all__ = ["plot_learning_curves", "plot_slide_grid"]


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
