"""Builders from a config: the device, the encoder's weights, the model, its optimizer groups and
learning-rate schedule, and the training method. :mod:`patchgd.engine.trainer` and the planner
(:mod:`patchgd.engine.plan`) build through these, so a planned step is the step that trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed
from ..checkpoint import load_checkpoint
from ..config import Config
from ..grid import PatchGrid
from ..methods import patches_per_iteration
from ..model.pretrained import HUB_PREFIX, architecture_only, resolve_encoder
from ..registry import METHODS


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def resolve_weights(cfg: Config) -> Config:
    """``cfg`` with ``model.pretrained_origin`` found (:func:`patchgd.model.pretrained.resolve_encoder`: the hub,
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
                             "resolved first (patchgd.engine.build.resolve_weights)")
        pretrained = False  # a random-initialised registry model: nothing to resolve
    return METHODS.get(cfg.method).model.from_config(cfg, pretrained)


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
        >>> from patchgd.methods import create_model
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


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, steps_done: int = 0):
    """The paper's schedule (App. C), stepped once per batch: linear warm-up from 0 over
    ``warmup_epochs``, then linear decay reaching half the peak at the last step; or a constant rate.

    Every group's rate is its peak (``initial_lr``, as torch's schedulers keep it in the optimizer's state)
    times the same factor, so a run resumes from the step count alone: ``steps_done`` after the optimizer's
    state is loaded gives the rate of that step, of the schedule as now configured (a raised
    ``train.epochs`` stretches it)."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(round(cfg.train.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if cfg.train.schedule == "constant":
            return 1.0
        if step < warmup:
            return step / warmup
        return 1.0 - 0.5 * (step - warmup) / max(total - 1 - warmup, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=steps_done - 1)


def build_method(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator | None = None, *, fill: Callable | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, cache=None):
    """The step object of ``cfg.method`` (PatchGD options from ``cfg.patchgd``); ``fill`` replaces PatchGD's
    fill (the patch-parallel fill), ``wrap`` puts the forward module under DDP and ``cache`` (a
    :class:`~patchgd.methods.cached.CachedZ`) makes ``Z`` persist, all when it is built."""
    return METHODS.get(cfg.method).step(cfg, model, optimizer, generator=generator, fill=fill, wrap=wrap, cache=cache)


def patches_per_step(cfg: Config, image_shape: tuple[int, ...]) -> int:
    """Patches a PatchGD inner iteration holds with gradients: ``B * k``; also its default fill chunk.
    ``k`` is ``patchgd.patches_per_step`` (at most the grid's cells) when set, else from ``sampling``.

    ``image_shape`` is one item's ``(C, H, W)`` (or a sequence's ``(C, L)``).
    """
    cells = PatchGrid(torch.empty(1, *image_shape, device="meta"), cfg.model.patch_size).num_cells
    return cfg.train.batch_size * patches_per_iteration(cfg.patchgd.sampling, cells, cfg.patchgd.patches_per_step)


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
