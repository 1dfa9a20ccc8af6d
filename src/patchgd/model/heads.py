"""Heads that classify the latent grid ``Z`` of shape ``(B, s, m, n)`` (``(B, s, n)`` for sequences), and
:func:`build_head`, which builds one by its name in :data:`patchgd.registry.HEADS`."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from ..registry import HEADS

__all__ = ["AttentionMILHead", "ConvHead", "MeanPoolHead", "TransformerHead", "SafeBatchNorm1d", "SafeBatchNorm2d",
           "build_head", "conv1d_head"]


def build_head(name: str, latent_dim: int, num_classes: int, *, width: int, dropout: float, depth: int, heads: int,
               head_args: dict[str, Any] | None = None) -> nn.Module:
    """The head registered as ``name``, for ``latent_dim`` codes and ``num_classes`` logits.

    ``width``, ``dropout``, ``depth`` and ``heads`` (``model.head_width``, ``head_dropout``, ``head_depth``,
    ``head_heads``) go to a builder that names them as parameters; ``head_args`` (``model.head_args``) on top.

    Raises:
        ValueError: An unknown name, or arguments the builder does not take.

    Example:
        >>> build_head("attention", 16, 3, width=8, dropout=0.1, depth=2, heads=4)(torch.randn(2, 16, 4, 5)).shape
        torch.Size([2, 3])
    """
    builder = HEADS.get(name)
    accepted = inspect.signature(builder).parameters
    common = {k: v for k, v in dict(width=width, dropout=dropout, depth=depth, heads=heads).items() if k in accepted}
    args = {**common, **(head_args or {})}
    try:
        inspect.signature(builder).bind(latent_dim, num_classes, **args)
    except TypeError as err:
        raise ValueError(f"model.head={name!r} with model.head_args={head_args or {}}: {err}") from None
    return builder(latent_dim, num_classes, **args)


def conv1d_head(in_channels: int, num_classes: int, width: int, dropout: float) -> nn.Module:
    """The paper's conv head over sequences, ``Z`` of shape ``(B, s, n)``."""
    return ConvHead(in_channels, num_classes, width=width, dropout=dropout, dims=1)


class _SafeBatchNorm:
    """BatchNorm that also works when a training batch holds a single value per channel.

    The paper's head fails with plain BatchNorm at batch size 1 once the grid has been reduced to 1 x 1
    (for example a 4 x 4 grid after two stride-2 convolutions): batch statistics of one value are
    undefined. In that case, and only then, this layer normalises with its running statistics, as in
    evaluation, and leaves them unchanged. Every other batch behaves exactly like plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


class SafeBatchNorm2d(_SafeBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that survives a single value per channel (see :class:`_SafeBatchNorm`)."""


class SafeBatchNorm1d(_SafeBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that survives a single value per channel (see :class:`_SafeBatchNorm`)."""


class _OneCellConv:
    """A padded 3 x 3 convolution that runs at stride 1 on a grid of one cell, whose single output cell is the
    same at any stride.

    PyTorch's bfloat16 CPU kernel for the weight gradient of a strided convolution over one cell leaves the
    taps that only see padding unset: about one call in a hundred gave non-finite gradients (torch 2.14.1,
    measured), which stopped bf16 runs as "diverged" once the head had reduced a small grid to 1 x 1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(size == 1 for size in x.shape[2:]):
            conv = F.conv1d if x.dim() == 3 else F.conv2d
            return conv(x, self.weight, self.bias, 1, self.padding)
        return super().forward(x)


class _Conv1d(_OneCellConv, nn.Conv1d):
    pass


class _Conv2d(_OneCellConv, nn.Conv2d):
    pass


# The layers of the conv head in 1-D (sequences) and 2-D (images).
_LAYERS = {1: (_Conv1d, SafeBatchNorm1d, nn.Dropout1d, nn.AdaptiveAvgPool1d),
           2: (_Conv2d, SafeBatchNorm2d, nn.Dropout2d, nn.AdaptiveAvgPool2d)}


def _block(in_channels: int, out_channels: int, stride: int, dropout: float, dims: int = 2) -> nn.Sequential:
    conv, norm, drop, _ = _LAYERS[dims]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.ReLU(inplace=True),
        norm(out_channels),
        drop(dropout),
    )


class ConvHead(nn.Module):
    """The paper's head: a 3x3 stride-1 convolution, three 3x3 stride-2 convolutions, then a linear layer.

    Every convolution has ``width`` channels and is followed by ReLU, BatchNorm and Dropout2d. A global
    average pool before the linear layer makes the head accept any grid from 1 x 1 up.

    A batch of images of different sizes comes as one grid padded to the largest, with a cell ``mask``:
    the padded cells are zeroed before every convolution (so a smaller image's features never mix with
    its padding beyond the zero padding its convolutions would see anyway), the mask follows each
    stride-2 convolution (an output cell is real when the centre of its 3 x 3 window is), and the pool
    averages real cells only: in eval mode each image's logits equal those of the image alone.
    BatchNorm's batch statistics in training do include the zeroed cells. Without a mask the head is the
    paper's, unchanged.

    Args:
        in_channels: Channels of the input grid (the latent size ``s``, or a backbone's feature width for
            GD-extended).
        num_classes: Number of output logits.
        width: Channels of every convolution (256 in the paper).
        dropout: Dropout2d probability (0.2 in the paper).
        dims: 2 for the ``(B, s, m, n)`` grid of images; 1 for the ``(B, s, n)`` grid of sequences (the
            same head with Conv1d, BatchNorm1d and Dropout1d).

    Example:
        >>> ConvHead(256, 10)(torch.randn(2, 256, 4, 4)).shape
        torch.Size([2, 10])
        >>> ConvHead(256, 10, dims=1)(torch.randn(2, 256, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, dropout: float = 0.2, dims: int = 2):
        super().__init__()
        if dims not in _LAYERS:
            raise ValueError(f"dims={dims}; expected 1 (sequences) or 2 (images)")
        self.features = nn.Sequential(
            _block(in_channels, width, 1, dropout, dims),
            *(_block(width, width, 2, dropout, dims) for _ in range(3)),
        )
        self.pool = _LAYERS[dims][3](1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, s, m, n)`` -> ``(B, classes)``; ``mask`` ``(B, 1, m, n)`` is 1 on real cells, 0 on padding."""
        if mask is None:
            return self.fc(self.pool(self.features(z)).flatten(1))
        x = z
        for block in self.features:
            x = block(x * mask)
            stride = block[0].stride[0]
            # An output cell exists for the image alone iff the centre of its window is a real cell.
            mask = mask[:, :, ::stride, ::stride]
        pooled = (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1)
        return self.fc(pooled)


class TransformerHead(nn.Module):
    """A small transformer encoder over the cells of ``Z``, with 2-D positional encodings and a class token.

    Each cell's ``s`` features are projected to ``width``; the fixed sine-cosine encoding of its (row,
    column) is added (computed for any ``m x n`` grid; a cell's encoding depends only on its position, so
    a grid padded to a larger one encodes its cells alike); a learned class token is prepended, and the
    token's output after ``depth`` pre-norm encoder layers gives the logits. A ``(B, s, n)`` grid of a
    sequence is the one-row case. Cells marked as padding by ``mask`` are left out of the attention
    (``src_key_padding_mask``), so a padded image is classified as the image alone.

    Args:
        in_channels: Latent size ``s``.
        num_classes: Number of output logits.
        width: Token width (a multiple of 4 and of ``heads``).
        depth: Encoder layers.
        heads: Attention heads per layer.
        dropout: Dropout in the attention and MLP blocks.
        mlp_ratio: Width of the MLP blocks relative to ``width``.

    Example:
        >>> TransformerHead(256, 10, width=64, depth=2, heads=4)(torch.randn(2, 256, 3, 5)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 192, depth: int = 2, heads: int = 3,
                 dropout: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__()
        if width % 4 or width % heads:
            raise ValueError(f"transformer head width={width} must be a multiple of 4 (2-D sine-cosine "
                             f"encoding) and of heads={heads}")
        self.width = width
        self.proj = nn.Linear(in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        trunc_normal_(self.cls_token, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=round(mlp_ratio * width), dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, s, m, n)`` or ``(B, s, n)`` -> ``(B, classes)``.

        Args:
            z: The latent grid.
            mask: Optional ``(B, 1, m, n)`` (or ``(B, m, n)``) mask, nonzero on real cells and zero on cells
                that only pad a smaller image to the batch's grid.
        """
        batch, grid = z.shape[0], z.shape[2:]
        if len(grid) not in (1, 2):
            raise ValueError(f"the transformer head takes a (B, s, m, n) or (B, s, n) grid, got shape {tuple(z.shape)}")
        rows, cols = (1, *grid) if len(grid) == 1 else grid
        position = build_sincos2d_pos_embed([rows, cols], self.width, device=z.device, dtype=z.dtype)
        tokens = self.proj(z.flatten(2).transpose(1, 2)) + position
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        padding = None
        if mask is not None:
            padding = F.pad(mask.reshape(batch, -1) == 0, (1, 0), value=False)  # the class token is never padding
        out = self.encoder(tokens, src_key_padding_mask=padding)
        return self.fc(self.norm(out[:, 0]))


class AttentionMILHead(nn.Module):
    """Gated attention pooling over the cells of ``Z`` (Ilse, Tomczak & Welling, ICML 2018), the
    aggregator of ABMIL and CLAM.

    Each cell's ``s`` features pass a small MLP (Linear to ``width``, GELU, Dropout); a gated attention
    network scores every cell (``w . (tanh(V h) * sigmoid(U h))``), the scores are soft-maxed over the
    image's cells, and the attention-weighted mean of the cells gives the logits through a linear layer.
    Position plays no part: the head sees a bag of cells, the natural bias when the label comes from what
    some cells hold wherever they are. Cells marked as padding by ``mask`` get no attention, so a padded
    image is classified as the image alone. ``(B, s, m, n)`` grids of images and ``(B, s, n)`` grids of
    sequences alike.

    Args:
        in_channels: Latent size ``s``.
        num_classes: Number of output logits.
        width: Width of the cell MLP and of the attention network.
        dropout: Dropout after the cell MLP.

    Example:
        >>> AttentionMILHead(256, 10, width=64)(torch.randn(2, 256, 3, 5)).shape
        torch.Size([2, 10])
        >>> AttentionMILHead(16, 4)(torch.randn(2, 16, 7)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.cells = nn.Sequential(nn.Linear(in_channels, width), nn.GELU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(width, width)
        self.attention_u = nn.Linear(width, width)
        self.attention_w = nn.Linear(width, 1)
        self.fc = nn.Linear(width, num_classes)

    def attention(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells' features ``(B, cells, width)`` and their attention weights ``(B, cells)`` (summing to 1
        over each image's real cells)."""
        h = self.cells(z.flatten(2).transpose(1, 2))
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(mask.reshape(scores.shape) == 0, float("-inf"))
        return h, scores.softmax(dim=1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, s, m, n)`` or ``(B, s, n)`` -> ``(B, classes)``; ``mask`` ``(B, 1, m, n)`` (or ``(B, 1, n)``) is
        nonzero on real cells."""
        h, weights = self.attention(z, mask)
        return self.fc(torch.einsum("bc,bcw->bw", weights, h))


class MeanPoolHead(nn.Module):
    """The mean of the cells' codes, then an MLP: the simplest head of a bag of cells (sub-bag training's
    baseline aggregator). Cells marked as padding by ``mask`` are left out of the mean.

    Args:
        in_channels: Latent size ``s``.
        num_classes: Number of output logits.
        width: Hidden width of the MLP.
        dropout: Dropout after its hidden layer.

    Example:
        >>> MeanPoolHead(16, 3, width=8)(torch.randn(2, 16, 4, 5)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width, num_classes))

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, s, ...)`` cells -> ``(B, classes)``; ``mask`` ``(B, 1, ...)`` is nonzero on real cells."""
        cells = z.flatten(2)
        if mask is None:
            return self.mlp(cells.mean(dim=2))
        weights = mask.reshape(mask.shape[0], 1, -1).to(cells.dtype)
        return self.mlp((cells * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1))
