"""Backbones from timm, built offline, optionally from a local weights file."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

__all__ = ["create_timm", "PatchEncoder"]


def create_timm(name: str, *, in_chans: int = 3, num_classes: int = 0, img_size: int | None = None,
                pretrained: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a timm model without ever touching the network.

    Args:
        name: A timm model name (``timm.list_models()``).
        in_chans: Input channels; timm adapts a pretrained stem when this is not 3.
        num_classes: Classifier outputs; 0 removes the classifier (pooled features out).
        img_size: Input size for models that are built for one (ViTs such as DeiT); ignored by CNNs.
        pretrained: Path of a local weights file (``.pth``, ``.bin`` or ``.safetensors``), or None for
            random initialisation. Downloading weights is deliberately not supported.
        **kwargs: Passed to ``timm.create_model``.

    Example:
        >>> create_timm("test_resnet", num_classes=0).num_features
        256
    """
    if pretrained is True:
        raise ValueError(f"pretrained=True would download weights for {name!r}; patchgd never downloads: "
                         "pass the path of a local weights file instead")
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: expected a timm model name (see timm.list_models())")
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {path} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    kwargs.update(in_chans=in_chans, num_classes=num_classes)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as err:  # a model without a fixed input size (most CNNs) rejects img_size
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


class PatchEncoder(nn.Module):
    """A timm backbone's pooled features followed by a linear projection to the latent size ``s``.

    This mirrors the paper's code, which replaces the backbone's ``fc`` by a ``Linear(features, s)``.

    Args:
        name: A timm model name.
        latent_dim: Output size ``s``.
        patch_size: Side of the input patches (sets the input size of ViTs).
        in_chans: Input channels.
        pretrained: Optional path of a local weights file.
    """

    def __init__(self, name: str, latent_dim: int, patch_size: int, in_chans: int = 3,
                 pretrained: str | Path | None = None):
        super().__init__()
        self.features = create_timm(name, in_chans=in_chans, num_classes=0, img_size=patch_size,
                                    pretrained=pretrained)
        self.proj = nn.Linear(self.features.num_features, latent_dim)

    def forward(self, x):
        return self.proj(self.features(x))
