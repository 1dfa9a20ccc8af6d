"""The Megapixel MNIST generator: five 28 px digits per canvas, three of the label's class, non-overlapping,
from disjoint digit pools, among scribbles; reproducible; read by the trainer as it is."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from patchgd.cli import main
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.prepare.digits import load_digits_source, split_pools
from patchgd.data.prepare.megapixel_mnist import (BACKGROUND, PRESETS, cut_digit_cells, generate_megapixel_mnist,
                                                  scribbles)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("mp") / "mpmnist"
    assert main(["generate", "megapixel-mnist", str(out), "--train", "30", "--val", "20", "--image-size", "200",
                 "--noise", "4", "--digits", str(mnist_dir), "--seed", "1"]) == 0
    return out, load_digits_source(mnist_dir)


def test_each_canvas_holds_three_digits_of_its_class_and_two_others(generated):
    out, source = generated
    meta = json.loads((out / "meta.json").read_text())
    pools = dict(zip(("train", "val"), split_pools(source, 0.2)))
    for split, count in (("train", 30), ("val", 20)):
        rows = list(csv.DictReader((out / f"{split}.csv").open()))
        labels = [int(r["label"]) for r in rows]
        assert len(rows) == count and max(np.bincount(labels, minlength=10)) - min(np.bincount(labels, minlength=10)) <= 1
        for row, record in zip(rows, meta["images"][split]):
            label, placed = int(row["label"]), record["digits"]
            assert [d["digit"] == label for d in placed] == [True, True, True, False, False]
            assert all(source.labels[d["source_index"]] == d["digit"] for d in placed)
            assert {d["source_index"] for d in placed} <= set(pools[split].tolist())  # its own pool only
            canvas = np.asarray(Image.open(out / split / f"{row['image_id']}.png"))
            assert canvas.shape == (200, 200) and canvas.dtype == np.uint8
            boxes = [d["box"] for d in placed]
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                assert x1 - x0 == y1 - y0 == 28
                digit = source.images[placed[i]["source_index"]]
                assert (canvas[y0:y1, x0:x1] >= digit).all()  # the digit's strokes are all there
                for a0, b0, a1, b1 in boxes[i + 1:]:
                    assert not (x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1)  # no two digits overlap
            assert len(record["scribbles"]) == 4


def test_same_seed_same_bytes_and_presets_are_the_papers(generated, tmp_path, mnist_dir):
    out, source = generated
    again = generate_megapixel_mnist(tmp_path / "again", train=30, val=20, image_size=200, noise=4, digits=source,
                                     seed=1, progress=False)
    for name in ("train.csv", "val.csv", "meta.json", "train/train_000007.png", "val/val_000019.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert PRESETS["original"] == {"image_size": 1500, "noise": 50, "train": 5000, "val": 1000}
    # The scaled preset keeps the original's scribbles per pixel.
    density = {name: p["noise"] / p["image_size"] ** 2 for name, p in PRESETS.items()}
    assert density["scaled"] == pytest.approx(density["original"], rel=0.1)


def test_scribbles_are_strokes_not_blobs():
    patterns = scribbles(np.random.default_rng(0))
    assert patterns.shape == (50, 28, 28) and patterns.dtype == np.uint8
    on = (patterns > 0).reshape(50, -1).sum(axis=1)
    assert (on >= 28).all() and (on <= 120).all()  # two thin lines across the box, a few dozen pixels
    assert patterns[patterns > 0].min() >= 0.8 * 255 - 1


def test_the_trainer_reads_it(generated):
    out, _ = generated
    ds = ImageCSVDataset(out / "train.csv", in_chans=1)
    image, label = ds[0]
    assert image.shape == (1, 200, 200) and 0 <= label < 10 and ds.classes is None


def test_cells_are_cut_and_labelled_by_the_digit_mostly_inside(generated, tmp_path):
    out, _ = generated  # 200 px canvases: a 5 x 5 grid of 40 px cells
    cells = cut_digit_cells(out, tmp_path / "cells", 40, background=0.5, seed=3)
    meta = json.loads((out / "meta.json").read_text())
    records = {r["image_id"]: r for r in meta["images"]["train"]}
    images = {"train": set(), "val": set()}
    for part in ("train", "val"):
        rows = list(csv.DictReader((cells / f"{part}.csv").open()))
        counts = np.bincount([int(r["label"]) for r in rows], minlength=BACKGROUND + 1)
        assert counts[BACKGROUND] <= round(0.5 * counts[:BACKGROUND].sum()) + len(records)  # rounding per image
        for row in rows:
            image_id, _, where = row["image_id"].rpartition("_r")
            r, c = map(int, where.split("c"))
            images[part].add(image_id)
            crop = np.asarray(Image.open(cells / part / f"{row['image_id']}.png"))
            canvas = np.asarray(Image.open(out / "train" / f"{image_id}.png"))
            assert (crop == canvas[r * 40:(r + 1) * 40, c * 40:(c + 1) * 40]).all()
            # the digit whose box has the most pixels in the cell, if at least half of the box is inside
            inside = [(max(0, min(x1, c * 40 + 40) - max(x0, c * 40)) * max(0, min(y1, r * 40 + 40) - max(y0, r * 40)),
                       d["digit"]) for d in records[image_id]["digits"] for x0, y0, x1, y1 in [d["box"]]]
            area = max(a for a, _ in inside)
            mostly = {d for a, d in inside if a == area}  # two digits can tie
            assert int(row["label"]) in (mostly if area >= 28 * 28 / 2 else {BACKGROUND})
    assert images["train"] and images["val"] and not images["train"] & images["val"]  # no image on both sides
    with pytest.raises(ValueError, match="multiple of patch_size=64"):
        cut_digit_cells(out, tmp_path / "bad", 64)
