"""One epoch of training (:func:`train_one_epoch`) and evaluation (:func:`evaluate`), the same for every
method, and the validation heatmaps drawn during training.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed
from ..config import Config
from ..data.datasets import collate_images
from ..data.errors import DataError, Skipped
from ..memory import PeakMemory, process_peak
from ..methods import autocast, classification_loss
from ..metrics import evaluate_predictions
from ..runlog import Progress, RunLogger
from ..skips import SkipLog, drop_skipped, run_skipping
from .data import class_name


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, parameter or validation output."""


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
    started = time.perf_counter()
    counter = EncodeCounter(method.model)
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
    counter.remove()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "peak_memory_bytes": peak,
            "peak_process_name": process[0], "peak_process_bytes": process[1], "train_images": seen,
            "train_time_s": time.perf_counter() - started, "encoded_with_grad": counter.counts[True],
            "encoded_no_grad": counter.counts[False]}


class EncodeCounter:
    """Patches a patch model's encoder encodes, with gradients and without (a GD model: none counted), until
    :meth:`remove`: what an epoch paid for its fill and its inner iterations."""

    def __init__(self, model: nn.Module):
        self.counts = {True: 0, False: 0}
        encoder = getattr(model, "backbone", None) if hasattr(model, "fill_z") else None
        encoder = getattr(encoder, "features", encoder)  # a timm encoder's own module: its features count too
        self.handle = encoder.register_forward_hook(self._count) if encoder is not None else None

    def _count(self, module, inputs, output) -> None:
        self.counts[torch.is_grad_enabled()] += len(output)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             amp: str | None = None, logger: RunLogger | None = None, skips: SkipLog | None = None,
             epoch: int = 0, split: str = "val") -> dict:
    """The metrics of ``model`` on ``loader`` (:func:`~patchgd.metrics.evaluate_predictions`: accuracy,
    balanced accuracy, macro-F1, AUROC, kappa, confusion matrix, per-class scores), its loss, and the
    ``logits`` and ``labels`` they come from (CPU tensors, in the set's order when nothing was skipped).

    PatchGD models infer as in Fig. 3b of the paper: fill ``Z`` in eval mode, then the head. With several
    processes, each ``loader`` holds a :func:`~patchgd.distributed.eval_shard`; the predictions of all are
    gathered in the set's order before the metrics, so every image counts exactly once. With ``skips``,
    images that cannot be read are recorded (in ``epoch``, as of ``split``) and left out of the metrics.
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
            skips.record(dropped + failed, epoch, split)
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
    results.update(loss=classification_loss(logits, labels).item(), logits=logits, labels=labels)
    return results


def write_validation_heatmaps(model: nn.Module, val_set, cfg: Config, out_dir: Path) -> list[Path]:
    """Occlusion heatmaps and ``Z`` pictures of ``train.heatmap_images`` validation items, the same every time.

    The items are spread evenly over the validation set (a set sorted by class shows several classes).
    Returns the pictures written.
    """
    from ..heatmaps import write_evidence

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
