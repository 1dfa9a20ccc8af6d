"""Backbones: timm models built offline (optionally from a local weights file), and a Conv1d encoder for
the chunks of sequences."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

__all__ = ["create_timm", "PatchEncoder", "Conv1dEncoder"]


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
