"""Shared by the tests: tiny models (fast on two CPU cores, deterministic, no downloads) and a tiny run config."""

import numpy as np
import torch.nn as nn
import yaml
from PIL import Image


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


def write_config(tmp_path, root, **overrides):
    """A tiny PatchGD run on the data set in ``root``, written to ``tmp_path/config.yaml``; an override
    ``section__key=value`` sets ``section.key``."""
    cfg = {
        "method": "patchgd", "output_dir": str(tmp_path / "run"),
        "model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "in_chans": 1,
                  "head_width": 8},
        "data": {"root": str(root), "num_classes": 10},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "warmup_epochs": 0.5},
        "patchgd": {"sampling": 0.5},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spotted_images(root, n=6, shape=(64, 64), suffix=".png"):
    """Two class folders of grey images under ``root``, ``n`` each: noise, and noise with a bright square."""
    rng = np.random.default_rng(0)
    for label in ("plain", "spotted"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 100, shape, dtype=np.uint8)
            if label == "spotted":
                pixels[8:24, 30:46] = 250
            if suffix == ".npy":
                np.save(root / label / f"{i}.npy", pixels)
            else:
                Image.fromarray(pixels).save(root / label / f"{i}{suffix}")
    return root
