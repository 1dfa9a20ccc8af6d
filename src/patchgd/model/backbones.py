"""Backbones: timm models (random, pretrained from the hub, a file or a snapshot folder; partly frozen;
with gradient checkpointing), and a Conv1d encoder for the chunks of sequences."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import group_parameters
from timm.utils.model import freeze as freeze_modules

from .pretrained import create_encoder

__all__ = ["create_timm", "freeze_encoder", "PatchEncoder", "Conv1dEncoder"]


def create_timm(name: str, *, in_chans: int = 3, num_classes: int = 0, img_size: int | None = None,
                origin: dict | None = None, backbone_args: dict | None = None, freeze: str | int | None = None,
                grad_checkpointing: bool = False, **kwargs) -> nn.Module:
    """Build a timm model from a registry name or a resolved origin record, then freeze and checkpoint it.

    Nothing here touches the network: hub weights are found beforehand by
    :func:`patchgd.pretrained.resolve_encoder`, whose record names the local file.

    Args:
        name: A timm model name (``timm.list_models()``), or the configured hub name of ``origin``.
        in_chans: Input channels; timm adapts a pretrained stem when this differs from the weights'.
        num_classes: Classifier outputs; 0 removes the classifier (pooled features out).
        img_size: Input size for models that are built for one (ViTs: the position table is resampled to it
            when pretrained weights are loaded); ignored by CNNs.
        origin: The origin record of the weights, or None for a random-initialised registry model.
        backbone_args: Extra ``timm.create_model`` arguments.
        freeze: None, ``"all"`` or a number N of stages (see :func:`freeze_encoder`).
        grad_checkpointing: Recompute activations in backward (timm's ``set_grad_checkpointing``).
        **kwargs: Passed to ``timm.create_model``.

    Example:
        >>> create_timm("test_resnet", num_classes=0).num_features
        96
    """
    model = create_encoder(name, origin, backbone_args, in_chans=in_chans, num_classes=num_classes,
                           img_size=img_size, **kwargs)
    if freeze is not None:
        freeze_encoder(model, freeze)
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"model.grad_checkpointing=true: the timm model {name!r} does not support gradient "
                             "checkpointing (no set_grad_checkpointing); turn it off")
        model.set_grad_checkpointing(True)
        _guard_running_statistics(model)
    return model


def _guard_running_statistics(model: nn.Module) -> None:
    """Keep BatchNorm's running statistics as without checkpointing.

    Checkpointing runs a segment's forward again in backward; a BatchNorm in training mode would update its
    running statistics a second time there. During that recomputation (inside a backward pass) each
    BatchNorm's buffers are saved before it runs and put back after, so only the real forward moves them.
    """
    def save(module, _inputs):
        if module.training and torch._C._current_graph_task_id() != -1:
            module._saved_statistics = [b.clone() for b in module.buffers()]

    def restore(module, _inputs, _output):
        saved = module.__dict__.pop("_saved_statistics", None)
        if saved is not None:
            with torch.no_grad():
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.register_forward_pre_hook(save)
            module.register_forward_hook(restore)


def freeze_encoder(model: nn.Module, freeze: str | int) -> list[str]:
    """Freeze a timm model's parameters, keeping its classifier (if any) trainable.

    Frozen parameters get ``requires_grad=False`` (no gradients, and the optimizer leaves them out), and the
    BatchNorm layers among them become ``FrozenBatchNorm2d`` (timm's ``freeze``), so their running
    statistics stay the pretrained ones too.

    Args:
        model: A timm model.
        freeze: ``"all"`` for the whole encoder, or N for its stem and first N stages (CNNs) or blocks
            (ViTs), as the model's coarse ``group_matcher`` numbers them (0: the stem alone).

    Returns:
        The names of the frozen parameters.

    Example:
        >>> model = create_timm("test_resnet", num_classes=0)
        >>> frozen = freeze_encoder(model, 1)
        >>> frozen[0], model.layer1[0].conv1.weight.requires_grad, model.layer2[0].conv1.weight.requires_grad
        ('conv1.0.weight', False, True)
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    keep = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    params = dict(model.named_parameters())
    if freeze == "all":
        frozen = [n for n, p in params.items() if id(p) not in keep]
    else:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"model.freeze={freeze}: {type(model).__name__} has no group_matcher to count its "
                             "stages by; use model.freeze: all, or null")
        groups = group_parameters(model, model.group_matcher(coarse=True))
        if not 0 <= freeze < len(groups):
            raise ValueError(f"model.freeze={freeze}: {type(model).__name__} has a stem and {len(groups) - 1} "
                             f"stages/blocks; expected 0 (the stem) to {len(groups) - 1} (all), or 'all'")
        frozen = [n for group, names in groups.items() if group <= freeze for n in names if id(params[n]) not in keep]
    owners = sorted({n.rpartition(".")[0] for n in frozen} - {""})
    if owners:
        freeze_modules(model, owners)  # their parameters, and BatchNorm to FrozenBatchNorm2d
    remaining = dict(model.named_parameters())  # frozen BatchNorm holds its affine terms as buffers now
    for n in frozen:  # parameters the model owns itself (a ViT's class token, position table)
        if n in remaining:
            remaining[n].requires_grad_(False)
    return frozen


class PatchEncoder(nn.Module):
    """A timm backbone's pooled features followed by a linear projection to the latent size ``s``.

    This mirrors the paper's code, which replaces the backbone's ``fc`` by a ``Linear(features, s)``. The
    projection is new, so it always trains, also when the encoder is frozen.

    Args:
        name: A timm model name (or the configured hub name of ``origin``).
        latent_dim: Output size ``s``.
        patch_size: Side of the input patches (sets the input size of ViTs).
        in_chans: Input channels.
        origin: Origin record of pretrained weights (:func:`patchgd.pretrained.resolve_encoder`).
        backbone_args, freeze, grad_checkpointing: As for :func:`create_timm`.

    Raises:
        ValueError: The encoder does not take ``patch_size`` patches (a model of fixed input size).
    """

    def __init__(self, name: str, latent_dim: int, patch_size: int, in_chans: int = 3, origin: dict | None = None,
                 backbone_args: dict | None = None, freeze: str | int | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.features = create_timm(name, in_chans=in_chans, num_classes=0, img_size=patch_size, origin=origin,
                                    backbone_args=backbone_args, freeze=freeze,
                                    grad_checkpointing=grad_checkpointing)
        self._check_input(name, in_chans, patch_size)
        self.proj = nn.Linear(self.features.num_features, latent_dim)

    def _check_input(self, name: str, in_chans: int, patch_size: int) -> None:
        """One patch through the encoder, on the meta device (no memory, no compute), so that a patch size
        the encoder cannot take fails here, with a way out, and not in the middle of a fill."""
        probe = torch.empty(1, in_chans, patch_size, patch_size, device="meta")
        try:
            out = _meta_forward(self.features, probe)
        except Exception as err:  # noqa: BLE001 - any failure means the same: this size does not go through
            raise ValueError(f"backbone {name!r} does not take {patch_size} px patches "
                             f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); expected a patch size "
                             "the encoder accepts: its native input, or, for a ViT, one that is a multiple of its "
                             "patch embedding (position tables are resampled to it; model.backbone_args: "
                             "{dynamic_img_size: true} takes any)") from None
        if out.dim() != 2:
            raise ValueError(f"backbone {name!r} gives features of shape {tuple(out.shape)} per patch; expected "
                             "(1, features): a pooled output (e.g. model.backbone_args: {global_pool: token})")

    def forward(self, x):
        return self.proj(self.features(x))


def _meta_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with parameters and buffers swapped for meta tensors of their shapes, the module untouched."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta") for k, v in
             {**dict(module.named_parameters()), **dict(module.named_buffers())}.items()}
    training = module.training
    module.eval()
    try:
        return functional_call(module, state, (x,))
    finally:
        module.train(training)


class Conv1dEncoder(nn.Module):
    """A small 1-D CNN mapping chunks of a sequence ``(N, C, p)`` to ``(N, latent_dim)``: the backbone of
    1-D PatchGD (the model name ``"conv1d"``).

    Three Conv1d (kernel 3) - BatchNorm - ReLU blocks of ``width`` channels, the middle one with stride 2,
    then a global average over the chunk and a linear projection, in the spirit of the paper code's
    human-activity example.

    Args:
        in_chans: Channels ``C`` of the sequences.
        latent_dim: Output size ``s``.
        width: Channels of the convolutions.

    Example:
        >>> Conv1dEncoder(6, 32)(torch.randn(4, 6, 10)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_chans: int, latent_dim: int, width: int = 64):
        super().__init__()

        def block(cin: int, stride: int) -> list[nn.Module]:
            return [nn.Conv1d(cin, width, 3, stride=stride, padding=1), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(in_chans, 1), *block(width, 2), *block(width, 1),
                                 nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, latent_dim))

    def forward(self, x):
        return self.net(x)
