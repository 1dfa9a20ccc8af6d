"""A backbone pretrained on the patches it will encode: the paper's App. C idea with digit labels.

A Megapixel MNIST data set knows where each digit lies (``meta.json``), so its training images can be cut
into PatchGD's cells, each labelled by the digit mostly inside it or as background
(:func:`patchgd.data.prepare.megapixel_mnist.cut_digit_cells`), and the backbone trained as a GD classifier of
those cells. ``patchgd demo`` starts PatchGD from it; ``python -m benchmarks.ultramnist_study --pretrain-cells`` starts
every arm from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config
from .data.prepare.megapixel_mnist import BACKGROUND, cut_digit_cells
from .engine.trainer import fit
from .rundir import BEST_CHECKPOINT

__all__ = ["pretrain_on_cells"]


def pretrain_on_cells(cfg: Config, data_dir: str | Path, cells_dir: str | Path, output_dir: str | Path,
                      epochs: int, batch_size: int = 32) -> Path:
    """Train ``cfg``'s backbone as a GD classifier of the ``cfg.model.patch_size`` cells of ``data_dir``'s
    training images (the ten digits and background); the checkpoint to pass as ``model.init_backbone``.

    Args:
        cfg: The PatchGD config whose backbone, patch size, seed and learning rate are used.
        data_dir: A folder written by :func:`patchgd.data.prepare.megapixel_mnist.generate_megapixel_mnist`.
        cells_dir: Where the cells are written (reused if already there).
        output_dir: The pretraining's run directory.
        epochs: Epochs of pretraining.
        batch_size: Cells per batch.

    Returns:
        The path of the pretraining run's ``best.pt``.
    """
    cells_dir = Path(cells_dir)
    if not (cells_dir / "train.csv").exists():
        cut_digit_cells(data_dir, cells_dir, cfg.model.patch_size, seed=cfg.train.seed)
    pretrain = dataclasses.replace(
        cfg, method="gd", output_dir=str(output_dir),
        model=dataclasses.replace(cfg.model, init_backbone=None, head="conv"),  # GD: its own classifier
        data=dataclasses.replace(cfg.data, root=str(cells_dir), num_classes=BACKGROUND + 1, image_size=None),
        memory=dataclasses.replace(cfg.memory, budget=None),
        train=dataclasses.replace(cfg.train, epochs=epochs, batch_size=batch_size, heatmap_every=0,
                                  warmup_epochs=0, backbone_lr=None))  # the whole classifier at lr
    return Path(fit(pretrain)["run_dir"]) / BEST_CHECKPOINT
