"""Tiny models shared by the tests: fast on two CPU cores, deterministic, no downloads."""

import torch.nn as nn


class TinyEncoder(nn.Module):
    """A few-layer patch backbone without BatchNorm or dropout, so per-patch and batched calls agree."""

    def __init__(self, in_chans: int = 3, latent_dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, latent_dim),
        )

    def forward(self, x):
        return self.net(x)
