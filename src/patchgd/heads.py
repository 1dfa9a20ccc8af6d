"""Heads that classify the latent grid ``Z`` of shape ``(B, s, m, n)``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvHead", "SafeBatchNorm2d"]


class SafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that also works when a training batch holds a single value per channel.

    The paper's head fails with plain BatchNorm at batch size 1 once the grid has been reduced to 1 x 1
    (for example a 4 x 4 grid after two stride-2 convolutions): batch statistics of one value are
    undefined. In that case, and only then, this layer normalises with its running statistics, as in
    evaluation, and leaves them unchanged. Every other batch behaves exactly like ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


def _block(in_channels: int, out_channels: int, stride: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.ReLU(inplace=True),
        SafeBatchNorm2d(out_channels),
        nn.Dropout2d(dropout),
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

    Example:
        >>> ConvHead(256, 10)(torch.randn(2, 256, 4, 4)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width, 1, dropout),
            *(_block(width, width, 2, dropout) for _ in range(3)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
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
