"""Methods by name: :func:`create_model` and :func:`create_method` build what a method trains and steps
(the names themselves are :data:`patchgd.config.METHODS`, which the config checks too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..config import METHODS, PATCH_METHODS
from ..model import GDClassifier, GDExtendedClassifier, PatchGDClassifier
from .gd import GD
from .patchgd import PatchGD
from .subbag import SUBBAG_HEADS, SubBag


def create_model(method: str, backbone: str | nn.Module, num_classes: int, *, patch_size: int = 128,
                 latent_dim: int = 256, in_chans: int = 3, pretrained: bool | str | dict | None = None,
                 backbone_args: dict | None = None, freeze: str | int | None = None,
                 grad_checkpointing: bool = False, head: str = "conv", head_width: int = 256,
                 head_dropout: float = 0.2, head_depth: int = 2, head_heads: int = 4, pad_value: float = 0.0,
                 image_size: int | None = None, channels_last: bool = False, mean: list[float] | None = None, std: list[float] | None = None,
                 fill_workers: int = 0, fill_batch_size: int | None = None) -> nn.Module:
    """Build the model a method trains.

    Args:
        method: ``"patchgd"``, ``"gd"``, ``"gd-extended"`` or ``"subbag"`` (a PatchGD model with a set head).
        backbone: A timm model name or a module (see the model classes).
        num_classes: Number of classes.
        patch_size: PatchGD's patch side.
        latent_dim: PatchGD's latent size ``s``.
        in_chans: Image channels.
        pretrained: Pretrained weights of a timm backbone: ``True``, a local file or snapshot folder, or an
            origin record (:func:`patchgd.model.pretrained.resolve_encoder`).
        backbone_args: Extra ``timm.create_model`` arguments.
        freeze: None, ``"all"`` or the stem and first N stages/blocks of the encoder.
        grad_checkpointing: Gradient checkpointing in the encoder.
        head: PatchGD's head: ``"conv"`` (the paper's), ``"conv1d"`` (sequences), ``"transformer"`` or
            ``"attention"`` (gated attention-MIL pooling).
        head_width: Channels of the conv head (PatchGD, GD-extended); token width of the transformer head.
        head_dropout: Dropout of the head.
        head_depth: Encoder layers of the transformer head.
        head_heads: Attention heads of the transformer head.
        pad_value: PatchGD's padding value.
        image_size: Input size of the whole image, for GD backbones built for one (ViTs).
        channels_last: Channels-last memory format.
        mean: Per-channel mean of the [0, 1]-scaled pixels (the model normalises on the device).
        std: Per-channel standard deviation.
        fill_workers: PatchGD's reader processes for disk-backed images while filling ``Z``.
        fill_batch_size: PatchGD's patches per backbone call while filling ``Z`` outside a training step
            (None: :func:`~patchgd.model.fill.fill_chunk`'s one grid row of every image).
    """
    encoder = dict(in_chans=in_chans, pretrained=pretrained, backbone_args=backbone_args, freeze=freeze,
                   grad_checkpointing=grad_checkpointing, channels_last=channels_last, mean=mean, std=std)
    if method == "subbag" and head not in SUBBAG_HEADS:
        raise ValueError(f"method subbag classifies a bag of sampled cells: head={head!r}; expected one of "
                         f"{', '.join(SUBBAG_HEADS)}")
    if method in PATCH_METHODS:
        return PatchGDClassifier(backbone, num_classes, patch_size, latent_dim, head, pad_value=pad_value,
                                 head_width=head_width, head_dropout=head_dropout, head_depth=head_depth,
                                 head_heads=head_heads, fill_workers=fill_workers, fill_batch_size=fill_batch_size,
                                 **encoder)
    if head != "conv":
        raise ValueError(f"head={head!r} is PatchGD's; the {method} baseline has its own classifier or conv head")
    common = dict(img_size=image_size, **encoder)
    if method == "gd":
        return GDClassifier(backbone, num_classes, **common)
    if method == "gd-extended":
        return GDExtendedClassifier(backbone, num_classes, head_width=head_width, head_dropout=head_dropout,
                                    **common)
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")


def create_method(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, amp: str | None = None,
                  micro_batch_size: int | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                  **patchgd_options: Any) -> PatchGD | SubBag | GD:
    """The step object for ``method``; ``patchgd_options`` go to :class:`PatchGD` (ignored by GD),
    ``micro_batch_size`` to :class:`GD` (PatchGD bounds its memory with ``sampling`` instead), ``wrap`` (DDP)
    to both."""
    if method == "patchgd":
        if micro_batch_size is not None:
            raise ValueError("train.micro_batch_size splits the batches of gd and gd-extended; PatchGD bounds its "
                             "memory with patchgd.sampling or patchgd.patches_per_step instead")
        return PatchGD(model, optimizer, amp=amp, wrap=wrap, **patchgd_options)
    if method == "subbag":
        return SubBag(model, optimizer, patchgd_options.get("sampling", 0.25), amp=amp, wrap=wrap,
                      patches_per_step=patchgd_options.get("patches_per_step"), generator=patchgd_options.get("generator"))
    if method in ("gd", "gd-extended"):
        return GD(model, optimizer, amp=amp, micro_batch_size=micro_batch_size, wrap=wrap)
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
