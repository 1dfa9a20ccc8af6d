"""The persistent ``Z`` of a run (``patchgd.fill: cached``): its layout and size, checked before training
starts, the store made or found again (rewound to the checkpoint a run resumes from), and its snapshots
beside the checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn as nn

from .. import distributed
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config, ConfigError
from ..data.datasets import ImageDataset
from ..data.features import FeatureFolder
from ..grid import grid_shape
from ..memory import format_size
from ..methods.cached import CachedZ
from ..zstore import ZStore, default_store_dir, free_bytes, store_bytes

__all__ = ["SNAPSHOT", "build_cache", "check_cached_fill", "commit_cache", "describe_store", "save_cache", "store_layout"]

SNAPSHOT = "zstore-{epoch}.pt"  # a store in memory, as of the checkpoint of that epoch


def check_cached_fill(cfg: Config) -> None:
    """Refuse what a cached fill cannot do under this launch (the key conflicts are :func:`~patchgd.config.validate`'s).

    Raises:
        ConfigError: A store in memory under several processes.
    """
    if cfg.patchgd.store == "memory" and distributed.world_size() > 1:
        raise ConfigError("patchgd.fill=cached with patchgd.store=memory under torchrun: each process would keep "
                          "its own copy; use patchgd.store=disk (a folder every process reaches)")


def store_layout(cfg: Config, model: nn.Module, train_set: ImageDataset) -> tuple[list[int], int, bool]:
    """Cells of each training image's own grid, the width of a stored row and whether it holds the frozen
    encoder's features (``model.freeze: all``) instead of codes."""
    p = cfg.model.patch_size
    if cfg.data.image_size is not None:
        sizes = [(cfg.data.image_size, cfg.data.image_size)] * len(train_set)
    else:
        sizes = train_set.image_sizes or [tuple(train_set.load_image(i).shape[-2:]) for i in range(len(train_set))]
    cells = [math.prod(grid_shape(h, w, p)) for h, w in sizes]
    features = cfg.model.freeze == "all" and getattr(model, "feature_dim", None) is not None
    return cells, model.feature_dim if features else cfg.model.latent_dim, features


def describe_store(cfg: Config, layout: tuple[list[int], int, bool], run_dir: str | Path) -> str:
    """One line on the store a cached run keeps (``layout``: :func:`store_layout`'s): images, cells, what a
    cell holds, its size and where."""
    p = cfg.patchgd
    cells, width, features = layout
    folder = Path(p.store_dir) if p.store_dir else default_store_dir(run_dir)
    where = f"on disk in {folder}" if p.store == "disk" else "in memory (saved beside the checkpoints)"
    return (f"Z store: {len(cells)} images, {sum(cells)} cells of {width} {p.store_dtype} "
            f"({'the frozen encoder features' if features else 'codes'}): "
            f"{format_size(store_bytes(cells, width, p.store_dtype))} {where}")


def build_cache(cfg: Config, model: nn.Module, train_set: ImageDataset, run_dir: Path, state: dict | None,
                log) -> CachedZ:
    """The run's cached fill: its store made (a new run; its size said and checked against the free disk)
    or found again as of the checkpoint ``state`` (a resumed run)."""
    p = cfg.patchgd
    layout = store_layout(cfg, model, train_set)  # reads every image's size: once
    cells, width, features = layout
    size = store_bytes(cells, width, p.store_dtype)
    folder = Path(p.store_dir) if p.store_dir else default_store_dir(run_dir)
    log(describe_store(cfg, layout, run_dir))
    if p.store == "memory":
        store = ZStore.create(cells, width, p.store_dtype)
        if state is not None:
            store.load_state_dict(load_checkpoint(run_dir / SNAPSHOT.format(epoch=state["epoch"])))
    else:
        rank = distributed.rank()
        for first in (True, False):  # rank 0 makes or rewinds the store, then the others open it
            if distributed.is_main() == first:
                if state is None and first:
                    if free_bytes(folder) < size:
                        raise OSError(f"patchgd.store_dir {folder}: {format_size(size)} needed for the Z store, "
                                      f"{format_size(free_bytes(folder))} free; free space or choose another folder")
                    store = ZStore.create(cells, width, p.store_dtype, folder, rank)
                else:
                    store = ZStore.open(folder, cells, width, p.store_dtype, rank)
                    if state is not None and first:
                        log(f"Z store: {store.rewind(state['epoch'])} rows put back as they were at epoch "
                            f"{state['epoch']}'s checkpoint")
            distributed.barrier()
    feature_files = None
    if p.features_from is not None:
        if not features:
            raise ConfigError(f"patchgd.features_from={p.features_from!r} holds a frozen encoder's features: "
                              f"model.backbone={cfg.model.backbone!r} has none; expected a timm backbone")
        feature_files = FeatureFolder(p.features_from)
        log(f"features: read from {feature_files.folder} where an image has a file there")
    return CachedZ(model, store, refresh=p.refresh, features=features, features_from=feature_files,
                   names=[Path(path).stem for path in train_set.paths])


def save_cache(cache: CachedZ, run_dir: Path, epoch: int) -> None:
    """Before the checkpoint of ``epoch`` (rank 0): a store in memory as a snapshot beside it."""
    if cache.store.folder is None:
        save_checkpoint(run_dir / SNAPSHOT.format(epoch=epoch), cache.store.state_dict())


def commit_cache(cache: CachedZ, run_dir: Path, epoch: int) -> None:
    """After the checkpoint of ``epoch`` (rank 0): its writes stay (a store on disk drops their journal; a
    snapshot in memory drops the older snapshots)."""
    cache.store.commit(epoch)
    for old in run_dir.glob(SNAPSHOT.format(epoch="*")):
        if old.name != SNAPSHOT.format(epoch=epoch):
            old.unlink(missing_ok=True)
