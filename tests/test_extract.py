"""Two-stage features: ``patchgd extract`` writes TRIDENT's layout (resumable, broken slides listed), and a
cached fill with a frozen encoder trains on feature files, whoever wrote them (one written here by hand)."""

import csv
import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from patchgd.cli import main
from patchgd.config import load_config
from patchgd.engine.build import build_model
from patchgd.engine.state import seed_everything
from patchgd.data.readers import open_source

from test_skips import write_cohort

FEATURES = 96  # test_resnet's pooled features


def slide_config(root, out, **extra):
    return {"output_dir": str(out), "data": {"root": str(root), "num_classes": 2, "pad_value": 245, "level": 0,
                                             "tissue_fraction": 0.3},
            "model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "head_width": 8,
                      "freeze": "all", "head": "attention"},
            "train": {"epochs": 1, "batch_size": 2, "device": "cpu"}, **extra}


def test_extract_writes_tridents_layout_lists_broken_slides_and_resumes(tmp_path, capsys):
    write_cohort(tmp_path / "cohort", good=3, broken_tile=1, not_a_slide=1)
    for i in range(2):  # the validation slides' own names (write_cohort reuses the training ones)
        (tmp_path / "cohort" / "val" / f"good{i}.tif").rename(tmp_path / "cohort" / "val" / f"good{i + 3}.tif")
    (tmp_path / "cohort" / "val.csv").write_text("image_id,label\ngood3,0\ngood4,1\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(slide_config(tmp_path / "cohort", tmp_path / "run")))
    assert main(["extract", "--config", str(config), "--out", str(tmp_path / "feats")]) == 0
    feats = tmp_path / "feats"
    assert sorted(p.name for p in feats.glob("*.h5")) == ["good0.h5", "good1.h5", "good2.h5", "good3.h5", "good4.h5"]
    skipped = {row["file"].rsplit("/", 1)[-1] for row in csv.DictReader((feats / "skipped.csv").open())}
    assert skipped == {"junk0.tif", "torn0.tif"}
    with h5py.File(feats / "good1.h5", "r") as f:
        features, coords = f["features"][:], f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert features.shape[1] == FEATURES and coords.shape == (len(features), 2)
    assert attrs["patch_size"] == 32 and attrs["patch_size_level0"] == 32 and attrs["name"] == "good1"
    assert {"level0_magnification", "target_magnification", "overlap"} <= set(attrs)
    # each row is the frozen encoder's features of the patch at its corner (x, y), in eval mode: the encoder a
    # run of this config starts from (seeded by train.seed)
    cfg = load_config(config)
    seed_everything(cfg.train.seed)
    encoder = build_model(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=2))).eval()
    x, y = coords[3]
    patch = open_source(tmp_path / "cohort" / "train" / "good1.tif").read(int(y), int(x), 32, 32)
    with torch.inference_mode():
        expected = encoder.encode_features(torch.from_numpy(patch)[None])[0]
    np.testing.assert_allclose(features[3], expected.numpy(), rtol=1e-5, atol=1e-5)
    # run again: the files there are kept, nothing is encoded again
    before = {p.name: p.stat().st_mtime_ns for p in feats.glob("*.h5")}
    capsys.readouterr()
    assert main(["extract", "--config", str(config), "--out", str(feats)]) == 0
    assert "0 written, 5 already there, 2 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in feats.glob("*.h5")} == before


def write_by_hand(path, features, coords, patch_size):
    """A feature file as TRIDENT writes one (its datasets and coordinate attributes), with h5py alone."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f["features"].attrs.update({"name": path.stem, "savetodir": str(path.parent)})
        f.create_dataset("coords", data=coords)
        f["coords"].attrs.update({"patch_size": patch_size, "patch_size_level0": patch_size, "level0_magnification": 20,
                                  "target_magnification": 20, "overlap": 0, "name": path.stem,
                                  "savetodir": str(path.parent)})


def test_a_head_trains_on_features_written_by_another_tool(tmp_path, capsys):
    """Class folders of 64 px images and a TRIDENT-layout file per image holding features that say the class
    (all but one cell of one image): the two-stage run reads them, encodes only the missing cell, trains the
    projection and head to tell the classes apart, and its checkpoint predicts like any other."""
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    feats.mkdir()
    corners = np.array([[x, y] for y in (0, 32) for x in (0, 32)])  # a 2 x 2 grid of 32 px cells, (x, y)
    for name, label in (("plain", 0), ("spotted", 1)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / name / f"{name}{i}.png")
            features = rng.normal(0, 0.1, (4, FEATURES)).astype(np.float32)
            features[:, 0] += 3.0 * label  # the class, in the features alone
            keep = slice(None) if (name, i) != ("spotted", 0) else slice(1, None)  # one cell missing
            write_by_hand(feats / f"{name}{i}.h5", features[keep], corners[keep], 32)
    cfg = slide_config(tmp_path / "images", tmp_path / "run",
                       patchgd={"fill": "cached", "features_from": str(feats), "sampling": 0.5})
    cfg["data"] = {"root": str(tmp_path / "images"), "val_fraction": 0.4}
    cfg["train"] |= {"epochs": 4, "lr": 0.05, "warmup_epochs": 0}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(config)]) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    # epoch 1 filled the 6 training images from their files: no encoding but the one missing cell, if it
    # trained; later epochs read the store
    assert int(rows[0]["encoded_no_grad"]) in (0, 1) and all(int(r["encoded_no_grad"]) == 0 for r in rows[1:])
    assert all(int(r["encoded_with_grad"]) == 0 for r in rows)  # inner iterations project stored features
    assert "features: read from" in (tmp_path / "run" / "train.log").read_text()
    image = tmp_path / "images" / "plain" / "plain0.png"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run" / "best.pt"), str(image), "--json",
                 "--heatmap", str(tmp_path / "maps")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class_name"] in ("plain", "spotted")
    assert (tmp_path / "maps" / "plain0_heatmap.png").is_file()


def test_a_feature_file_of_another_geometry_is_refused(tmp_path):
    from patchgd.data.errors import DataError
    from patchgd.data.features import FeatureFolder

    write_by_hand(tmp_path / "a.h5", np.zeros((1, 4), np.float32), np.array([[16, 0]]), 32)
    with pytest.raises(DataError, match="a.h5: patch corners off the grid of 32 px cells"):
        FeatureFolder(tmp_path).read("a")["cells"]((2, 2), 32)
    with pytest.raises(DataError, match="patches of 32 level-0 pixels; this run's cells are 64"):
        FeatureFolder(tmp_path).read("a")["cells"]((2, 2), 64)
