"""Every packaged recipe validates; the ImageNet recipe trains on a tiny class-folder set."""

import json

import numpy as np
import pytest
from PIL import Image

from patchgd.cli import PACKAGED_CONFIGS, main
from patchgd.config import load_config


@pytest.mark.parametrize("recipe", sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml")))
def test_every_packaged_recipe_is_a_valid_config(recipe):
    load_config(PACKAGED_CONFIGS / recipe)


def test_the_imagenet_recipe_trains_on_a_tiny_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("n01440764", "n01443537", "n01484850")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)  # any size: resized to 160
                pixels[..., c] = 255  # each class its own colour
                Image.fromarray(pixels).save(tmp_path / split / name / f"{name}_{i}.JPEG")
    out = tmp_path / "run"
    assert main(["train", "--config", str(PACKAGED_CONFIGS / "imagenet100_resnet50_patchgd.yaml"),
                 "--set", f"data.root={tmp_path}", "--set", f"output_dir={out}", "--set", "model.backbone=test_resnet",
                 "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.amp=null",
                 "--set", "data.num_workers=0", "--set", "model.latent_dim=16", "--set", "model.head_width=16"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["classes"] == ["n01440764", "n01443537", "n01484850"] and sum(map(sum, results["confusion"])) == 6
