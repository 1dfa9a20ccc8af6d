"""Class-folder layout, class-name labels and the stratified validation split."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchgd.data.datasets import ImageCSVDataset, ImageFolderDataset
from patchgd.data.splits import stratified_split
from patchgd.data.errors import DataError


def class_tree(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((size, size), 10 * i, np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def test_class_folders_sorted_names_and_labels(tmp_path):
    root = class_tree(tmp_path / "imgs", {"tumour": 2, "normal": 3})
    (root / "notes.txt").write_text("ignored")
    (root / "normal" / "deeper").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "normal" / "deeper" / "x.png")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["normal", "tumour"]
    names = [p.relative_to(root).as_posix() for p in ds.paths]
    assert names == ["normal/deeper/x.png", "normal/normal_0.png", "normal/normal_1.png", "normal/normal_2.png",
                     "tumour/tumour_0.png", "tumour/tumour_1.png"]
    assert ds.labels == [0, 0, 0, 0, 1, 1]
    image, label = ds[5]
    assert label == 1 and image.shape == (1, 8, 8) and image.dtype == torch.uint8 and image.max().item() == 10


def test_class_folders_given_order_and_errors(tmp_path):
    root = class_tree(tmp_path / "imgs", {"b": 1, "a": 1})
    assert ImageFolderDataset(root, classes=["b", "a", "c"]).labels == [1, 0]
    with pytest.raises(DataError, match=r"class folder\(s\) \['b'\] are not among the classes \['a'\]"):
        ImageFolderDataset(root, classes=["a"])
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        ImageFolderDataset(tmp_path / "empty")


def test_csv_with_class_names(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / f"p{i}.png")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("file,diagnosis\np0,noise\np1,signal\np2, noise\n")
    ds = ImageCSVDataset(csv_path, id_column="file", label_column="diagnosis")
    assert ds.classes == ["noise", "signal"] and ds.labels == [0, 1, 0]
    # a validation CSV is read with the training set's classes
    assert ImageCSVDataset(csv_path, id_column="file", label_column="diagnosis",
                           classes=["signal", "noise"]).labels == [1, 0, 1]


def test_stratified_split_is_seeded_and_keeps_proportions(tmp_path):
    root = class_tree(tmp_path / "imgs", {"a": 10, "b": 20})
    ds = ImageFolderDataset(root)
    train, val = stratified_split(ds, 0.3, seed=0)
    assert len(val) == 9 and Counter(val.labels) == {0: 3, 1: 6}
    assert sorted(map(str, train.paths + val.paths)) == sorted(map(str, ds.paths))
    again = stratified_split(ds, 0.3, seed=0)[1]
    assert again.paths == val.paths and stratified_split(ds, 0.3, seed=1)[1].paths != val.paths
    assert val.classes == ["a", "b"] and val[0][0].shape == (1, 8, 8)


def test_stratified_split_needs_two_images_per_class(tmp_path):
    ds = ImageFolderDataset(class_tree(tmp_path / "imgs", {"a": 5, "lonely": 1}))
    with pytest.raises(DataError, match="class 'lonely' has 1 image"):
        stratified_split(ds, 0.2, seed=0)
