"""Every packaged recipe validates and is found by name outside a checkout (``patchgd configs``); the ImageNet
recipe trains on a tiny class-folder set."""

import json

import numpy as np
import pytest
from PIL import Image

from patchgd.cli import PACKAGED_CONFIGS, main
from patchgd.config import ConfigError, config_to_dict, load_config
from patchgd.sweep import read_spec


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
    assert main(["train", "--config", "imagenet100_resnet50_patchgd",
                 "--set", f"data.root={tmp_path}", "--set", f"output_dir={out}", "--set", "model.backbone=test_resnet",
                 "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.amp=null",
                 "--set", "data.num_workers=0", "--set", "model.latent_dim=16", "--set", "model.head_width=16"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["classes"] == ["n01440764", "n01443537", "n01484850"] and sum(map(sum, results["confusion"])) == 6


def test_recipes_are_found_by_name_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as after pip install
    shipped = PACKAGED_CONFIGS / "slides.yaml"
    expected = config_to_dict(load_config(shipped))
    for name in ("slides", "slides.yaml", "configs/slides.yaml"):
        assert config_to_dict(load_config(name)) == expected, name
    capsys.readouterr()
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert "slides  " in listed and "PatchGD on whole-slide images read in pieces" in listed
    assert "sweeps/panda_sampling_ablation" in listed and "tcga_luad_lusc_patchgd" in listed
    assert main(["configs", "show", "slides"]) == 0
    assert capsys.readouterr().out == shipped.read_text()
    # the name reaches the run: it fails on the data, not on the config, and says which file it read
    assert main(["train", "--config", "slides", "--set", "data.root=nowhere"]) == 2
    err = capsys.readouterr().err
    assert f"the packaged recipe slides ({shipped})" in err and "data.root nowhere does not exist" in err
    base, _, points = read_spec("sweeps/panda_sampling_ablation")
    assert base == (PACKAGED_CONFIGS / "panda_2048_patchgd.yaml").resolve() and len(points) == 5
    # a file of the name wins over the recipe; an unknown name lists the way out
    (tmp_path / "slides.yaml").write_text("output_dir: mine\n")
    assert load_config("slides.yaml").output_dir == "mine"
    with pytest.raises(ConfigError, match="slidez: no such config file.*did you mean 'slides'.*patchgd configs"):
        load_config("slidez")
