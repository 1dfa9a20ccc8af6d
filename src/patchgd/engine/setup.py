"""One run setup: what a training run is made of, built from its config in one place, so that ``fit``, the
memory planner (:mod:`patchgd.engine.plan`) and the diagnosis (``python -m benchmarks.diagnose``) train the
same thing and cannot drift apart.

* :func:`build_training`: the seeds, the model on its device (weights, App. C start, SyncBatchNorm,
  channels-last), its optimizer and the method's step;
* :func:`build_loaders`: the training loader (shard, ``drop_last``, a generator of its own, the cached
  fill's keys) and the validation loader.

The training set's augmentation is given to it where it is built (``build_datasets(cfg, augment=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed
from ..config import Config
from ..data.datasets import ImageDataset, collate_images
from ..data.sequences import SequenceDataset
from .build import build_method, build_model, build_optimizer, init_backbone
from .data import build_train_loader, origin_of, train_loader_drops_last
from .state import seed_everything

__all__ = ["Loaders", "Training", "build_loaders", "build_training", "shares_batches"]


@dataclasses.dataclass
class Training:
    """The model, its optimizer, the step that trains it, and the generator of the step's random cells."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: Any  # a registered method's step (patchgd.methods)
    generator: torch.Generator


@dataclasses.dataclass
class Loaders:
    """The training loader (with its sampler, a process's shard under torchrun, and its own generator) and
    the validation loader."""

    train: DataLoader
    val: DataLoader
    sampler: Any
    generator: torch.Generator


def shares_batches(cfg: Config) -> bool:
    """Whether every process works on the same images (the patch-parallel fill under torchrun), hence the
    same random draws."""
    return cfg.method == "patchgd" and cfg.patchgd.parallel_fill and distributed.world_size() > 1


def build_training(cfg: Config, device: torch.device, *, weights: bool = True, processes: bool = True,
                   cache: Callable[[nn.Module], Any] | None = None,
                   log: Callable[[str], None] = lambda line: None) -> Training:
    """The model, optimizer and step of ``cfg`` on ``device``, seeded by ``train.seed``.

    Every process builds the same weights; under torchrun, each then draws its own dropout and cells
    (unless all work on the same images).

    Args:
        cfg: The run's config (its encoder's origin resolved, its classes known).
        device: Where the model trains.
        weights: Load the pretrained weights and ``model.init_backbone``; False for a model whose weights
            come from a checkpoint, or that is only measured (weights change no memory).
        processes: Join the process group: SyncBatchNorm, DDP and the patch-parallel fill. False for a
            step run in one process alone (the planner's trials).
        cache: Builds the cached fill (:class:`~patchgd.methods.cached.CachedZ`) of the model, or None.
        log: Where the backbone's start is said.
    """
    generator = seed_everything(cfg.train.seed)
    model = build_model(cfg, weights=weights)
    if cfg.model.init_backbone is not None and weights:
        loaded = init_backbone(model, cfg.model.init_backbone)
        log(f"backbone initialised from {cfg.model.init_backbone}: {loaded} tensors")
    if cfg.train.sync_batchnorm and processes:
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shared = shares_batches(cfg) and processes
    if processes and distributed.world_size() > 1 and not shared:  # other images per process: other draws
        generator = seed_everything(cfg.train.seed + 1_000_003 * distributed.rank())
    optimizer = build_optimizer(cfg, model)
    method = build_method(cfg, model, optimizer, generator, cache=cache(model) if cache else None,
                          wrap=distributed.ddp(device) if processes else None,
                          fill=functools.partial(distributed.parallel_fill, model) if shared else None)
    return Training(model, optimizer, method, generator)


def build_loaders(cfg: Config, train_set: ImageDataset | SequenceDataset, val_set: ImageDataset | SequenceDataset,
                  log: Callable[[str], None] = lambda line: None) -> Loaders:
    """The training loader (this process's shard, shuffled by a generator of its own; a last batch of one
    image dropped) and the validation loader (this process's shard, in order)."""
    sampler = distributed.train_sampler(train_set, cfg.train.seed, shared=shares_batches(cfg))
    generator = torch.Generator()
    drop_last = train_loader_drops_last(len(sampler) if sampler is not None else len(train_set), cfg.train.batch_size)
    if drop_last:
        log(f"{len(train_set)} training images in batches of {cfg.train.batch_size} would leave a last batch "
            "of one image: it is dropped (a different image each epoch)")
    train = build_train_loader(cfg, train_set, generator, sampler, drop_last)
    if len(train) == 0:
        raise ValueError(f"{origin_of(train_set)}: {len(train_set)} training item(s); expected at least 2")
    val = DataLoader(distributed.eval_shard(val_set), batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                     num_workers=cfg.data.num_workers, collate_fn=collate_images)
    return Loaders(train, val, sampler, generator)
