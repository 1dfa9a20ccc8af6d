"""Why a PatchGD run learns slowly: what happens inside its steps, measured on a config's own run.

Trains ``--config`` (with ``--set`` overrides) the way ``patchgd train`` does (its run setup,
:mod:`patchgd.engine.setup`: the same seeds, model, optimizer, step, augmentation and loaders, and its
schedule; no run directory) and records, per epoch:

* the training loss at each inner iteration ``j`` of a step, averaged over the epoch's steps (does a
  step's loss fall from its first inner iteration to its last, as later iterations see more re-encoded
  cells and, with ``ε < ζ``, updated weights?);
* the gradient norms of the backbone and of the head (and the projection to ``s``) at every update;
* BatchNorm: for every BatchNorm layer of the backbone, the distance of the batch statistics seen by the
  fill and by the inner iterations from the running statistics that evaluation uses,
  ``mean_c |mu_batch - mu_running| / sqrt(var_running + eps)`` (0: evaluation normalises as training did),
  averaged over layers and calls;
* validation accuracy as evaluation runs it (fill and head in eval mode) and with the backbone's
  BatchNorm on batch statistics in the evaluation's fill (a copy; the run's statistics are left alone):
  when the two differ, the running statistics misrepresent what the model was trained on.

Writes ``diagnose.json`` to ``--out`` and prints one table row per epoch.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn

from patchgd.config import load_config
from patchgd.engine.build import build_scheduler, encoder_of, resolve_device, resolve_weights
from patchgd.engine.data import build_datasets, resolve_classes
from patchgd.engine.loop import evaluate
from patchgd.engine.setup import build_loaders, build_training
from ._common import format_table, main_of, write_json


def register(subparsers) -> None:
    """Add the ``diagnose`` subcommand."""
    parser = subparsers.add_parser("diagnose", help="inner-iteration losses, gradient norms and BatchNorm "
                                   "statistics of a PatchGD run, per epoch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a PatchGD training config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", default="bench-results/diagnose", help="output folder (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)


def _norm(parameters) -> float:
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


class BatchNormWatch:
    """Forward hooks on a module's BatchNorm layers: the distance of each training call's batch statistics
    from the layer's running statistics, by phase (``fill``: no gradients; ``inner``: with gradients)."""

    def __init__(self, module: nn.Module):
        self.distances: dict[str, list[float]] = defaultdict(list)
        self.handles = [m.register_forward_hook(self._hook) for m in module.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, layer, inputs, _output) -> None:
        if not layer.training or layer.running_mean is None:
            return
        x = inputs[0].detach().float().transpose(0, 1).flatten(1)  # (channels, values)
        scale = (layer.running_var.float() + layer.eps).sqrt()
        distance = ((x.mean(1) - layer.running_mean.float()).abs() / scale).mean().item()
        self.distances["inner" if torch.is_grad_enabled() else "fill"].append(distance)

    def take(self) -> dict[str, float]:
        """The mean distance per phase since the last call, and reset."""
        means = {phase: sum(v) / len(v) for phase, v in self.distances.items() if v}
        self.distances.clear()
        return means


def _batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose backbone BatchNorm layers normalise with batch statistics in eval mode,
    without updating any running statistics."""
    twin = copy.deepcopy(model).eval()
    for layer in twin.backbone.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train()
            layer.momentum = 0.0  # running = (1 - 0) * running: unchanged
    return twin


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    if cfg.method != "patchgd":
        raise ValueError(f"{args.config}: method={cfg.method!r}; the diagnosis looks inside PatchGD steps")
    device = resolve_device(cfg.train.device)
    cfg = resolve_weights(cfg)
    train_set, val_set = build_datasets(cfg, augment=True)
    cfg = resolve_classes(cfg, train_set, val_set)
    # the run setup fit uses: the same seeds, model, optimizer, step and loaders
    training = build_training(cfg, device)
    model, optimizer, method = training.model, training.optimizer, training.method
    loaders = build_loaders(cfg, train_set, val_set)
    loader, val_loader = loaders.train, loaders.val
    scheduler = build_scheduler(cfg, optimizer, len(loader))

    encoder = encoder_of(model)
    head_params = list(model.head.parameters())
    encoder_ids = {id(p) for p in encoder.parameters()}
    projection = [p for p in model.backbone.parameters() if id(p) not in encoder_ids]
    norms: dict[str, list[float]] = defaultdict(list)

    def record_norms(_optimizer, _args, _kwargs):
        norms["backbone"].append(_norm(encoder.parameters()))
        norms["projection"].append(_norm(projection))
        norms["head"].append(_norm(head_params))

    optimizer.register_step_pre_hook(record_norms)
    watch = BatchNormWatch(model.backbone)
    epochs, started = [], time.perf_counter()
    for epoch in range(1, cfg.train.epochs + 1):
        inner = []
        for images, labels in loader:
            inner.append(method.step(images, labels)["inner_losses"])
            scheduler.step()
        batch_norm = watch.take()
        per_iteration = torch.tensor(inner).mean(0).tolist()
        results = evaluate(model, val_loader, device, cfg.data.num_classes)
        watch.take()  # evaluation runs in eval mode: nothing to keep
        batch_stats = evaluate(_batch_statistics_copy(model), val_loader, device, cfg.data.num_classes)
        epochs.append({"epoch": epoch, "loss_per_inner_iteration": per_iteration,
                       "grad_norm_backbone": sum(norms["backbone"]) / len(norms["backbone"]),
                       "grad_norm_projection": sum(norms["projection"]) / len(norms["projection"]),
                       "grad_norm_head": sum(norms["head"]) / len(norms["head"]), "updates": len(norms["head"]),
                       "bn_distance_fill": batch_norm.get("fill"), "bn_distance_inner": batch_norm.get("inner"),
                       "val_accuracy": results["accuracy"], "val_loss": results["loss"],
                       "val_accuracy_batch_stats": batch_stats["accuracy"]})
        norms.clear()
        row = epochs[-1]
        print(f"epoch {epoch}: loss by inner iteration " + " ".join(f"{v:.3f}" for v in per_iteration)
              + f"; val acc {row['val_accuracy']:.3f} (batch-stat fill {row['val_accuracy_batch_stats']:.3f})",
              flush=True)

    def cell(value):
        return "-" if value is None else value

    headers = ["epoch", "loss j=1", "loss j=last", "|g| backbone", "|g| proj", "|g| head", "BN fill", "BN inner",
               "val acc", "val acc (batch-stat fill)"]
    rows = [[r["epoch"], r["loss_per_inner_iteration"][0], r["loss_per_inner_iteration"][-1], r["grad_norm_backbone"],
             r["grad_norm_projection"], r["grad_norm_head"], cell(r["bn_distance_fill"]),
             cell(r["bn_distance_inner"]), r["val_accuracy"], r["val_accuracy_batch_stats"]] for r in epochs]
    print(format_table(headers, rows))
    write_json(args, "diagnose", device, {"epochs": epochs, "wall_s": round(time.perf_counter() - started, 1),
                                          "config": {"model": vars(cfg.model), "train": vars(cfg.train),
                                                     "patchgd": vars(cfg.patchgd)}})
    return 0


if __name__ == "__main__":
    sys.exit(main_of(register))
