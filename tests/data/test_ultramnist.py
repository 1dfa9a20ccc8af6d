import csv
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchgd.data.prepare import ultramnist
from patchgd.data.prepare.digits import load_sklearn_digits
from patchgd.data.prepare.ultramnist import (
    default_max_scale,
    generate_ultramnist,
    preset_options,
    sample_composition,
    sample_digit_sizes,
)

SIZE = 128
N_TRAIN, N_VAL = 43, 21


@pytest.fixture(scope="module")
def digits():
    return load_sklearn_digits()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("um") / "set"
    return generate_ultramnist(out, train=N_TRAIN, val=N_VAL, image_size=SIZE, digits=digits, seed=3, progress=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["meta.json", "train", "train.csv", "val", "val.csv"]
    for split, count in (("train", N_TRAIN), ("val", N_VAL)):
        rows = read_csv(dataset / f"{split}.csv")
        assert list(rows[0]) == ["image_id", "label"] and len(rows) == count
        assert sorted(p.stem for p in (dataset / split).iterdir()) == sorted(r["image_id"] for r in rows)
        image = Image.open(dataset / split / f"{rows[0]['image_id']}.png")
        assert image.mode == "L" and image.size == (SIZE, SIZE)
    assert not list(dataset.parent.glob("*.tmp-*"))


def test_label_is_sum_of_placed_digits(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    for split in ("train", "val"):
        labels = {r["image_id"]: int(r["label"]) for r in read_csv(dataset / f"{split}.csv")}
        assert len(meta["images"][split]) == len(labels)
        for record in meta["images"][split]:
            assert 3 <= len(record["digits"]) <= 5
            assert sum(d["digit"] for d in record["digits"]) == labels[record["image_id"]] == record["label"]


def test_digits_inside_image_without_overlap(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    for split in ("train", "val"):
        for record in meta["images"][split]:
            coverage = np.zeros((SIZE, SIZE), int)
            for d in record["digits"]:
                x0, y0, x1, y1 = d["box"]
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
                assert x1 - x0 == y1 - y0 and x1 - x0 in (14, 28, 56)  # max scale 2 at 128 px
                coverage[y0:y1, x0:x1] += 1
            assert coverage.max() == 1
            pixels = np.asarray(Image.open(dataset / split / f"{record['image_id']}.png"))
            assert pixels[coverage == 0].max() == 0  # black background
            for d in record["digits"]:
                x0, y0, x1, y1 = d["box"]
                assert pixels[y0:y1, x0:x1].max() > 100  # every digit drawn


def test_classes_balanced(dataset):
    for split, count in (("train", N_TRAIN), ("val", N_VAL)):
        counts = Counter(int(r["label"]) for r in read_csv(dataset / f"{split}.csv"))
        assert set(counts) == set(range(10))
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == count


def test_pools_disjoint(dataset, digits):
    meta = json.loads((dataset / "meta.json").read_text())
    n_val = round(0.2 * len(digits))
    first_val = len(digits) - n_val
    used = {
        split: {d["source_index"] for r in meta["images"][split] for d in r["digits"]} for split in ("train", "val")
    }
    assert max(used["train"]) < first_val <= min(used["val"])
    assert meta["pools"] == {"train": [0, first_val], "val": [first_val, len(digits)]}
    for split in ("train", "val"):
        for r in meta["images"][split]:
            for d in r["digits"]:
                assert digits.labels[d["source_index"]] == d["digit"]


def test_meta_records_options(dataset, digits):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["digit_source"] == digits.description
    assert meta["options"]["image_size"] == SIZE and meta["options"]["max_scale"] == 2


def test_deterministic(tmp_path, digits, dataset):
    again = generate_ultramnist(tmp_path / "a", train=N_TRAIN, val=N_VAL, image_size=SIZE, digits=digits, seed=3, progress=False)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (dataset / f).read_bytes() == (again / f).read_bytes(), f
    other = generate_ultramnist(tmp_path / "b", train=N_TRAIN, val=N_VAL, image_size=SIZE, digits=digits, seed=4, progress=False)
    assert (other / "train.csv").read_bytes() != (dataset / "train.csv").read_bytes()
    assert (other / "train" / "train_000000.png").read_bytes() != (dataset / "train" / "train_000000.png").read_bytes()


def test_train_set_independent_of_val_count(tmp_path, digits, dataset):
    fewer = generate_ultramnist(tmp_path / "a", train=N_TRAIN, val=3, image_size=SIZE, digits=digits, seed=3, progress=False)
    for p in (dataset / "train").iterdir():
        assert (fewer / "train" / p.name).read_bytes() == p.read_bytes()


def test_mnist_source_at_default_size(tmp_path, mnist_dir):
    out = generate_ultramnist(tmp_path / "m", train=10, val=10, digits=mnist_dir, seed=0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["max_scale"] == 9 and meta["pools"] == {"train": [0, 8000], "val": [8000, 10000]}
    sides = {d["box"][2] - d["box"][0] for r in meta["images"]["train"] + meta["images"]["val"] for d in r["digits"]}
    assert sides <= {14} | {28 * f for f in range(1, 10)}
    assert Image.open(out / "val" / "val_000000.png").size == (512, 512)


def test_scale_distribution_is_v_shaped():
    rng = np.random.default_rng(0)
    sizes = sample_digit_sizes(rng, 200_000, max_scale=9)
    weights = np.array([5, 4, 3, 2, 1, 2, 3, 4, 5]) / 29
    expected = {14: weights[0] / 2, 28: weights[0] / 2} | {28 * f: weights[f - 1] for f in range(2, 10)}
    counts = Counter(sizes.tolist())
    assert set(counts) == set(expected)
    for side, p in expected.items():
        assert counts[side] / len(sizes) == pytest.approx(p, abs=0.005), side


def test_default_max_scale():
    assert [default_max_scale(s) for s in (28, 64, 128, 256, 512, 4000)] == [1, 1, 2, 4, 9, 9]


def test_composition_uniform_over_tuples():
    rng = np.random.default_rng(0)
    draws = Counter(tuple(sample_composition(rng, 2, 3, 3)) for _ in range(6000))
    tuples = {t for t in itertools.product(range(10), repeat=3) if sum(t) == 2}
    assert set(draws) == tuples and len(tuples) == 6
    for t in tuples:
        assert draws[t] / 6000 == pytest.approx(1 / 6, abs=0.03)


def test_every_original_label_reachable():
    rng = np.random.default_rng(0)
    options = preset_options("original")
    assert options == {"image_size": 4000, "num_classes": 28}
    for label in range(options["num_classes"]):
        for _ in range(20):
            digits = sample_composition(rng, label, 3, 5)
            assert sum(digits) == label and 3 <= len(digits) <= 5 and all(0 <= d <= 9 for d in digits)
    assert sample_composition(rng, 0, 3, 5) in ([0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0])
    assert len(sample_composition(rng, 27, 3, 5)) in (3, 4, 5)
    with pytest.raises(ValueError, match="label 28 cannot be the sum of 3..3 digits"):
        sample_composition(rng, 28, 3, 3)


def test_bad_options(tmp_path, digits):
    kwargs = dict(train=5, val=5, digits=digits, progress=False)
    with pytest.raises(ValueError, match="num_classes=47"):
        generate_ultramnist(tmp_path / "x", num_classes=47, **kwargs)
    with pytest.raises(ValueError, match="max_scale=5 makes digits of 140 px"):
        generate_ultramnist(tmp_path / "x", image_size=128, max_scale=5, **kwargs)
    with pytest.raises(ValueError, match="min_digits=4, max_digits=3"):
        generate_ultramnist(tmp_path / "x", min_digits=4, max_digits=3, **kwargs)
    with pytest.raises(ValueError, match="unknown UltraMNIST preset 'huge'"):
        preset_options("huge")
    assert not (tmp_path / "x").exists()


def test_interrupted_run_leaves_nothing(tmp_path, digits, monkeypatch):
    calls = 0
    real = ultramnist._make_image

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ultramnist, "_make_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_ultramnist(tmp_path / "out", train=10, val=4, image_size=SIZE, digits=digits, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path, digits):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    kwargs = dict(train=4, val=2, image_size=SIZE, digits=digits, progress=False)
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        generate_ultramnist(out, **kwargs)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    generate_ultramnist(out, overwrite=True, **kwargs)
    assert not (out / "keep.txt").exists() and (out / "train.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_overwrite_keeps_old_set(tmp_path, digits, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(ultramnist, "_write_csv", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        generate_ultramnist(out, train=4, val=2, image_size=SIZE, digits=digits, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_directory_is_used(tmp_path, digits):
    (tmp_path / "out").mkdir()
    generate_ultramnist(tmp_path / "out", train=3, val=0, image_size=SIZE, digits=digits, progress=False)
    assert read_csv(tmp_path / "out" / "val.csv") == [] and len(read_csv(tmp_path / "out" / "train.csv")) == 3
