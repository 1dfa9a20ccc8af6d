"""The trainer: :func:`fit`, a whole training run, read top to bottom.

Build the data, maybe resume, build the run (:class:`TrainingRun`), then per epoch train and evaluate
(:func:`run_epoch`) and write the epoch's files (:func:`write_epoch_files`); each step below is one named
call in that order. Every method (``patchgd``, ``gd``, ``gd-extended``) goes through the same loop.
The module is a little over 400 lines because those steps stand here in the order ``fit`` calls them, so
that a reader follows a run in one file; the builders they call live in :mod:`patchgd.engine.build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed
from ..checkpoint import CHECKPOINT_FORMAT, load_checkpoint, migrate_checkpoint, save_checkpoint
from ..config import Config, config_to_dict, save_config, validate
from ..registry import patch_method
from ..data.datasets import ImageDataset, collate_images
from ..data.errors import DataError
from ..data.lazy import LazyImage
from ..data.sequences import SequenceDataset
from ..io import atomic_file
from ..memory import format_size
from ..metrics import probabilities
from ..plots import plot_learning_curves
from ..model.pretrained import describe_origin
from ..rundir import (BEST_CHECKPOINT, CONFIG_FILE, CURVES_FILE, EVAL_FILE, LAST_CHECKPOINT, METRICS_FILE,
                      SKIPPED_FILE, SPLIT_FILE, TEST_FILE, TEST_PREDICTIONS_FILE, hold_run_dir)
from ..runlog import RunLogger
from ..skips import SkipLog
from .build import build_scheduler, describe_normalization, patches_per_step, resolve_device, resolve_weights
from .data import (build_datasets, build_test_set, check_patch_fits, class_name, describe_data, first_item,
                   image_name, item_shape, origin_of, resolve_classes, write_split)
from .loop import DivergenceError, evaluate, train_one_epoch, write_validation_heatmaps
from .plan import plan_budget
from .report import describe_scores, scores, write_pictures, write_predictions
from .setup import build_loaders, build_training, shares_batches
from .zcache import build_cache, check_cached_fill, commit_cache, save_cache
from .state import (RunProgress, check_resume, copy_checkpoint, epoch_record, restore_rng_states, restore_run_files,
                    restore_training_state, rng_states, write_metrics)


def epoch_summary(epoch: int, cfg: Config, train_stats: dict, results: dict, elapsed: float) -> str:
    """The line logged after each epoch, memory peaks named as what they are."""
    process = (f", {train_stats['peak_process_name']} {format_size(train_stats['peak_process_bytes'])}"
               if train_stats["peak_process_name"] else "")
    if results is None:
        val = f"not evaluated (train.eval_every={cfg.train.eval_every})"
    else:
        auroc = "-" if results["auroc"] is None else f"{results['auroc']:.4f}"
        val = (f"val loss {results['loss']:.4f}  val acc {results['accuracy']:.4f}  bal acc "
               f"{results['balanced_accuracy']:.4f}  auroc {auroc}  qwk {results['qwk']:.4f}")
    return (f"epoch {epoch}/{cfg.train.epochs}  train loss {train_stats['train_loss']:.4f}  {val}  "
            f"tensor peak {format_size(train_stats['peak_memory_bytes'])}{process}  {elapsed:.1f}s")


def log_epoch(logger: RunLogger, epoch: int, lr: float, train_stats: dict, results: dict) -> None:
    """An epoch's numbers as TensorBoard scalars."""
    if results is None:
        logger.scalars({"loss/train": train_stats["train_loss"], "lr": lr}, epoch)
        return
    logger.scalars({"loss/train": train_stats["train_loss"], "loss/val": results["loss"],
                    "accuracy/val": results["accuracy"], "balanced_accuracy/val": results["balanced_accuracy"],
                    "macro_f1/val": results["macro_f1"], "qwk/val": results["qwk"], "lr": lr,
                    **({"auroc/val": results["auroc"]} if results["auroc"] is not None else {}),
                    "memory/tensor_peak_bytes": train_stats["peak_memory_bytes"],
                    "memory/process_peak_bytes": train_stats["peak_process_bytes"]}, epoch)


def fit(cfg: Config, resume: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg`` (or resume the run in ``resume``), evaluating and checkpointing every epoch.

    The run directory (``cfg.output_dir``, or ``resume``) receives ``config.yaml`` (resolved: the classes
    found included), ``split.csv`` (which image trained and which validated), ``train.log``,
    ``metrics.csv``, ``last.pt``, ``best.pt``, ``eval.json`` (the last epoch's evaluation, that of
    ``last.pt``, with its confusion matrix and per-class scores; ``best_epoch`` names best.pt's epoch),
    ``learning_curves.png``, with ``train.tensorboard`` ``tensorboard/``, and, every
    ``train.heatmap_every`` epochs, ``heatmaps/epochNNN/`` (validation heatmaps and ``Z`` pictures).
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
        ConfigError: Keys that cannot go together (:func:`~patchgd.config.validate`: a config built in Python
            has not been read through it), or resuming under a changed config.
    """
    validate(cfg)
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
    test_set: ImageDataset | None
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any  # a DistributedSampler under torchrun, else None
    loader_generator: torch.Generator
    generator: torch.Generator  # PatchGD's patch sampler
    skips: SkipLog | None
    image_shape: tuple[int, ...]


def _fit(cfg: Config, run_dir: Path, resuming: bool, logger: RunLogger) -> dict:
    log = logger.log
    device = distributed.local_device(resolve_device(cfg.train.device))
    cfg, train_set, val_set, test_set = build_data(cfg, resuming, log)
    state = None
    if resuming:
        state = load_resume_state(run_dir, device)
        cfg = config_for_resume(cfg, state, run_dir)
    run = build_run(cfg, device, train_set, val_set, test_set, run_dir, state, log)
    progress = resume_run(run, state, run_dir, log) if state is not None else RunProgress(cfg.train.monitor)
    start_run(run, run_dir, log)
    results, epoch = None, progress.next_epoch - 1
    for epoch in range(progress.next_epoch, cfg.train.epochs + 1):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        train_stats, results = run_epoch(run, epoch, run_dir, logger)
        elapsed = time.perf_counter() - started
        progress.add(epoch_record(epoch, lr, train_stats, results, elapsed))
        write_epoch_files(run, progress, results, run_dir, logger)
        log(epoch_summary(epoch, cfg, train_stats, results, elapsed))
        log_epoch(logger, epoch, lr, train_stats, results)
        if cfg.train.patience is not None and progress.evaluations_since_best >= cfg.train.patience:
            log(f"early stop: no better validation {cfg.train.monitor} for {cfg.train.patience} epochs "
                f"(best {progress.best_value:.4f} at epoch {progress.best_epoch})")
            break
    test = score_test_set(run, run_dir, progress, log) if run.test_set is not None else None
    distributed.barrier()  # when fit returns on any process, the run directory is complete
    return {"run_dir": str(run_dir), "best_accuracy": progress.best["val_accuracy"], "best_epoch": progress.best_epoch,
            "monitor": cfg.train.monitor, "best_value": progress.best_value,
            "final_accuracy": results["accuracy"] if results else None,
            "epochs": epoch, "peak_memory_bytes": progress.peak_memory_bytes, "test": test, "config": run.cfg}


def build_data(cfg: Config, resuming: bool, log) -> tuple[Config, ImageDataset | SequenceDataset,
                                                           ImageDataset | SequenceDataset, ImageDataset | None]:
    """The encoder's weights found (a new run), then the data sets (the test set, if any) and their classes;
    the config resolved."""
    if not resuming:  # before the data: a missing encoder is found in seconds, not after a pass over the data
        cfg = resolve_weights(cfg)
        if cfg.model.backbone != "conv1d":
            log(f"encoder: {describe_origin(cfg.model.pretrained_origin)}")
    train_set, val_set = build_datasets(cfg, augment=True)
    cfg = resolve_classes(cfg, train_set, val_set)  # before check_resume: the saved config holds the classes
    test_set = build_test_set(cfg, train_set, val_set)
    log(describe_data(cfg, train_set, val_set))
    if test_set is not None:
        log(f"test: {len(test_set)} items from {origin_of(test_set)}, held out from training and model selection: "
            f"best.pt scores them once, at the end")
    return cfg, train_set, val_set, test_set


def load_resume_state(run_dir: Path, device: torch.device) -> dict:
    """The checkpoint ``--resume`` continues from: the run's ``last.pt``."""
    if not (run_dir / LAST_CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir} has no last.pt to resume from (its first epoch never finished); "
                                "start the run again without --resume")
    return migrate_checkpoint(load_checkpoint(run_dir / LAST_CHECKPOINT, map_location=device), run_dir / LAST_CHECKPOINT,
                              warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def config_for_resume(cfg: Config, state: dict, run_dir: Path) -> Config:
    """``cfg`` as the resumed run continues it, refused if it differs from the checkpoint's."""
    # The encoder's origin was found when the run started; the checkpoint holds its weights since.
    saved_origin = state["config"].get("model", {}).get("pretrained_origin")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_origin=saved_origin))
    check_resume(state, cfg, run_dir)
    return dataclasses.replace(cfg, output_dir=str(run_dir))


def build_run(cfg: Config, device: torch.device, train_set, val_set, test_set, run_dir: Path, state: dict | None,
              log) -> TrainingRun:
    """Everything an epoch needs: the split file, the skip log, the memory plan, then the run setup
    (:mod:`patchgd.engine.setup`: seeds, model, optimizer, step, loaders); then, resuming from the checkpoint
    ``state``, its weights and optimizer; last the schedule, at the step count the run stands at."""
    resuming = state is not None
    if distributed.is_main() and isinstance(train_set, ImageDataset):
        write_split(run_dir / SPLIT_FILE, cfg.data.root, train_set, val_set, test_set)
    skips = build_skip_log(cfg, train_set, val_set, run_dir, log)
    first = first_item(train_set)
    lazy = isinstance(first, LazyImage)
    image_shape = item_shape(first)
    check_patch_fits(cfg, image_shape, origin_of(train_set))
    if cfg.memory.budget is not None and not resuming:
        cfg = plan_run(cfg, train_set, image_shape, lazy, device, log)
    if cfg.patchgd.fill == "cached":
        check_cached_fill(cfg)
    if shares_batches(cfg) and lazy:
        raise ValueError(f"patchgd.parallel_fill=true splits the fill of in-memory images; {train_set.paths[0]} is "
                         "read in pieces (a slide): leave parallel_fill off (each process fills its own slides)")
    if patch_method(cfg.method) and lazy and cfg.patchgd.patches_per_step is None:
        log(f"patchgd.sampling={cfg.patchgd.sampling} is a share of each slide's tissue cells: the patches that "
            "carry gradients, most of a step's memory, grow with the slides; patchgd.patches_per_step "
            "(e.g. 16) keeps memory the same for any slide")
    cache = functools.partial(build_cache, cfg, train_set=train_set, run_dir=run_dir, state=state, log=log) \
        if cfg.patchgd.fill == "cached" else None
    training = build_training(cfg, device, weights=not resuming, cache=cache, log=log)
    check_batchnorm_values(cfg, training.model, image_shape, origin_of(train_set))
    loaders = build_loaders(cfg, train_set, val_set, log)
    steps_done = 0
    if resuming:
        steps_done = restore_training(state, run_dir, training.model, training.optimizer, training.method,
                                      len(loaders.train), len(train_set))
        training.method.steps = steps_done  # when the cached codes to come are made
    log(describe_normalization(cfg, training.model))  # after a resume's restore: the checkpoint's statistics
    # batches per process = global steps
    scheduler = build_scheduler(cfg, training.optimizer, len(loaders.train), steps_done=steps_done)
    return TrainingRun(cfg, device, training.model, training.method, training.optimizer, scheduler, train_set,
                       val_set, test_set, loaders.train, loaders.val, loaders.sampler, loaders.generator,
                       training.generator, skips, image_shape)


def check_batchnorm_values(cfg: Config, model: nn.Module, image_shape: tuple[int, ...], origin: str) -> None:
    """Refuse a PatchGD step whose inner iterations give the backbone's trainable BatchNorm one value per channel."""
    if patch_method(cfg.method) and patches_per_step(cfg, image_shape) == 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
            for m in model.backbone.modules()):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} image(s) x 1 sampled patch per inner iteration "
                         f"(patchgd.sampling={cfg.patchgd.sampling} of the {'x'.join(map(str, image_shape[1:]))} "
                         f"images of {origin}) gives the backbone's BatchNorm a single value per "
                         "channel, which it cannot normalise in training; raise train.batch_size, "
                         "patchgd.sampling or patchgd.patches_per_step")


def score_test_set(run: TrainingRun, run_dir: Path, progress: RunProgress, log) -> dict:
    """``best.pt`` on the test set, once, at the end of the run (every process evaluates its shard; rank 0
    writes): ``test.json`` (every metric with its bootstrap interval, by patient where there are groups),
    ``test_predictions.csv`` (one row per image), ``test_roc.png`` and ``test_confusion.png``. Returns the
    scores."""
    cfg = run.cfg
    distributed.barrier()  # rank 0 has written best.pt
    state = load_checkpoint(run_dir / BEST_CHECKPOINT, map_location=run.device)
    run.model.load_state_dict(state["model"])
    loader = DataLoader(distributed.eval_shard(run.test_set), batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                        num_workers=cfg.data.num_workers, collate_fn=collate_images)
    logger = RunLogger(None, echo=lambda line: None)
    results = evaluate(run.model, loader, run.device, cfg.data.num_classes, cfg.train.amp, logger=logger,
                       skips=run.skips, epoch=state["epoch"], split="test")
    complete = len(results["labels"]) == len(run.test_set)  # else skipped images broke the order
    classes = [class_name(cfg, c) for c in range(cfg.data.num_classes)]
    out = {**scores(results, classes, resamples=cfg.train.bootstrap, seed=cfg.train.seed,
                    groups=run.test_set.groups if complete else None),
           "checkpoint": BEST_CHECKPOINT, "epoch": state["epoch"], "monitor": cfg.train.monitor}
    if distributed.is_main():
        with atomic_file(run_dir / TEST_FILE) as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        if complete:
            write_predictions(run_dir / TEST_PREDICTIONS_FILE, [image_name(cfg.data.root, p) for p in run.test_set.paths],
                              probabilities(results["logits"]), classes, results["labels"], run.test_set.groups)
        write_pictures(run_dir, "test_", results, classes, f"test, best.pt (epoch {state['epoch']})")
    log(f"test (best.pt, epoch {state['epoch']}): {describe_scores(out)}")
    return out


def build_skip_log(cfg: Config, train_set, val_set, run_dir: Path, log) -> SkipLog | None:
    """With ``data.on_error: skip``, the log of unreadable images (those left out while building the data
    sets already in it); None otherwise."""
    if cfg.data.on_error != "skip":
        return None
    skips = SkipLog(cfg.data.max_skipped, getattr(train_set, "excluded", []), getattr(val_set, "excluded", []),
                    path=run_dir / SKIPPED_FILE, log=log)
    skips.check_data(len(train_set))
    return skips


def plan_run(cfg: Config, train_set, image_shape: tuple[int, ...], lazy: bool, device: torch.device,
             log) -> Config:
    """``cfg`` with the batch (and sampling) that ``memory.budget`` allows, measured by the planner."""
    if lazy:
        raise ValueError(f"memory.budget={cfg.memory.budget!r}: the planner measures trial steps on whole "
                         f"images in memory, which a {image_shape[1]}x{image_shape[2]} slide of "
                         f"{train_set.paths[0]} must not be; set train.batch_size and patchgd.sampling instead")
    # One process plans its own batch; all take its choice, so every process steps on equal batches.
    plan = plan_budget(cfg, image_shape, device, log=log) if distributed.is_main() else None
    plan = distributed.broadcast_object(plan)
    log(plan.describe())
    return plan.apply(cfg)


def restore_training(state: dict, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, method,
                     steps_per_epoch: int, images: int) -> int:
    """Load the checkpoint's model, optimizer and gradient scaler states; the optimizer steps taken."""
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"--resume {run_dir}: the training set gives {steps_per_epoch} batches per epoch "
                         f"({images} images) but gave {state['steps_per_epoch']} when the run "
                         "started; the learning-rate schedule depends on it. Start a new run")
    restore_training_state(state, model, optimizer, method.scaler)
    return state["epoch"] * steps_per_epoch


def resume_run(run: TrainingRun, state: dict, run_dir: Path, log) -> RunProgress:
    """Restore the checkpoint's random states and run files (its weights are in ``run`` already, see
    :func:`build_run`); where the run stood."""
    per_rank = state.get("rng_ranks") or [state["rng"]]
    if len(per_rank) == distributed.world_size():
        restore_rng_states(per_rank[distributed.rank()], run.generator)
    else:
        log(f"warning: {run_dir / 'last.pt'} was written by {len(per_rank)} process(es), this run has "
            f"{distributed.world_size()}: random states start afresh, so the run continues but will not "
            "repeat an uninterrupted one")
    if distributed.is_main():
        restore_run_files(run_dir, state)
    progress = RunProgress(run.cfg.train.monitor, history=state["metrics"])
    log(f"resuming {run_dir} at epoch {state['epoch'] + 1}")
    return progress


def start_run(run: TrainingRun, run_dir: Path, log) -> None:
    """Write the run's resolved ``config.yaml`` and say what trains on what."""
    cfg = run.cfg
    if distributed.is_main():
        save_config(cfg, run_dir / CONFIG_FILE)
    world = distributed.world_size()
    log(f"{cfg.method} on {run.device}{f' x {world} processes' if world > 1 else ''}: {len(run.train_set)} train / "
        f"{len(run.val_set)} val images of shape {'x'.join(map(str, run.image_shape))}, "
        f"{distributed.batch_note(cfg.train.batch_size)}, {cfg.train.epochs} epochs")


def run_epoch(run: TrainingRun, epoch: int, run_dir: Path, logger: RunLogger) -> tuple[dict, dict | None]:
    """Train one epoch, then evaluate (every ``train.eval_every`` epochs and after the last): the training
    statistics and the evaluation results (None when not evaluated).

    Raises:
        DivergenceError: A non-finite loss, parameter or validation output, naming the checkpoint kept.
    """
    cfg = run.cfg
    run.loader_generator.manual_seed(cfg.train.seed * 1_000_003 + epoch)  # a resumed epoch shuffles alike
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    cache = getattr(run.method, "cache", None)
    if cache is not None:
        cache.begin_epoch(epoch, len(run.train_loader), cfg.patchgd.refresh_epochs)
    try:
        train_stats = train_one_epoch(run.method, run.train_loader, run.scheduler, epoch,
                                      measure_step=min(1, len(run.train_loader) - 1), logger=logger,
                                      global_step=(epoch - 1) * len(run.train_loader), skips=run.skips)
        if run.skips is not None:  # writes the list, also when the threshold stops the run
            run.skips.end_epoch(epoch, train_stats["train_images"])
        if epoch % cfg.train.eval_every and epoch != cfg.train.epochs:
            return train_stats, None  # train.eval_every: no evaluation this epoch
        distributed.broadcast_buffers(run.model)  # evaluate what rank 0 saves: its BatchNorm statistics
        results = evaluate(run.model, run.val_loader, run.device, cfg.data.num_classes, cfg.train.amp,
                           logger=logger, skips=run.skips, epoch=epoch)
        if results["non_finite"]:
            raise DivergenceError(f"epoch {epoch}: {results['non_finite']} of {len(run.val_set)} validation "
                                  "images got non-finite logits (lower train.lr, or check the data: "
                                  "data.verify=full finds non-finite pixels)")
    except (DivergenceError, distributed.RankFailure) as err:
        kept = (f"the checkpoints in {run_dir} keep epoch {epoch - 1}, the last with finite weights"
                if epoch > 1 else "no checkpoint was written")
        raise DivergenceError(f"training diverged: {err}; {kept}") from None
    return train_stats, results


def write_epoch_files(run: TrainingRun, progress: RunProgress, results: dict | None, run_dir: Path,
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
             "format": CHECKPOINT_FORMAT, "epoch": epoch, "best_epoch": progress.best_epoch,
             "config": config_to_dict(cfg), "rng": rngs[0], "rng_ranks": rngs if world > 1 else None,
             "metrics": progress.history, "steps_per_epoch": len(run.train_loader)}
    # last.pt first, then best.pt as its copy, then the metrics row: a kill at any point leaves a last.pt
    # that the resume completes the rest from (see restore_run_files), never a row or a best.pt without
    # its weights.
    cache = getattr(run.method, "cache", None)
    if cache is not None:
        save_cache(cache, run_dir, epoch)
    save_checkpoint(run_dir / LAST_CHECKPOINT, state)
    if cache is not None:
        commit_cache(cache, run_dir, epoch)
    if progress.best_epoch == epoch:
        copy_checkpoint(run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT)
    write_metrics(run_dir / METRICS_FILE, progress.history)
    if results is None:  # not evaluated this epoch (train.eval_every)
        return
    classes = [class_name(cfg, c) for c in range(cfg.data.num_classes)]
    with atomic_file(run_dir / EVAL_FILE) as tmp:
        # The epoch of last.pt; best.pt may hold an earlier one, which "best_epoch" names.
        tmp.write_text(json.dumps({**scores(results, classes), "epoch": epoch, "checkpoint": LAST_CHECKPOINT,
                                   "best_epoch": progress.best_epoch, "monitor": cfg.train.monitor}, indent=2))
    write_pictures(run_dir, "", results, classes, f"validation, epoch {epoch}")
    plot_learning_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE, num_classes=cfg.data.num_classes,
                         best_epoch=progress.best_epoch)
    if patch_method(cfg.method) and cfg.train.heatmap_every and epoch % cfg.train.heatmap_every == 0:
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
