"""Patient-grouped validation splits: no group on both sides, stratification kept, refused overlaps."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchgd.config import load_config
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.splits import check_groups_apart, grouped_folds, stratified_split
from patchgd.data.errors import DataError
from patchgd.engine.data import build_datasets, write_split


def patient_csv(root: Path, patients: int = 20, kfold: dict[str, int] | None = None) -> Path:
    """Patients 0..N-1, one to three slides each (PNG stand-ins), labelled by patient (even: 0, odd: 1)."""
    (root / "train").mkdir(parents=True)
    rows = []
    for p in range(patients):
        for s in range(1 + p % 3):
            name = f"p{p:02d}_s{s}"
            Image.fromarray(np.full((8, 8), p, np.uint8)).save(root / "train" / f"{name}.png")
            fold = "" if kfold is None else f",{kfold.get(name, p % 2)}"
            rows.append(f"{name},{p % 2},patient{p:02d}{fold}")
    header = "image_id,label,case_id" + ("" if kfold is None else ",kfold")
    (root / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "train.csv"


def test_a_fraction_split_keeps_every_patient_on_one_side_and_both_classes_in_each(tmp_path):
    ds = ImageCSVDataset(patient_csv(tmp_path), group_column="case_id")
    train, val = stratified_split(ds, 0.25, seed=0)
    assert not set(train.groups) & set(val.groups)
    assert len(train) + len(val) == len(ds) and set(train.paths) | set(val.paths) == set(ds.paths)
    assert set(Counter(val.labels)) == {0, 1} and set(Counter(train.labels)) == {0, 1}
    assert 0.15 < len(val) / len(ds) < 0.35  # a quarter, as closely as whole patients allow
    assert stratified_split(ds, 0.25, seed=0)[1].paths == val.paths  # reproducible
    assert stratified_split(ds, 0.25, seed=1)[1].paths != val.paths


def test_grouped_folds_are_stratified_and_never_split_a_group():
    labels = [g % 2 for g in range(30) for _ in range(1 + g % 3)]
    groups = [f"g{g}" for g in range(30) for _ in range(1 + g % 3)]
    folds = grouped_folds(labels, groups, 5, seed=3)
    for group in set(groups):
        assert len({f for f, g in zip(folds, groups) if g == group}) == 1, group
    for fold in range(5):
        assert {label for label, f in zip(labels, folds) if f == fold} == {0, 1}
    with pytest.raises(DataError, match="3 group\\(s\\) cannot fill 5 folds"):
        grouped_folds([0, 1, 0], ["a", "b", "c"], 5, seed=0)


def test_a_user_fold_with_a_patient_on_both_sides_is_an_error_naming_it(tmp_path):
    patient_csv(tmp_path, kfold={"p01_s0": 0, "p01_s1": 1})  # patient01's two slides in two folds
    cfg = load_config(None, [f"data.root={tmp_path}", "data.group_column=case_id", "data.fold=0",
                             "data.val_csv=null", "model.in_chans=1"])
    with pytest.raises(DataError, match="group 'patient01'"):
        build_datasets(cfg)


def test_the_run_split_file_lists_the_groups(tmp_path):
    patient_csv(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.group_column=case_id", "data.val_fraction=0.3",
                             "model.in_chans=1"])
    train, val = build_datasets(cfg)
    write_split(tmp_path / "split.csv", tmp_path, train, val)
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert rows[0].keys() == {"image", "label", "split", "group"}
    sides = {}
    for row in rows:
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()) and len(sides) == 20


def test_group_column_must_exist_and_folders_have_none(tmp_path):
    csv_path = patient_csv(tmp_path)
    with pytest.raises(DataError, match="no group column 'patient'"):
        ImageCSVDataset(csv_path, group_column="patient")
    folders = tmp_path / "folders"
    (folders / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folders / "a" / "x.png")
    cfg = load_config(None, [f"data.root={folders}", "data.group_column=case_id"])
    with pytest.raises(DataError, match="names a CSV column"):
        build_datasets(cfg)
    train = ImageCSVDataset(csv_path, group_column="case_id")
    check_groups_apart(train.subset([0]), train.subset([1]))  # different patients: fine
