"""The validation split of a data set: stratified by class, and by patient where images carry groups, so
that no patient is seen in training and validation alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchgd.data.datasets import ImageDataset
from patchgd.data.errors import DataError

__all__ = ["check_groups_apart", "grouped_folds", "stratified_split"]


def stratified_split(dataset: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``fraction`` of ``dataset`` for validation, stratified by class, reproducibly from ``seed``.

    A dataset with ``groups`` (patients) is split by group: every group's images land on one side, the
    held-out side being the first fold of scikit-learn's ``StratifiedGroupKFold`` with
    ``round(1 / fraction)`` folds (so ``fraction`` is met as closely as whole groups allow).

    Args:
        dataset: The images to split.
        fraction: Share of the images held out, in (0, 1).
        seed: Seed of the split (scikit-learn's ``train_test_split``, or the group folds' shuffle).

    Returns:
        ``(train, val)`` datasets.

    Raises:
        DataError: A class has too few images (or groups) to appear on both sides.
    """
    # Stratified by class name where there are names, so that data.classes' order (the indices) does not
    # change which images are held out for a seed.
    strata = [dataset.classes[label] for label in dataset.labels] if dataset.classes else dataset.labels
    if dataset.groups is not None:
        folds = grouped_folds(strata, dataset.groups, max(2, round(1 / fraction)), seed, dataset.origin)
        val_idx = [i for i, fold in enumerate(folds) if fold == 0]
        train_idx = [i for i, fold in enumerate(folds) if fold != 0]
        return dataset.subset(train_idx), dataset.subset(val_idx)
    from sklearn.model_selection import train_test_split

    counts = np.bincount(dataset.labels)
    rare = [i for i, c in enumerate(counts) if 0 < c < 2]
    if rare:
        name = dataset.classes[rare[0]] if dataset.classes else rare[0]
        raise DataError(f"{dataset.origin}: class {name!r} has 1 image; a stratified validation split needs at "
                        "least 2 per class (add images, or give a validation CSV or folder)")
    try:
        train_idx, val_idx = train_test_split(np.arange(len(dataset)), test_size=fraction, random_state=seed,
                                              stratify=strata)
    except ValueError as err:  # e.g. fewer held-out images than classes
        raise DataError(f"{dataset.origin}: cannot hold out data.val_fraction={fraction} of {len(dataset)} "
                        f"images stratified by class ({err})") from None
    return dataset.subset(sorted(train_idx)), dataset.subset(sorted(val_idx))


def grouped_folds(labels: Sequence[int | str], groups: Sequence[str], folds: int, seed: int,
                  origin: str | Path = "") -> list[int]:
    """A fold index per item: ``folds`` folds stratified by label with every group in one fold
    (scikit-learn's ``StratifiedGroupKFold``, shuffled by ``seed``).

    Example:
        >>> grouped_folds([0, 0, 1, 1, 0, 1], ["a", "a", "b", "b", "c", "d"], folds=2, seed=0)
        [1, 1, 0, 0, 0, 1]
    """
    from sklearn.model_selection import StratifiedGroupKFold

    distinct = len(set(groups))
    if distinct < folds:
        raise DataError(f"{origin}: {distinct} group(s) cannot fill {folds} folds (each group stays in one); "
                        "expected at least as many groups (patients) as folds")
    assignment = [0] * len(labels)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        for i in held_out:
            assignment[i] = fold
    return assignment


def check_groups_apart(train: ImageDataset, val: ImageDataset) -> None:
    """Refuse a validation split that shares a group (a patient) with its training set.

    Raises:
        DataError: Naming a group found on both sides and how many there are.
    """
    if train.groups is None or val.groups is None:
        return
    shared = sorted(set(train.groups) & set(val.groups))
    if shared:
        raise DataError(f"{val.origin}: group {shared[0]!r} ({len(shared)} group(s) in all) has images in training "
                        f"({train.origin}) and in validation; expected every group on one side (a patient's "
                        "slides together), e.g. data.val_fraction or a kfold column made by group")
