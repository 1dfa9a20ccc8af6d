"""The training loop: build everything from a :class:`~patchgd.config.Config`, train, evaluate, checkpoint.

Read top to bottom: builders, :func:`train_one_epoch`, :func:`evaluate`, checkpoints, then :func:`fit`,
which ties them together. Every method (``patchgd``, ``gd``, ``gd-extended``) goes through the same loop.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .config import Config, config_to_dict, save_config
from .data.datasets import ImageCSVDataset, per_channel
from .data.sequences import SequenceDataset
from .grid import PatchGrid
from .io import atomic_file
from .memory import PeakMemory, format_size
from .methods import autocast, classification_loss, create_method, create_model, patches_per_iteration
from .metrics import evaluate_predictions
from .plots import plot_learning_curves

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_qwk", "peak_memory_bytes",
                  "epoch_time_s"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def build_datasets(cfg: Config) -> tuple[ImageCSVDataset | SequenceDataset, ImageCSVDataset | SequenceDataset]:
    """Train and validation sets from ``data.*``: two CSVs, or one CSV split by its kfold column; or, with
    ``data.kind: sequences``, ``train.npz`` and ``val.npz``."""
    if cfg.data.root is None:
        raise ValueError("data.root is not set: point it at the folder holding the CSVs and images")
    root = Path(cfg.data.root)
    if cfg.data.kind == "sequences":
        return tuple(SequenceDataset(root / f"{split}.npz", cfg.data.num_classes, cfg.model.in_chans)
                     for split in ("train", "val"))
    common = dict(num_classes=cfg.data.num_classes, label_column=cfg.data.label_column,
                  in_chans=cfg.model.in_chans, image_size=cfg.data.image_size, mean=cfg.data.mean,
                  std=cfg.data.std)
    if cfg.data.val_csv is None:
        if cfg.data.fold is None:
            raise ValueError("data.val_csv is null but data.fold is not set: name a validation CSV or a fold")
        csv_path, image_dir = root / cfg.data.train_csv, root / cfg.data.train_dir
        return (ImageCSVDataset(csv_path, image_dir, fold=cfg.data.fold, split="train", **common),
                ImageCSVDataset(csv_path, image_dir, fold=cfg.data.fold, split="val", **common))
    return (ImageCSVDataset(root / cfg.data.train_csv, root / cfg.data.train_dir, **common),
            ImageCSVDataset(root / cfg.data.val_csv, root / cfg.data.val_dir, **common))


def build_model(cfg: Config) -> nn.Module:
    """The model ``cfg.method`` trains, on the CPU."""
    m = cfg.model
    return create_model(cfg.method, m.backbone, cfg.data.num_classes, patch_size=m.patch_size,
                        latent_dim=m.latent_dim, in_chans=m.in_chans, pretrained=m.pretrained, head=m.head,
                        head_width=m.head_width, head_dropout=m.head_dropout, head_depth=m.head_depth,
                        head_heads=m.head_heads, pad_value=cfg.data.pad_value,
                        image_size=cfg.data.image_size, channels_last=m.channels_last)


def init_backbone(model: nn.Module, path: str | Path) -> int:
    """Load the backbone weights of a checkpoint or state-dict file into ``model``'s backbone (App. C).

    Keys are matched by name after the wrapper prefixes (``backbone.``, ``backbone.features.``) are
    dropped, so a GD run's timm backbone initialises PatchGD's ``backbone.features``; the source's
    classifier and head, which the target lacks, are ignored. Returns the number of tensors loaded.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    target = getattr(model.backbone, "features", model.backbone)
    wanted = target.state_dict()
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


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the paper's), AdamW or SGD with momentum over all parameters."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    optimizer = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


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
    return create_method(cfg.method, model, optimizer, amp=cfg.train.amp, sampling=p.sampling,
                         max_sampled=p.max_sampled, inner_iterations=p.inner_iterations,
                         grad_accum_steps=p.grad_accum_steps, fill_mode=p.fill_mode,
                         fill_batch_size=p.fill_batch_size, generator=generator)


def patches_per_step(cfg: Config, image_shape: tuple[int, ...]) -> int:
    """Patches a PatchGD inner iteration holds with gradients: ``B * k``; also its default fill chunk.

    ``image_shape`` is one item's ``(C, H, W)`` (or a sequence's ``(C, L)``).
    """
    cells = PatchGrid(torch.empty(1, *image_shape, device="meta"), cfg.model.patch_size).num_cells
    return cfg.train.batch_size * patches_per_iteration(cfg.patchgd.sampling, cells)


def train_one_epoch(method, loader: DataLoader, scheduler, epoch: int, measure_step: int) -> dict:
    """One pass over ``loader``; the step at index ``measure_step`` is measured for peak memory.

    With several processes, each step's loss is the mean over all of them, and a non-finite loss on any
    one stops every process (:func:`patchgd.distributed.mean_loss`).
    """
    losses, peak = [], 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not distributed.is_main())
    for i, (images, labels) in enumerate(bar):
        if i == measure_step:
            with PeakMemory(method.device, baseline=(method.model, method.optimizer, images)) as meter:
                stats = method.step(images, labels)
            peak = meter.peak_bytes
        else:
            stats = method.step(images, labels)
        scheduler.step()
        losses.append(distributed.mean_loss(stats["loss"], f"epoch {epoch}, step {i + 1}"))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return {"train_loss": float(np.mean(losses)), "peak_memory_bytes": peak}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             amp: str | None = None) -> dict:
    """Loss, accuracy, quadratic weighted kappa and confusion matrix of ``model`` on ``loader``.

    PatchGD models infer as in Fig. 3b of the paper: fill ``Z`` in eval mode, then the head. With several
    processes, each ``loader`` holds a :func:`~patchgd.distributed.eval_shard`; the predictions of all are
    gathered in the set's order before the metrics, so every image counts exactly once.
    """
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                               disable=not distributed.is_main()):
        with autocast(device, amp):
            all_logits.append(model(images.to(device)).float().cpu())
        all_labels.append(labels)
    # A shard can be empty when the set is smaller than the number of processes.
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, num_classes)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    logits, labels = distributed.gather_in_order(logits), distributed.gather_in_order(labels)
    results = evaluate_predictions(logits, labels, num_classes)
    results["loss"] = classification_loss(logits, labels).item()
    return results


def write_validation_heatmaps(model: nn.Module, val_set, cfg: Config, out_dir: Path) -> list[Path]:
    """Occlusion heatmaps and ``Z`` pictures of ``train.heatmap_images`` validation items, the same every time.

    The items are spread evenly over the validation set (a set sorted by class shows several classes) and
    drawn on their pixels before normalisation (sequences as they are). Returns the pictures written.
    """
    from .explain import write_evidence

    count = min(cfg.train.heatmap_images, len(val_set))
    indices = np.linspace(0, len(val_set) - 1, count).round().astype(int)
    items = [val_set[i] for i in indices]
    images = torch.stack([image for image, _ in items])
    displays = list(images)
    if cfg.data.kind == "images":
        channels = cfg.model.in_chans
        mean = per_channel(cfg.data.mean, 0.0, channels, "mean")
        std = per_channel(cfg.data.std, 1.0, channels, "std")
        displays = [image * std + mean for image in images]
    names = [f"val{i:04d}_label{label}" for i, (_, label) in zip(indices, items)]
    return write_evidence(model, images, displays, names, out_dir, out_dir)[1]


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` written atomically, so an interrupted save never corrupts the last good one."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def rng_states(generator: torch.Generator) -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "sampler": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    generator.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def append_metrics(path: Path, row: dict) -> None:
    """Add one epoch to ``metrics.csv`` (the file is rewritten whole, atomically)."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    rows.append(row)
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


def fit(cfg: Config, resume: str | Path | None = None, *, log=print) -> dict:
    """Train ``cfg`` (or resume the run in ``resume``), evaluating and checkpointing every epoch.

    The run directory (``cfg.output_dir``, or ``resume``) receives ``config.yaml`` (resolved),
    ``metrics.csv``, ``last.pt``, ``best.pt``, ``eval.json`` (the last evaluation with its confusion
    matrix), ``learning_curves.png`` and, every ``train.heatmap_every`` epochs, ``heatmaps/epochNNN/``
    (validation heatmaps and ``Z`` pictures).

    In a process group (``torchrun``, see :mod:`patchgd.distributed`) every process runs this function:
    the model trains under DistributedDataParallel on its shard of each epoch, evaluation is sharded and
    gathered, and rank 0 alone writes the run directory and logs.

    Args:
        cfg: The run's configuration.
        resume: A run directory whose ``last.pt`` to continue from, at the epoch after it.
        log: Where progress lines go (rank 0's only).

    Returns:
        A summary: run directory, best and final validation accuracy, epochs run and the peak memory.
    """
    log = distributed.log_main(log)
    run_dir = Path(resume) if resume is not None else Path(cfg.output_dir)
    if resume is None and (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run (last.pt); resume it with --resume {run_dir} "
                              "or choose another output_dir")
    device = distributed.local_device(resolve_device(cfg.train.device))
    generator = seed_everything(cfg.train.seed)
    train_set, val_set = build_datasets(cfg)
    image_shape = tuple(train_set[0][0].shape)
    if cfg.method == "patchgd" and cfg.model.patch_size > min(image_shape[1:]):
        raise ValueError(f"model.patch_size={cfg.model.patch_size} is larger than the "
                         f"{'x'.join(map(str, image_shape[1:]))} images of {getattr(train_set, 'csv_path', cfg.data.root)}; "
                         f"expected at most {min(image_shape[1:])} px (a smaller patch, or no data.image_size downscaling)")
    if cfg.memory.budget is not None and resume is None:
        from .plan import plan_budget  # the planner measures trial steps: only when a budget asks for it

        # One process plans its own batch; all take its choice, so every process steps on equal batches.
        plan = plan_budget(cfg, image_shape, device) if distributed.is_main() else None
        plan = distributed.broadcast_object(plan)
        log(plan.describe())
        cfg = plan.apply(cfg)

    model = build_model(cfg)
    if cfg.model.init_backbone is not None and resume is None:
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
    # The patch-parallel fill has every process work on the same images, hence the same random draws.
    shared = cfg.method == "patchgd" and cfg.patchgd.parallel_fill and distributed.world_size() > 1
    if distributed.world_size() > 1 and not shared:  # other images per process: other dropout and cells
        generator = seed_everything(cfg.train.seed + 1_000_003 * distributed.rank())
    if cfg.method == "patchgd":
        model.fill_batch_size = cfg.patchgd.fill_batch_size or patches_per_step(cfg, image_shape)
    optimizer = build_optimizer(cfg, model)
    method = build_method(cfg, model, optimizer, generator)
    if shared:
        method.fill = functools.partial(distributed.parallel_fill, model)
    distributed.wrap(method)
    sampler = distributed.train_sampler(train_set, cfg.train.seed, shared=shared)
    loader_generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=cfg.data.num_workers, generator=loader_generator)
    val_loader = DataLoader(distributed.eval_shard(val_set),
                            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                            num_workers=cfg.data.num_workers)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))  # batches per process = global steps

    start_epoch, best_accuracy = 1, -1.0
    if resume is not None:
        state = torch.load(run_dir / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if method.scaler is not None and state.get("scaler"):
            method.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_ranks") or [state["rng"]]
        if len(per_rank) == distributed.world_size():
            restore_rng_states(per_rank[distributed.rank()], generator)
        else:
            log(f"warning: {run_dir / 'last.pt'} was written by {len(per_rank)} process(es), this run has "
                f"{distributed.world_size()}: random states start afresh, so the run continues but will not "
                "repeat an uninterrupted one")
        start_epoch, best_accuracy = state["epoch"] + 1, state["best_accuracy"]
        log(f"resuming {run_dir} at epoch {start_epoch}")
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
    world = distributed.world_size()
    log(f"{cfg.method} on {device}{f' x {world} processes' if world > 1 else ''}: {len(train_set)} train / "
        f"{len(val_set)} val images of shape {'x'.join(map(str, image_shape))}, "
        f"{distributed.batch_note(cfg.train.batch_size)}, {cfg.train.epochs} epochs")

    results, peak = {}, 0
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        started = time.perf_counter()
        loader_generator.manual_seed(cfg.train.seed * 1_000_003 + epoch)  # a resumed epoch shuffles alike
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(method, train_loader, scheduler, epoch,
                                      measure_step=min(1, len(train_loader) - 1))
        distributed.broadcast_buffers(model)  # evaluate what rank 0 saves: its BatchNorm statistics
        results = evaluate(model, val_loader, device, cfg.data.num_classes, cfg.train.amp)
        elapsed = time.perf_counter() - started
        peak = max(peak, train_stats["peak_memory_bytes"])
        rngs = distributed.gather_objects(rng_states(generator))
        if distributed.is_main():
            append_metrics(run_dir / "metrics.csv", {
                "epoch": epoch, "lr": lr, "train_loss": train_stats["train_loss"], "val_loss": results["loss"],
                "val_accuracy": results["accuracy"], "val_qwk": results["qwk"],
                "peak_memory_bytes": train_stats["peak_memory_bytes"], "epoch_time_s": round(elapsed, 3)})
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "scaler": method.scaler.state_dict() if method.scaler else None,
                     "epoch": epoch, "best_accuracy": max(best_accuracy, results["accuracy"]),
                     "config": config_to_dict(cfg), "rng": rngs[0], "rng_ranks": rngs if world > 1 else None}
            if results["accuracy"] > best_accuracy:
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(run_dir / "last.pt", state)
            with atomic_file(run_dir / "eval.json") as tmp:
                tmp.write_text(json.dumps({**results, "confusion": results["confusion"].tolist(), "epoch": epoch},
                                          indent=2))
            plot_learning_curves(run_dir / "metrics.csv", run_dir / "learning_curves.png")
            if cfg.method == "patchgd" and cfg.train.heatmap_every and epoch % cfg.train.heatmap_every == 0:
                write_validation_heatmaps(model, val_set, cfg, run_dir / "heatmaps" / f"epoch{epoch:03d}")
        best_accuracy = max(best_accuracy, results["accuracy"])
        log(f"epoch {epoch}/{cfg.train.epochs}  train loss {train_stats['train_loss']:.4f}  "
            f"val loss {results['loss']:.4f}  val acc {results['accuracy']:.4f}  qwk {results['qwk']:.4f}  "
            f"peak {format_size(train_stats['peak_memory_bytes'])}  {elapsed:.1f}s")
    distributed.barrier()  # when fit returns on any process, the run directory is complete

    return {"run_dir": str(run_dir), "best_accuracy": best_accuracy,
            "final_accuracy": results.get("accuracy"), "epochs": cfg.train.epochs,
            "peak_memory_bytes": peak, "config": cfg}
