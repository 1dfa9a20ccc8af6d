"""The training loop: build everything from a :class:`~patchgd.config.Config`, train, evaluate, checkpoint.

Read top to bottom: builders, :func:`train_one_epoch`, :func:`evaluate`, checkpoints, then :func:`fit`,
which ties them together (build the data, maybe resume, build the run, then per epoch train and evaluate
and write the epoch's files), then the named steps it calls in that order. Every method (``patchgd``,
``gd``, ``gd-extended``) goes through the same loop.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError, check_paths, config_differences, config_from_dict, config_to_dict, save_config
from .data.augment import Augment
from .data.datasets import (ImageCSVDataset, ImageDataset, ImageFolderDataset, check_groups_apart, class_folders,
                             collate_images, stratified_split)
from .data.errors import DataError, Skipped
from .data.images import require_one_size
from .data.intensity import Intensity
from .data.sequences import SequenceDataset
from .grid import LazyImage, PatchGrid
from .io import atomic_file
from .memory import PeakMemory, format_size, process_peak
from .methods import autocast, classification_loss, create_method, create_model, patches_per_iteration
from .metrics import evaluate_predictions
from .plots import plot_learning_curves
from .pretrained import HUB_PREFIX, architecture_only, describe_origin, resolve_encoder
from .rundir import hold_run_dir
from .runlog import Progress, RunLogger
from .skips import SKIPPED_FILE, SkipLog, drop_skipped, run_skipping

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_qwk", "peak_memory_bytes",
                  "peak_process_bytes", "epoch_time_s"]
SPLIT_FILE = "split.csv"
DEFAULT_VAL_CSV = "val.csv"  # used when present; another name must exist


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, parameter or validation output."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def build_datasets(cfg: Config) -> tuple[ImageDataset | SequenceDataset, ImageDataset | SequenceDataset]:
    """Train and validation sets from ``data.*`` (the layouts and validation rules of
    :class:`~patchgd.config.DataConfig`; validation items use the training set's classes); or, with
    ``data.kind: sequences``, ``train.npz`` and ``val.npz``."""
    check_paths(cfg)
    if cfg.data.kind == "sequences":
        return tuple(SequenceDataset(Path(cfg.data.root) / f"{split}.npz", cfg.data.num_classes, cfg.model.in_chans)
                     for split in ("train", "val"))
    sets = _layout_datasets(cfg)
    check_groups_apart(*sets)
    if cfg.data.image_size is None and cfg.method != "patchgd":  # PatchGD gives each image its own grid
        for dataset in sets:
            require_one_size(dataset.paths, dataset.image_sizes)
    return sets


def _layout_datasets(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    root, read = Path(d.root), dict(read_options(cfg), verify=d.verify, on_error=d.on_error)
    train_csv = root / d.train_csv
    if train_csv.is_file():
        common = dict(num_classes=d.num_classes, label_column=d.label_column, id_column=d.id_column,
                      group_column=d.group_column, **read)
        if d.fold is not None:
            train = ImageCSVDataset(train_csv, root / d.train_dir, fold=d.fold, split="train", classes=d.classes,
                                    **common)
            return train, ImageCSVDataset(train_csv, root / d.train_dir, fold=d.fold, split="val",
                                          classes=train.classes, **common)
        train = ImageCSVDataset(train_csv, root / d.train_dir, classes=d.classes, **common)
        val_csv = root / d.val_csv if d.val_csv is not None else None
        if val_csv is not None and (val_csv.is_file() or d.val_csv != DEFAULT_VAL_CSV):
            return train, ImageCSVDataset(val_csv, root / d.val_dir, classes=train.classes, **common)
    else:
        if d.group_column is not None:
            raise DataError(f"data.group_column={d.group_column!r} names a CSV column, but {root} has no "
                            f"{d.train_csv}; expected a CSV listing each image with its group")
        folder = root / d.train_dir if (root / d.train_dir).is_dir() else root
        if not class_folders(folder):
            raise DataError(f"{root}: no {d.train_csv} and no class folders with images; expected {train_csv} "
                            f"(columns {d.id_column} and a label) or {folder}/<class name>/<images>")
        train = ImageFolderDataset(folder, classes=d.classes, **read)
        if folder != root and (root / d.val_dir).is_dir():
            return train, ImageFolderDataset(root / d.val_dir, classes=train.classes, **read)
    return stratified_split(train, d.val_fraction, cfg.train.seed)


def labels_of(dataset: ImageDataset | SequenceDataset) -> list[int]:
    """The class indices of a dataset's items."""
    return dataset.y.tolist() if isinstance(dataset, SequenceDataset) else dataset.labels


def origin_of(dataset: ImageDataset | SequenceDataset) -> str | Path:
    """What a dataset was read from (a CSV, a folder, an npz file), for messages."""
    return dataset.path if isinstance(dataset, SequenceDataset) else dataset.origin


def resolve_classes(cfg: Config, train_set: ImageDataset, val_set: ImageDataset) -> Config:
    """``cfg`` with ``data.num_classes`` and ``data.classes`` as the labels say.

    Raises:
        DataError: ``data.num_classes`` is given and disagrees with the labels, or fewer than two
            classes are found.
    """
    d = cfg.data
    if getattr(train_set, "classes", None) is not None:
        classes, found = list(train_set.classes), len(train_set.classes)
        if d.num_classes is not None and d.num_classes != found:
            raise DataError(f"data.num_classes={d.num_classes} but the labels of {train_set.origin} name {found} "
                            f"classes {classes}; expected {found} (or leave data.num_classes null to infer it)")
    else:
        classes, found = None, max(labels_of(train_set) + labels_of(val_set)) + 1
    num_classes = d.num_classes or found
    if num_classes < 2:
        raise DataError(f"{origin_of(train_set)}: the labels hold only class 0; expected at least two classes")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, num_classes=num_classes, classes=classes))


def class_name(cfg: Config, index: int) -> str:
    """The name of class ``index``: from ``data.classes``, else the index itself."""
    return cfg.data.classes[index] if cfg.data.classes else str(index)


def write_split(path: Path, root: str | Path, train_set: ImageDataset, val_set: ImageDataset) -> None:
    """Record which image went to training and which to validation (``split.csv``: image, label, split, and
    the image's group when the data has groups)."""
    root = Path(root).resolve()

    def name(p: Path) -> str:
        p = Path(p).resolve()
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        grouped = train_set.groups is not None
        writer.writerow(["image", "label", "split", *(["group"] if grouped else [])])
        for split, ds in (("train", train_set), ("val", val_set)):
            for i, (p, label) in enumerate(zip(ds.paths, ds.labels)):
                writer.writerow([name(p), ds.classes[label] if ds.classes else label, split,
                                 *([ds.groups[i]] if grouped else [])])


def build_augmentation(cfg: Config) -> Augment | None:
    """The training images' transform from ``augment.*`` (:class:`~patchgd.data.augment.Augment`), or None.

    Images in memory are moved and jittered whole before they are cut; a slide read in pieces carries
    the draws to its grid, which applies them to every patch it reads, in the fill and every inner
    iteration alike, so the grid, ``Z`` and the labels stay consistent.
    """
    a = cfg.augment
    if (a.saturation or a.hue or a.hed) and cfg.model.in_chans != 3:
        raise ConfigError(f"augment.saturation/augment.hue/augment.hed need colour images; model.in_chans is "
                          f"{cfg.model.in_chans}, expected 3")
    if not any((a.flip, a.rotate90, a.brightness, a.contrast, a.saturation, a.hue, a.hed)):
        return None
    return Augment(a, patch_size=cfg.model.patch_size if cfg.method == "patchgd" else None)


def build_train_loader(cfg: Config, train_set: ImageDataset, generator: torch.Generator,
                       sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False) -> DataLoader:
    """Shuffled batches of ``train_set`` (or in the order of ``sampler``, a process's shard under
    torchrun); with ``train.balanced_sampler``, drawn with replacement with probability inversely
    proportional to each image's class frequency (every class equally often)."""
    if cfg.train.balanced_sampler:
        if sampler is not None:
            raise ValueError("train.balanced_sampler=true is not available with several processes (torchrun) "
                             "yet; train on one process, or without it")
        labels = labels_of(train_set)
        counts = np.bincount(labels)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(train_set), replacement=True,
                                        generator=generator)
    return DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=cfg.data.num_workers, generator=generator,
                      collate_fn=collate_images)


def read_options(cfg: Config) -> dict:
    """How ``cfg`` reads an image (:func:`~patchgd.data.datasets.load_image`'s options): PatchGD keeps files
    that can be read in pieces lazy, on its patch grid; the GD baselines read every image whole."""
    d = cfg.data
    return dict(in_chans=cfg.model.in_chans, image_size=d.image_size, level=d.level, mpp=d.mpp, slide_mpp=d.slide_mpp,
                patch_size=cfg.model.patch_size if cfg.method == "patchgd" else None, tissue=d.tissue,
                tissue_fraction=d.tissue_fraction, intensity=Intensity.from_config(d))


def resolve_weights(cfg: Config) -> Config:
    """``cfg`` with ``model.pretrained_origin`` found (:func:`patchgd.pretrained.resolve_encoder`: the hub,
    its cache, a file or a folder), once, before anything is built; a non-timm backbone has none. An
    origin already in ``cfg`` (a copied ``config.yaml`` of another run) is found anew: it may name another
    machine's file.

    Under torchrun rank 0 resolves first (downloading into the cache once), then the others find it there.
    """
    if cfg.model.backbone == "conv1d":
        return cfg
    origin = None
    for first in (True, False):
        if distributed.is_main() == first:
            origin = resolve_encoder(cfg.model.backbone, cfg.model.pretrained)
        distributed.barrier()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_origin=origin))


def build_model(cfg: Config, *, weights: bool = True) -> nn.Module:
    """The model ``cfg.method`` trains, on the CPU.

    Args:
        cfg: The run's config; a pretrained or hub backbone needs ``model.pretrained_origin``
            (:func:`resolve_weights`).
        weights: Load the pretrained weights; False builds the architecture alone, for a model whose state
            comes from a checkpoint (so rebuilding it never needs the hub or the weights file).
    """
    m = cfg.model
    pretrained = m.pretrained_origin if weights else architecture_only(m.pretrained_origin)
    if pretrained is None and m.backbone != "conv1d":
        if m.backbone.startswith(HUB_PREFIX) or (weights and m.pretrained not in (None, False)):
            raise ValueError(f"model.backbone={m.backbone!r} with model.pretrained={m.pretrained!r} needs its origin "
                             "resolved first (patchgd.train.resolve_weights)")
        pretrained = False  # a random-initialised registry model: nothing to resolve
    return create_model(cfg.method, m.backbone, cfg.data.num_classes, patch_size=m.patch_size,
                        latent_dim=m.latent_dim, in_chans=m.in_chans, pretrained=pretrained,
                        backbone_args=m.backbone_args, freeze=m.freeze, grad_checkpointing=m.grad_checkpointing,
                        head=m.head,
                        head_width=m.head_width, head_dropout=m.head_dropout, head_depth=m.head_depth,
                        head_heads=m.head_heads, pad_value=cfg.data.pad_value,
                        image_size=cfg.data.image_size, channels_last=m.channels_last, mean=cfg.data.mean,
                        std=cfg.data.std, fill_workers=cfg.data.num_workers)


def init_backbone(model: nn.Module, path: str | Path) -> int:
    """Load the backbone weights of a checkpoint, a state-dict file or a hub repository
    (``hf-hub:ORG/NAME``) into ``model``'s backbone (App. C).

    Keys are matched by name after the wrapper prefixes (``backbone.``, ``backbone.features.``) are
    dropped, so a GD run's timm backbone initialises PatchGD's ``backbone.features``; the source's
    classifier and head, which the target lacks, are ignored, and a GD target keeps its own classifier.
    Returns the number of tensors loaded.
    """
    if str(path).startswith(HUB_PREFIX):
        from timm.models import load_state_dict  # safetensors, or torch.load(weights_only=True)

        state = load_state_dict(resolve_encoder(str(path), True)["file"])
    else:
        state = load_checkpoint(path)
    state = state.get("model", state)
    target = encoder_of(model)
    wanted = target.state_dict()
    # A GD model's own classifier is new for its task: never taken from the source (its classes differ).
    classifier = target.get_classifier() if hasattr(target, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        prefix = next(name for name, module in target.named_modules() if module is classifier) + "."
        wanted = {k: v for k, v in wanted.items() if not k.startswith(prefix)}
    found = {}
    for key, value in state.items():
        for prefix in ("backbone.features.", "backbone.", ""):
            if key.startswith(prefix) and key[len(prefix):] in wanted:
                found[key[len(prefix):]] = value
                break
    if not found:
        raise ValueError(f"model.init_backbone={str(path)!r}: no key matches the backbone's (e.g. "
                         f"{next(iter(wanted), '?')!r}); expected a patchgd checkpoint or a state dict of the "
                         "same backbone")
    bad = [k for k, v in found.items() if v.shape != wanted[k].shape]
    if bad:
        raise ValueError(f"model.init_backbone={str(path)!r}: {bad[0]!r} has shape {tuple(found[bad[0]].shape)}, "
                         f"expected {tuple(wanted[bad[0]].shape)} (another backbone or in_chans?)")
    target.load_state_dict(found, strict=False)
    return len(found)


def encoder_of(model: nn.Module) -> nn.Module:
    """The (pretrained) encoder inside a model: a PatchGD backbone's timm model, or a GD model's backbone."""
    return getattr(model.backbone, "features", model.backbone)


def parameter_groups(model: nn.Module, lr: float, backbone_lr: float | None = None,
                     layer_decay: float | None = None) -> list[dict]:
    """The trainable parameters (frozen ones get no optimizer state) in groups with their peak rates.

    Without ``backbone_lr`` and ``layer_decay`` it is one group at ``lr``. Otherwise the encoder's
    parameters (not its classifier, which is new) train at ``backbone_lr`` (default ``lr``), scaled by
    ``layer_decay ** (G - 1 - g)`` for its fine-grained group ``g`` of ``G`` (timm's ``group_matcher``:
    the stem is group 0), and everything else (projection, head, classifier) at ``lr``.

    Example:
        >>> model = create_model("gd", "test_resnet", 2)
        >>> [round(g["lr"], 7) for g in parameter_groups(model, 1e-3, 1e-4, 0.5)]
        [6.3e-06, 1.25e-05, 2.5e-05, 5e-05, 0.0001, 0.001]
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr is None and layer_decay is None:
        return [{"params": trainable, "lr": lr}]
    encoder = encoder_of(model)
    classifier = encoder.get_classifier() if hasattr(encoder, "get_classifier") else None
    new = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    named = {n: p for n, p in encoder.named_parameters() if p.requires_grad and id(p) not in new}
    if layer_decay is None:
        layers = [list(named.values())]
    else:
        if not hasattr(encoder, "group_matcher"):
            raise ValueError(f"train.layer_decay: the backbone {type(encoder).__name__} has no group_matcher to "
                             "number its layers by; use train.backbone_lr alone")
        from timm.models import group_parameters

        groups = group_parameters(encoder, encoder.group_matcher(coarse=False))
        # Groups left empty (the classifier's, frozen ones) take no rank: the last trained group gets backbone_lr.
        layers = [layer for layer in ([named[n] for n in names if n in named] for _, names in sorted(groups.items()))
                  if layer]
    rate = lr if backbone_lr is None else backbone_lr
    in_encoder = {id(p) for p in named.values()}
    groups = [{"params": params, "lr": rate * (layer_decay or 1.0) ** (len(layers) - 1 - i)}
              for i, params in enumerate(layers)]
    groups.append({"params": [p for p in trainable if id(p) not in in_encoder], "lr": lr})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the paper's), AdamW or SGD with momentum over the trainable parameters, in the groups of
    :func:`parameter_groups` (``train.backbone_lr``, ``train.layer_decay``)."""
    t = cfg.train
    groups = parameter_groups(model, t.lr, t.backbone_lr, t.layer_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    optimizer = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The paper's schedule (App. C), stepped once per batch: linear warm-up from 0 over
    ``warmup_epochs``, then linear decay reaching half the peak at the last step; or a constant rate."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(round(cfg.train.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if cfg.train.schedule == "constant":
            return 1.0
        if step < warmup:
            return step / warmup
        return 1.0 - 0.5 * (step - warmup) / max(total - 1 - warmup, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_method(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator | None = None):
    """The step object of ``cfg.method`` (PatchGD options from ``cfg.patchgd``)."""
    p = cfg.patchgd
    return create_method(cfg.method, model, optimizer, amp=cfg.train.amp,
                         micro_batch_size=cfg.train.micro_batch_size, sampling=p.sampling,
                         patches_per_step=p.patches_per_step, max_sampled=p.max_sampled,
                         inner_iterations=p.inner_iterations,
                         grad_accum_steps=p.grad_accum_steps, fill_mode=p.fill_mode,
                         fill_batch_size=p.fill_batch_size, generator=generator)


def first_item(dataset) -> torch.Tensor | LazyImage:
    """The first item of ``dataset`` that could be read (with ``data.on_error: skip`` some may not)."""
    for index in range(len(dataset)):
        item = dataset[index][0]
        if not isinstance(item, Skipped):
            return item
    raise DataError(f"{origin_of(dataset)}: none of its {len(dataset)} images could be read")


def item_shape(image: torch.Tensor | LazyImage) -> tuple[int, int, int]:
    """``(C, H, W)`` of a dataset item, read from a slide's header for a :class:`~patchgd.grid.LazyImage`."""
    if isinstance(image, LazyImage):
        return image.source.channels, image.source.height, image.source.width
    return tuple(image.shape)


def patches_per_step(cfg: Config, image_shape: tuple[int, ...]) -> int:
    """Patches a PatchGD inner iteration holds with gradients: ``B * k``; also its default fill chunk.
    ``k`` is ``patchgd.patches_per_step`` (at most the grid's cells) when set, else from ``sampling``.

    ``image_shape`` is one item's ``(C, H, W)`` (or a sequence's ``(C, L)``).
    """
    cells = PatchGrid(torch.empty(1, *image_shape, device="meta"), cfg.model.patch_size).num_cells
    return cfg.train.batch_size * patches_per_iteration(cfg.patchgd.sampling, cells, cfg.patchgd.patches_per_step)


def check_parameters_finite(model: nn.Module, where: str, loss: float) -> None:
    """Raise :class:`DivergenceError` if an update left a parameter non-finite (non-finite gradients).

    The loss itself is checked by :func:`patchgd.distributed.mean_loss`, on every process at once; the
    parameters are the same on every process. This costs one reduction per tensor. (An fp16 gradient
    scaler skips updates with non-finite gradients itself, so its parameters stay finite.)
    """
    params = [p.detach() for p in model.parameters()]
    if not torch.stack([p.isfinite().all() for p in params]).all():
        name = next(n for n, p in model.named_parameters() if not p.detach().isfinite().all())
        raise DivergenceError(f"{where}: parameter {name} is not finite after the update (non-finite "
                              f"gradients; the loss was {loss:.4g}); lower train.lr")


def _stderr_logger() -> RunLogger:
    """Progress for a caller that gave no logger: on stderr, so that stdout stays the caller's (JSON)."""
    return RunLogger(None, echo=functools.partial(print, file=sys.stderr))


def train_one_epoch(method, loader: DataLoader, scheduler, epoch: int, measure_step: int,
                    logger: RunLogger | None = None, global_step: int = 0, skips: SkipLog | None = None) -> dict:
    """One pass over ``loader``; the step at index ``measure_step`` is measured for peak memory.

    With several processes, each step's loss is the mean over all of them, and a non-finite loss on any
    one stops every process (:func:`patchgd.distributed.mean_loss`). With ``skips`` (``data.on_error:
    skip``) images that cannot be read leave their batch (:mod:`patchgd.skips`); a batch left empty is not
    stepped on alone, and under torchrun steps again on this process's previous batch, so that every
    process takes part in each step's all-reduce.

    Returns:
        ``train_loss`` (mean), ``peak_memory_bytes`` (the measured step's tensor peak),
        ``peak_process_bytes`` with its name ``peak_process_name`` (:func:`~patchgd.memory.process_peak`)
        and ``train_images`` (the images the loader gave, skipped ones included).

    Raises:
        RankFailure: A step gave a non-finite loss (on any process).
        DivergenceError: A step left a non-finite parameter.
    """
    logger = logger or _stderr_logger()
    losses, peak, process, seen, previous = [], 0, ("", 0), 0, None
    bar = logger.progress(loader, f"epoch {epoch}", unit="batch")
    for i, (images, labels) in enumerate(bar):
        seen += len(labels)
        meter = contextlib.nullcontext()
        if i == measure_step:
            # A list batch holds LazyImages (no pixels) besides its tensors.
            held = [images] if isinstance(images, torch.Tensor) else [x for x in images if isinstance(x, torch.Tensor)]
            meter = PeakMemory(method.device, baseline=(method.model, method.optimizer, *held))
        with meter:
            if skips is None:
                stats = method.step(images, labels)
            else:
                images, labels, dropped = drop_skipped(images, labels)
                stats, images, labels, failed = run_skipping(method.step, images, labels, method.model,
                                                             method.optimizer, getattr(method, "generator", None))
                skips.record(dropped + failed, epoch, "train")
                if stats is None and distributed.world_size() > 1:
                    if previous is None:
                        raise DataError(f"rank {distributed.rank()}: every image of its first batch of epoch {epoch} "
                                        "was skipped, and it has no earlier batch to take part in the step with")
                    stats = method.step(*previous)
                previous = (images, labels) if len(labels) else previous
        if i == measure_step:
            peak, process = meter.peak_bytes, process_peak(method.device)
        scheduler.step()
        if stats is None:  # every image of the batch was skipped: the schedule moves on, nothing else
            continue
        where = f"epoch {epoch}, step {i + 1}"
        losses.append(distributed.mean_loss(stats["loss"], where))
        check_parameters_finite(method.model, where, losses[-1])
        if isinstance(bar, Progress):
            bar.set_info(loss=f"{np.mean(losses[-20:]):.4f}")
        if (i + 1) % logger.every == 0:
            logger.scalars({"loss/train_step": float(np.mean(losses[-logger.every:]))}, global_step + i + 1)
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "peak_memory_bytes": peak,
            "peak_process_name": process[0], "peak_process_bytes": process[1], "train_images": seen}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             amp: str | None = None, logger: RunLogger | None = None, skips: SkipLog | None = None,
             epoch: int = 0) -> dict:
    """Loss, accuracy, quadratic weighted kappa, confusion matrix and per-class precision, recall and F1 of
    ``model`` on ``loader``.

    PatchGD models infer as in Fig. 3b of the paper: fill ``Z`` in eval mode, then the head. With several
    processes, each ``loader`` holds a :func:`~patchgd.distributed.eval_shard`; the predictions of all are
    gathered in the set's order before the metrics, so every image counts exactly once. With ``skips``,
    images that cannot be read are recorded (in ``epoch``) and left out of the metrics.
    """
    model.eval()
    logger = logger or _stderr_logger()
    all_logits, all_labels = [], []

    def infer(images, labels):
        if isinstance(images, torch.Tensor):
            images = images.to(device, non_blocking=True)
        with autocast(device, amp):
            return model(images).float().cpu()

    for images, labels in logger.progress(loader, "eval", unit="batch"):
        if skips is None:
            logits = infer(images, labels)
        else:
            images, labels, dropped = drop_skipped(images, labels)
            logits, _, labels, failed = run_skipping(infer, images, labels, model)
            skips.record(dropped + failed, epoch, "val")
            if logits is None:
                continue
        all_logits.append(logits)
        all_labels.append(labels)
    # A shard can be empty when the set is smaller than the number of processes.
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, num_classes)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    if skips is None:
        logits, labels = distributed.gather_in_order(logits), distributed.gather_in_order(labels)
    else:  # shards shortened by skips no longer interleave; the metrics do not depend on the order
        logits = torch.cat(distributed.gather_objects(logits))
        labels = torch.cat(distributed.gather_objects(labels))
    results = evaluate_predictions(logits, labels, num_classes)
    results["loss"] = classification_loss(logits, labels).item()
    return results


def write_validation_heatmaps(model: nn.Module, val_set, cfg: Config, out_dir: Path) -> list[Path]:
    """Occlusion heatmaps and ``Z`` pictures of ``train.heatmap_images`` validation items, the same every time.

    The items are spread evenly over the validation set (a set sorted by class shows several classes).
    Returns the pictures written.
    """
    from .explain import write_evidence

    count = min(cfg.train.heatmap_images, len(val_set))
    indices = np.linspace(0, len(val_set) - 1, count).round().astype(int)
    picked = [(i, val_set[i]) for i in indices]
    picked = [(i, item) for i, item in picked if not isinstance(item[0], Skipped)]  # data.on_error: skip
    if not picked:
        return []
    indices, items = zip(*picked)
    batch, _ = collate_images(items)
    names = [f"val{i:04d}_label{label}" for i, (_, label) in zip(indices, items)]
    return write_evidence(model, batch, [image for image, _ in items], names, out_dir, out_dir,
                          class_names=[class_name(cfg, c) for c in range(cfg.data.num_classes)])[1]

def rng_states(generator: torch.Generator) -> dict:
    """Every random state a resumed run needs, as tensors and plain values (the safe loader reads them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "sampler": generator.get_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                        "cached_gaussian": gauss},
              "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    # .cpu(): the checkpoint is loaded with map_location=device, but RNG states must be CPU byte tensors.
    torch.set_rng_state(states["torch"].cpu())
    generator.set_state(states["sampler"].cpu())
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                           scaler) -> None:
    """Load a checkpoint's model, optimizer, scheduler and gradient scaler states."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # Recompute the current rate from the schedule as it is now built: the same value when nothing
    # changed, the stretched schedule's value at this step when train.epochs was raised.
    scheduler.last_epoch -= 1
    scheduler.step()
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``metrics.csv`` whole, atomically, from the run's rows (one per epoch, kept in the checkpoint)."""
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator of PatchGD's patch sampler."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint file atomically (best.pt is last.pt of its epoch: no second serialisation)."""
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def restore_run_files(run_dir: Path, state: dict) -> None:
    """Bring the files written after ``last.pt`` in line with it, for a run killed in between.

    ``metrics.csv`` is rewritten from the rows the checkpoint holds (a row written after it is dropped, a
    row not yet written is added), and ``best.pt`` is copied from ``last.pt`` when the checkpoint's own
    epoch was the best.
    """
    write_metrics(run_dir / "metrics.csv", state["metrics"])
    if state["best_epoch"] == state["epoch"]:
        copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt")


def check_resume(state: dict, cfg: Config, run_dir: Path) -> None:
    """Refuse to resume ``state`` under a config that differs from the one it was trained with.

    Only ``train.epochs`` may grow (to extend a run); ``output_dir`` is where the run is now. Both configs
    are compared resolved, so a key added to the schema since the checkpoint compares by its default.

    Raises:
        ConfigError: Listing every differing key with the checkpoint's value and the new one.
    """
    saved = config_to_dict(config_from_dict(state["config"], source=f"{run_dir / 'last.pt'} (its config)"))
    differences = config_differences(saved, config_to_dict(cfg))
    differences.pop("output_dir", None)
    old_epochs, new_epochs = differences.get("train.epochs", (0, 0))
    if new_epochs > old_epochs:
        del differences["train.epochs"]
    if differences:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in
                           ((k, *v) for k, v in differences.items()))
        raise ConfigError(f"--resume {run_dir}: the config differs from the one the run was trained with "
                          f"({listed}); only train.epochs may be raised. Start a new run to change anything else")


def train_loader_drops_last(num_images: int, batch_size: int) -> bool:
    """Whether the training loader drops its last batch: when it would hold a single image.

    A batch of one image whose sampled patches give a single value per channel fails in the backbone's
    BatchNorm (training mode needs more than one value); the images are reshuffled every epoch, so the one
    left out differs from epoch to epoch.
    """
    return batch_size > 1 and num_images % batch_size == 1


def describe_data(cfg: Config, train_set: ImageDataset, val_set: ImageDataset) -> str:
    """One line per class: its name and how many training and validation images it has."""
    train_counts = np.bincount(labels_of(train_set), minlength=cfg.data.num_classes)
    val_counts = np.bincount(labels_of(val_set), minlength=cfg.data.num_classes)
    lines = [f"data: {len(train_set)} train items from {origin_of(train_set)}, {len(val_set)} validation items "
             f"from {origin_of(val_set)}; {cfg.data.num_classes} classes"]
    lines += [f"  {class_name(cfg, c)}: {train_counts[c]} train / {val_counts[c]} val"
              for c in range(cfg.data.num_classes)]
    unknown = getattr(train_set, "unknown_mpp", []) + getattr(val_set, "unknown_mpp", [])
    if unknown:
        path, why = unknown[0]
        lines.append(f"  resolution: {len(unknown)} slide(s) with unknown microns per pixel, e.g. {path}: {why} "
                     "(give it with an mpp column in the CSV or data.slide_mpp)")
    return "\n".join(lines)


def describe_normalization(cfg: Config, model: nn.Module) -> str:
    """Which mean and std the model normalises pixels with, and where they came from."""
    mean, std = (model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist())
    if cfg.data.mean is not None or cfg.data.std is not None:
        why = "data.mean/data.std"
    elif cfg.model.pretrained_origin and cfg.model.pretrained_origin.get("file"):
        why = "the pretrained weights' own (timm's pretrained_cfg)"
    else:
        why = "none set: mean 0, std 1"
    return f"normalisation: mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]} ({why})"


def epoch_summary(epoch: int, cfg: Config, train_stats: dict, results: dict, elapsed: float) -> str:
    """The line logged after each epoch, memory peaks named as what they are."""
    process = (f", {train_stats['peak_process_name']} {format_size(train_stats['peak_process_bytes'])}"
               if train_stats["peak_process_name"] else "")
    return (f"epoch {epoch}/{cfg.train.epochs}  train loss {train_stats['train_loss']:.4f}  "
            f"val loss {results['loss']:.4f}  val acc {results['accuracy']:.4f}  qwk {results['qwk']:.4f}  "
            f"tensor peak {format_size(train_stats['peak_memory_bytes'])}{process}  {elapsed:.1f}s")


def log_epoch(logger: RunLogger, epoch: int, lr: float, train_stats: dict, results: dict) -> None:
    """An epoch's numbers as TensorBoard scalars."""
    logger.scalars({"loss/train": train_stats["train_loss"], "loss/val": results["loss"],
                    "accuracy/val": results["accuracy"], "qwk/val": results["qwk"], "lr": lr,
                    "memory/tensor_peak_bytes": train_stats["peak_memory_bytes"],
                    "memory/process_peak_bytes": train_stats["peak_process_bytes"]}, epoch)


def fit(cfg: Config, resume: str | Path | None = None, *, log=print) -> dict:
    """Train ``cfg`` (or resume the run in ``resume``), evaluating and checkpointing every epoch.

    The run directory (``cfg.output_dir``, or ``resume``) receives ``config.yaml`` (resolved: the classes
    found included), ``split.csv`` (which image trained and which validated), ``train.log``,
    ``metrics.csv``, ``last.pt``, ``best.pt``, ``eval.json`` (the last evaluation with its confusion
    matrix and per-class scores), ``learning_curves.png``, with ``train.tensorboard`` ``tensorboard/``, and,
    every ``train.heatmap_every`` epochs, ``heatmaps/epochNNN/`` (validation heatmaps and ``Z`` pictures).
    It is locked for the life of the run
    (:func:`patchgd.rundir.hold_run_dir`). Each epoch writes ``last.pt``, then ``best.pt``, then its metrics row.

    In a process group (``torchrun``, see :mod:`patchgd.distributed`) every process runs this function:
    the model trains under DistributedDataParallel on its shard of each epoch, evaluation is sharded and
    gathered, and rank 0 alone writes the run directory and logs.

    Args:
        cfg: The run's configuration. When resuming it must equal the checkpoint's, except for a larger
            ``train.epochs``.
        resume: A run directory whose ``last.pt`` to continue from, at the epoch after it.
        log: Where progress lines go (rank 0's only; besides ``train.log``).

    Returns:
        A summary: run directory, best and final validation accuracy, the best epoch, epochs run, the
        tensor peak memory and the resolved config.

    Raises:
        DivergenceError: A non-finite loss, parameter or validation output; the checkpoints on disk keep
            the last epoch whose weights were all finite.
        ConfigError: Resuming under a changed config.
    """
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(resume) if resume is not None else Path(cfg.output_dir)
    # Only rank 0 writes the run directory, so only it holds the lock; and it alone writes the log file and
    # TensorBoard events and prints: one switch for all of them.
    main = distributed.is_main()
    held = hold_run_dir(run_dir, fresh=resume is None, log=log) if main else contextlib.nullcontext()
    with held, RunLogger(run_dir if main else None, tensorboard=cfg.train.tensorboard, echo=log,
                         every=cfg.train.log_every, enabled=main) as logger:
        try:
            return _fit(cfg, run_dir, resume is not None, logger)
        except Exception as err:  # the caller reports it; the log keeps why the run stopped
            logger.log(f"stopped: {type(err).__name__}: {err}", show=False)
            raise


@dataclasses.dataclass
class TrainingRun:
    """What the epoch loop works with, built once from the config by :func:`build_run`."""

    cfg: Config
    device: torch.device
    model: nn.Module
    method: Any  # a PatchGD or GD step (patchgd.methods)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: ImageDataset | SequenceDataset
    val_set: ImageDataset | SequenceDataset
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any  # a DistributedSampler under torchrun, else None
    loader_generator: torch.Generator
    generator: torch.Generator  # PatchGD's patch sampler
    skips: SkipLog | None
    image_shape: tuple[int, ...]


@dataclasses.dataclass
class RunProgress:
    """Where a run stands between epochs: the epoch records so far (the rows of ``metrics.csv``) and the best."""

    history: list[dict] = dataclasses.field(default_factory=list)
    best_accuracy: float = -1.0
    best_epoch: int = 0
    peak_memory_bytes: int = 0

    @property
    def next_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1

    def add(self, record: dict) -> None:
        self.history = [*self.history, record]
        self.peak_memory_bytes = max(self.peak_memory_bytes, record["peak_memory_bytes"])
        if record["val_accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_epoch = record["val_accuracy"], record["epoch"]


def epoch_record(epoch: int, lr: float, train_stats: dict, results: dict, elapsed: float) -> dict:
    """An epoch's row of ``metrics.csv`` (:data:`METRIC_COLUMNS`), also kept in the checkpoint."""
    return {"epoch": epoch, "lr": lr, "train_loss": train_stats["train_loss"], "val_loss": results["loss"],
            "val_accuracy": results["accuracy"], "val_qwk": results["qwk"],
            "peak_memory_bytes": train_stats["peak_memory_bytes"],
            "peak_process_bytes": train_stats["peak_process_bytes"], "epoch_time_s": round(elapsed, 3)}


def _fit(cfg: Config, run_dir: Path, resuming: bool, logger: RunLogger) -> dict:
    log = logger.log
    device = distributed.local_device(resolve_device(cfg.train.device))
    cfg, train_set, val_set = build_data(cfg, resuming, log)
    state = None
    if resuming:
        state = load_resume_state(run_dir, device)
        cfg = config_for_resume(cfg, state, run_dir)
    run = build_run(cfg, device, train_set, val_set, run_dir, resuming, log)
    progress = resume_run(run, state, run_dir, log) if state is not None else RunProgress()
    start_run(run, run_dir, log)
    results, epoch = {}, progress.next_epoch - 1
    for epoch in range(progress.next_epoch, cfg.train.epochs + 1):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        train_stats, results = run_epoch(run, epoch, run_dir, logger)
        elapsed = time.perf_counter() - started
        progress.add(epoch_record(epoch, lr, train_stats, results, elapsed))
        write_epoch_files(run, progress, results, run_dir, logger)
        log(epoch_summary(epoch, cfg, train_stats, results, elapsed))
        log_epoch(logger, epoch, lr, train_stats, results)
        if cfg.train.patience is not None and epoch - progress.best_epoch >= cfg.train.patience:
            log(f"early stop: no better validation accuracy for {cfg.train.patience} epochs "
                f"(best {progress.best_accuracy:.4f} at epoch {progress.best_epoch})")
            break
    distributed.barrier()  # when fit returns on any process, the run directory is complete
    return {"run_dir": str(run_dir), "best_accuracy": progress.best_accuracy, "best_epoch": progress.best_epoch,
            "final_accuracy": results.get("accuracy"), "epochs": epoch,
            "peak_memory_bytes": progress.peak_memory_bytes, "config": run.cfg}


def build_data(cfg: Config, resuming: bool, log) -> tuple[Config, ImageDataset | SequenceDataset,
                                                           ImageDataset | SequenceDataset]:
    """The encoder's weights found (a new run), then the data sets and their classes; the config resolved."""
    if not resuming:  # before the data: a missing encoder is found in seconds, not after a pass over the data
        cfg = resolve_weights(cfg)
        if cfg.model.backbone != "conv1d":
            log(f"encoder: {describe_origin(cfg.model.pretrained_origin)}")
    train_set, val_set = build_datasets(cfg)
    cfg = resolve_classes(cfg, train_set, val_set)  # before check_resume: the saved config holds the classes
    log(describe_data(cfg, train_set, val_set))
    return cfg, train_set, val_set


def load_resume_state(run_dir: Path, device: torch.device) -> dict:
    """The checkpoint ``--resume`` continues from: the run's ``last.pt``."""
    if not (run_dir / "last.pt").is_file():
        raise FileNotFoundError(f"{run_dir} has no last.pt to resume from (its first epoch never finished); "
                                "start the run again without --resume")
    return load_checkpoint(run_dir / "last.pt", map_location=device)


def config_for_resume(cfg: Config, state: dict, run_dir: Path) -> Config:
    """``cfg`` as the resumed run continues it, refused if it differs from the checkpoint's."""
    # The encoder's origin was found when the run started; the checkpoint holds its weights since.
    saved_origin = state["config"].get("model", {}).get("pretrained_origin")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_origin=saved_origin))
    check_resume(state, cfg, run_dir)
    return dataclasses.replace(cfg, output_dir=str(run_dir))


def build_run(cfg: Config, device: torch.device, train_set, val_set, run_dir: Path, resuming: bool,
              log) -> TrainingRun:
    """Everything an epoch needs, in the order the random states require: the split file, the seeds, the
    skip log, the memory plan, the model, optimizer and method, the loaders and the schedule."""
    if distributed.is_main() and isinstance(train_set, ImageDataset):
        write_split(run_dir / SPLIT_FILE, cfg.data.root, train_set, val_set)
    generator = seed_everything(cfg.train.seed)
    skips = build_skip_log(cfg, train_set, val_set, log)
    first = first_item(train_set)
    lazy = isinstance(first, LazyImage)
    image_shape = item_shape(first)
    if cfg.method == "patchgd" and cfg.model.patch_size > min(image_shape[1:]):
        raise ValueError(f"model.patch_size={cfg.model.patch_size} is larger than the "
                         f"{'x'.join(map(str, image_shape[1:]))} images of {origin_of(train_set)}; "
                         f"expected at most {min(image_shape[1:])} px (a smaller patch, or no data.image_size downscaling)")
    if cfg.memory.budget is not None and not resuming:
        cfg = plan_run(cfg, train_set, image_shape, lazy, device, log)

    model = build_training_model(cfg, device, resuming, log)
    # The patch-parallel fill has every process work on the same images, hence the same random draws.
    shared = cfg.method == "patchgd" and cfg.patchgd.parallel_fill and distributed.world_size() > 1
    if shared and lazy:
        raise ValueError(f"patchgd.parallel_fill=true splits the fill of in-memory images; {train_set.paths[0]} is "
                         "read in pieces (a slide): leave parallel_fill off (each process fills its own slides)")
    if distributed.world_size() > 1 and not shared:  # other images per process: other dropout and cells
        generator = seed_everything(cfg.train.seed + 1_000_003 * distributed.rank())
    if cfg.method == "patchgd":
        # A slide's B * k over its whole grid could be thousands of patches: its evaluation fills one grid
        # row of every image per call (the model's default) unless fill_batch_size is set.
        model.fill_batch_size = cfg.patchgd.fill_batch_size or (None if lazy else patches_per_step(cfg, image_shape))
        if lazy and cfg.patchgd.patches_per_step is None:
            log(f"patchgd.sampling={cfg.patchgd.sampling} is a share of each slide's tissue cells: the patches that "
                "carry gradients, most of a step's memory, grow with the slides; patchgd.patches_per_step "
                "(e.g. 16) keeps memory the same for any slide")
    optimizer = build_optimizer(cfg, model)
    method = build_method(cfg, model, optimizer, generator)
    if shared:
        method.fill = functools.partial(distributed.parallel_fill, model)
    distributed.wrap(method)

    sampler = distributed.train_sampler(train_set, cfg.train.seed, shared=shared)
    loader_generator = torch.Generator()
    drop_last = train_loader_drops_last(len(sampler) if sampler is not None else len(train_set),
                                        cfg.train.batch_size)
    if drop_last:
        log(f"{len(train_set)} training images in batches of {cfg.train.batch_size} would leave a last batch "
            "of one image: it is dropped (a different image each epoch)")
    if isinstance(train_set, ImageDataset):
        train_set.transform = build_augmentation(cfg)
    train_loader = build_train_loader(cfg, train_set, loader_generator, sampler, drop_last)
    if len(train_loader) == 0:
        raise ValueError(f"{origin_of(train_set)}: {len(train_set)} training item(s); expected at least 2")
    val_loader = DataLoader(distributed.eval_shard(val_set),
                            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                            num_workers=cfg.data.num_workers, collate_fn=collate_images)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))  # batches per process = global steps
    return TrainingRun(cfg, device, model, method, optimizer, scheduler, train_set, val_set, train_loader,
                       val_loader, sampler, loader_generator, generator, skips, image_shape)


def build_skip_log(cfg: Config, train_set, val_set, log) -> SkipLog | None:
    """With ``data.on_error: skip``, the log of unreadable images (those left out while building the data
    sets already in it); None otherwise."""
    if cfg.data.on_error != "skip":
        return None
    if cfg.train.sync_batchnorm:
        raise ValueError("data.on_error=skip and train.sync_batchnorm=true cannot be combined: a step run "
                         "again without an unreadable image would repeat SyncBatchNorm's all-reduces on one "
                         "process only; choose one")
    skips = SkipLog(cfg.data.max_skipped, getattr(train_set, "excluded", []) + getattr(val_set, "excluded", []),
                    log=log)
    skips.check_data(len(train_set) + len(val_set))
    return skips


def plan_run(cfg: Config, train_set, image_shape: tuple[int, ...], lazy: bool, device: torch.device,
             log) -> Config:
    """``cfg`` with the batch (and sampling) that ``memory.budget`` allows, measured by the planner."""
    if lazy:
        raise ValueError(f"memory.budget={cfg.memory.budget!r}: the planner measures trial steps on whole "
                         f"images in memory, which a {image_shape[1]}x{image_shape[2]} slide of "
                         f"{train_set.paths[0]} must not be; set train.batch_size and patchgd.sampling instead")
    from .plan import plan_budget  # the planner measures trial steps: only when a budget asks for it

    # One process plans its own batch; all take its choice, so every process steps on equal batches.
    plan = plan_budget(cfg, image_shape, device, log=log) if distributed.is_main() else None
    plan = distributed.broadcast_object(plan)
    log(plan.describe())
    return plan.apply(cfg)


def build_training_model(cfg: Config, device: torch.device, resuming: bool, log) -> nn.Module:
    """The model on ``device``: its weights (a new run), the backbone's App. C start, SyncBatchNorm."""
    model = build_model(cfg, weights=not resuming)
    log(describe_normalization(cfg, model))
    if cfg.model.init_backbone is not None and not resuming:
        loaded = init_backbone(model, cfg.model.init_backbone)
        log(f"backbone initialised from {cfg.model.init_backbone}: {loaded} tensors")
    if cfg.train.sync_batchnorm:
        if cfg.patchgd.parallel_fill and cfg.method == "patchgd":
            # SyncBatchNorm all-reduces per chunk, and the parallel fill gives processes unequal chunk counts.
            raise ValueError("train.sync_batchnorm=true and patchgd.parallel_fill=true cannot be combined: the "
                             "processes would encode different numbers of fill chunks; choose one")
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def resume_run(run: TrainingRun, state: dict, run_dir: Path, log) -> RunProgress:
    """Load the checkpoint's model, optimizer, schedule and random states into ``run``; where it stood."""
    if state["steps_per_epoch"] != len(run.train_loader):
        raise ValueError(f"--resume {run_dir}: the training set gives {len(run.train_loader)} batches per epoch "
                         f"({len(run.train_set)} images) but gave {state['steps_per_epoch']} when the run "
                         "started; the learning-rate schedule depends on it. Start a new run")
    restore_training_state(state, run.model, run.optimizer, run.scheduler, run.method.scaler)
    per_rank = state.get("rng_ranks") or [state["rng"]]
    if len(per_rank) == distributed.world_size():
        restore_rng_states(per_rank[distributed.rank()], run.generator)
    else:
        log(f"warning: {run_dir / 'last.pt'} was written by {len(per_rank)} process(es), this run has "
            f"{distributed.world_size()}: random states start afresh, so the run continues but will not "
            "repeat an uninterrupted one")
    if distributed.is_main():
        restore_run_files(run_dir, state)
    progress = RunProgress(history=state["metrics"], best_accuracy=state["best_accuracy"],
                           best_epoch=state["best_epoch"])
    log(f"resuming {run_dir} at epoch {state['epoch'] + 1}")
    return progress


def start_run(run: TrainingRun, run_dir: Path, log) -> None:
    """Write the run's resolved ``config.yaml`` and say what trains on what."""
    cfg = run.cfg
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
    world = distributed.world_size()
    log(f"{cfg.method} on {run.device}{f' x {world} processes' if world > 1 else ''}: {len(run.train_set)} train / "
        f"{len(run.val_set)} val images of shape {'x'.join(map(str, run.image_shape))}, "
        f"{distributed.batch_note(cfg.train.batch_size)}, {cfg.train.epochs} epochs")


def run_epoch(run: TrainingRun, epoch: int, run_dir: Path, logger: RunLogger) -> tuple[dict, dict]:
    """Train one epoch, then evaluate: the training statistics and the evaluation results.

    Raises:
        DivergenceError: A non-finite loss, parameter or validation output, naming the checkpoint kept.
    """
    cfg = run.cfg
    run.loader_generator.manual_seed(cfg.train.seed * 1_000_003 + epoch)  # a resumed epoch shuffles alike
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    try:
        train_stats = train_one_epoch(run.method, run.train_loader, run.scheduler, epoch,
                                      measure_step=min(1, len(run.train_loader) - 1), logger=logger,
                                      global_step=(epoch - 1) * len(run.train_loader), skips=run.skips)
        distributed.broadcast_buffers(run.model)  # evaluate what rank 0 saves: its BatchNorm statistics
        results = evaluate(run.model, run.val_loader, run.device, cfg.data.num_classes, cfg.train.amp,
                           logger=logger, skips=run.skips, epoch=epoch)
        if run.skips is not None:  # the list first, so that a run stopped by the threshold leaves it
            run.skips.write(run_dir / SKIPPED_FILE)
            run.skips.end_epoch(epoch, train_stats["train_images"])
        if results["non_finite"]:
            raise DivergenceError(f"epoch {epoch}: {results['non_finite']} of {len(run.val_set)} validation "
                                  "images got non-finite logits (lower train.lr, or check the data: "
                                  "data.verify=full finds non-finite pixels)")
    except (DivergenceError, distributed.RankFailure) as err:
        kept = (f"the checkpoints in {run_dir} keep epoch {epoch - 1}, the last with finite weights"
                if epoch > 1 else "no checkpoint was written")
        raise DivergenceError(f"training diverged: {err}; {kept}") from None
    return train_stats, results


def write_epoch_files(run: TrainingRun, progress: RunProgress, results: dict, run_dir: Path,
                      logger: RunLogger) -> None:
    """The epoch's files (rank 0): ``last.pt``, ``best.pt``, ``metrics.csv``, ``eval.json``, the learning
    curves and, every ``train.heatmap_every`` epochs, the validation heatmaps."""
    cfg, epoch = run.cfg, progress.history[-1]["epoch"]
    rngs = distributed.gather_objects(rng_states(run.generator))  # every process takes part
    if not distributed.is_main():
        return
    world = distributed.world_size()
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(),
             "scaler": run.method.scaler.state_dict() if run.method.scaler else None,
             "epoch": epoch, "best_accuracy": progress.best_accuracy, "best_epoch": progress.best_epoch,
             "config": config_to_dict(cfg), "rng": rngs[0], "rng_ranks": rngs if world > 1 else None,
             "metrics": progress.history, "steps_per_epoch": len(run.train_loader)}
    # last.pt first, then best.pt as its copy, then the metrics row: a kill at any point leaves a last.pt
    # that the resume completes the rest from (see restore_run_files), never a row or a best.pt without
    # its weights.
    save_checkpoint(run_dir / "last.pt", state)
    if progress.best_epoch == epoch:
        copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt")
    write_metrics(run_dir / "metrics.csv", progress.history)
    with atomic_file(run_dir / "eval.json") as tmp:
        tmp.write_text(json.dumps({**results, "confusion": results["confusion"].tolist(), "epoch": epoch,
                                   "classes": cfg.data.classes}, indent=2))
    plot_learning_curves(run_dir / "metrics.csv", run_dir / "learning_curves.png", num_classes=cfg.data.num_classes)
    if cfg.method == "patchgd" and cfg.train.heatmap_every and epoch % cfg.train.heatmap_every == 0:
        try:
            pictures = write_validation_heatmaps(run.model, run.val_set, cfg, run_dir / "heatmaps" / f"epoch{epoch:03d}")
        except DataError as err:
            if run.skips is None:
                raise
            logger.log(f"heatmaps of epoch {epoch} not drawn: {err}")
            pictures = []
        for png in pictures:
            logger.image(f"heatmaps/{png.stem}", np.asarray(Image.open(png).convert("RGB")), epoch,
                         dataformats="HWC")
