"""The data side of a run, from a config: the training and validation sets (folders, CSVs, folds, splits,
sequences), their classes, the split file, augmentation and the training loader.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from ..config import Config, check_paths
from ..registry import patch_method
from ..data.augment import Augment
from ..data.datasets import ImageCSVDataset, ImageDataset, ImageFolderDataset, collate_images
from ..data.errors import DataError
from ..data.images import require_one_size
from ..data.intensity import Intensity
from ..data.layouts import class_folders, read_csv
from ..data.lazy import LazyImage
from ..data.sequences import SequenceDataset
from ..data.splits import check_groups_apart, stratified_split
from ..io import atomic_file


DEFAULT_VAL_CSV = "val.csv"  # used when present; another name must exist


def build_datasets(cfg: Config, *, augment: bool = False) -> tuple[ImageDataset | SequenceDataset,
                                                                   ImageDataset | SequenceDataset]:
    """Train and validation sets from ``data.*`` (the layouts and validation rules of
    :class:`~patchgd.config.DataConfig`; validation items use the training set's classes); or, with
    ``data.kind: sequences``, ``train.npz`` and ``val.npz``. With ``augment`` (training), the training set
    carries ``augment.*`` (:func:`build_augmentation`); without, every image is read as stored (extraction,
    statistics)."""
    check_paths(cfg)
    if cfg.data.kind == "sequences":
        return tuple(SequenceDataset(Path(cfg.data.root) / f"{split}.npz", cfg.data.num_classes, cfg.model.in_chans)
                     for split in ("train", "val"))
    train, val = _layout_datasets(cfg)
    check_groups_apart(train, val)
    if cfg.data.image_size is None and not patch_method(cfg.method):  # PatchGD gives each image its own grid
        for dataset in (train, val):
            require_one_size(dataset.paths, dataset.image_sizes)
    if augment:  # here, on the training side alone: a split's subsets never take it along
        train.transform = build_augmentation(cfg)
    return train, val


def _layout_datasets(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    root, read = Path(d.root), dict(read_options(cfg), verify=d.verify, on_error=d.on_error)
    train_csv = root / d.train_csv
    if train_csv.is_file():
        common = dict(num_classes=d.num_classes, label_column=d.label_column, id_column=d.id_column,
                      group_column=d.group_column, exclude_fold=d.test_fold, **read)
        if d.fold is not None:
            train = ImageCSVDataset(train_csv, root / d.train_dir, fold=d.fold, split="train", classes=d.classes,
                                    **common)
            return train, ImageCSVDataset(train_csv, root / d.train_dir, fold=d.fold, split="val",
                                          classes=train.classes, **common)
        train = ImageCSVDataset(train_csv, root / d.train_dir, classes=d.classes, **common)
        val_csv = root / d.val_csv if d.val_csv is not None else None
        if val_csv is not None and (val_csv.is_file() or d.val_csv != DEFAULT_VAL_CSV):
            return train, ImageCSVDataset(val_csv, root / d.val_dir, classes=train.classes,
                                          **{**common, "exclude_fold": None})
    else:
        if d.group_column is not None:
            raise DataError(f"data.group_column={d.group_column!r} names a CSV column, but {root} has no "
                            f"{d.train_csv}; expected a CSV listing each image with its group")
        folder = root / d.train_dir if (root / d.train_dir).is_dir() else root
        if not class_folders(folder):
            raise DataError(f"{root}: no {d.train_csv} and no class folders with images; expected {train_csv} "
                            f"(columns {d.id_column} and a label) or {folder}/<class name>/<images>")
        train = ImageFolderDataset(folder, classes=d.classes, **read)
        if folder != root and (root / d.val_dir).is_dir():
            return train, ImageFolderDataset(root / d.val_dir, classes=train.classes, **read)
    return stratified_split(train, d.val_fraction, cfg.train.seed)


def build_test_set(cfg: Config, train_set: ImageDataset | SequenceDataset,
                   val_set: ImageDataset | SequenceDataset) -> ImageDataset | None:
    """The test set, held out from training and model selection: ``data.test_fold`` of the training CSV, or
    ``data.test_csv`` beside it (images in ``data.test_dir``), or a ``data.test_dir`` folder of class folders
    beside ``train/`` and ``val/``; None without one. Read with the training set's classes.

    Raises:
        DataError: The test set shares a group (a patient) with training or validation.
    """
    d = cfg.data
    if d.kind == "sequences":
        return None
    root, read = Path(d.root), dict(read_options(cfg), verify=d.verify, on_error=d.on_error)
    common = dict(num_classes=d.num_classes, label_column=d.label_column, id_column=d.id_column,
                  group_column=d.group_column, classes=train_set.classes, **read)
    if d.test_fold is not None:
        test = ImageCSVDataset(root / d.train_csv, root / d.train_dir, fold=d.test_fold, split="val", **common)
    elif (root / d.test_csv).is_file():
        # Patients, for intervals by patient, where the test CSV names them (its images are none of training's).
        named = d.group_column is not None and d.group_column in read_csv(root / d.test_csv)[1]
        test = ImageCSVDataset(root / d.test_csv, root / d.test_dir, **{**common, "group_column": d.group_column if named else None})
    elif not (root / d.train_csv).is_file() and (root / d.train_dir).is_dir() and (root / d.test_dir).is_dir():
        test = ImageFolderDataset(root / d.test_dir, classes=train_set.classes, **read)
    else:
        return None
    check_groups_apart(train_set, test)
    check_groups_apart(val_set, test)
    return test


def labels_of(dataset: ImageDataset | SequenceDataset) -> list[int]:
    """The class indices of a dataset's items."""
    return dataset.y.tolist() if isinstance(dataset, SequenceDataset) else dataset.labels


def origin_of(dataset: ImageDataset | SequenceDataset) -> str | Path:
    """What a dataset was read from (a CSV, a folder, an npz file), for messages."""
    return dataset.path if isinstance(dataset, SequenceDataset) else dataset.origin


def resolve_classes(cfg: Config, train_set: ImageDataset, val_set: ImageDataset) -> Config:
    """``cfg`` with ``data.num_classes`` and ``data.classes`` as the labels say.

    Raises:
        DataError: ``data.num_classes`` is given and disagrees with the labels, or fewer than two
            classes are found.
    """
    d = cfg.data
    if getattr(train_set, "classes", None) is not None:
        classes, found = list(train_set.classes), len(train_set.classes)
        if d.num_classes is not None and d.num_classes != found:
            raise DataError(f"data.num_classes={d.num_classes} but the labels of {train_set.origin} name {found} "
                            f"classes {classes}; expected {found} (or leave data.num_classes null to infer it)")
    else:
        classes, found = None, max(labels_of(train_set) + labels_of(val_set)) + 1
    num_classes = d.num_classes or found
    if num_classes < 2:
        raise DataError(f"{origin_of(train_set)}: the labels hold only class 0; expected at least two classes")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, num_classes=num_classes, classes=classes))


def class_name(cfg: Config, index: int) -> str:
    """The name of class ``index``: from ``data.classes``, else the index itself."""
    return cfg.data.classes[index] if cfg.data.classes else str(index)


def image_name(root: str | Path, path: str | Path) -> str:
    """How run files name an image: relative to ``data.root`` when inside it, else its absolute path."""
    root, path = Path(root).resolve(), Path(path).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def write_split(path: Path, root: str | Path, train_set: ImageDataset, val_set: ImageDataset,
                test_set: ImageDataset | None = None) -> None:
    """Record which image went to training, which to validation and which to the test set (``split.csv``:
    image, label, split, and the image's group when the data has groups)."""
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        grouped = train_set.groups is not None
        writer.writerow(["image", "label", "split", *(["group"] if grouped else [])])
        for split, ds in (("train", train_set), ("val", val_set), ("test", test_set)):
            for i, (p, label) in enumerate(zip(ds.paths, ds.labels) if ds is not None else ()):
                writer.writerow([image_name(root, p), ds.classes[label] if ds.classes else label, split,
                                 *([ds.groups[i] if ds.groups else ""] if grouped else [])])


def build_augmentation(cfg: Config) -> Augment | None:
    """The training images' transform from ``augment.*`` (:class:`~patchgd.data.augment.Augment`), or None.

    Images in memory are moved and jittered whole before they are cut; a slide read in pieces carries
    the draws to its grid, which applies them to every patch it reads, in the fill and every inner
    iteration alike, so the grid, ``Z`` and the labels stay consistent.
    """
    a = cfg.augment
    if not any((a.flip, a.rotate90, a.brightness, a.contrast, a.saturation, a.hue, a.hed)):
        return None
    return Augment(a, patch_size=cfg.model.patch_size if patch_method(cfg.method) else None)


def build_train_loader(cfg: Config, train_set: ImageDataset, generator: torch.Generator,
                       sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False) -> DataLoader:
    """Shuffled batches of ``train_set`` (or in the order of ``sampler``, a process's shard under
    torchrun); with ``train.balanced_sampler``, drawn with replacement with probability inversely
    proportional to each image's class frequency (every class equally often). With a cached fill the
    labels come with each image's index (:class:`KeyedDataset`)."""
    if cfg.train.balanced_sampler:
        if sampler is not None:
            raise ValueError("train.balanced_sampler=true is not available with several processes (torchrun) "
                             "yet; train on one process, or without it")
        labels = labels_of(train_set)
        counts = np.bincount(labels)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(train_set), replacement=True,
                                        generator=generator)
    keyed = KeyedDataset(train_set) if cfg.patchgd.fill == "cached" else train_set
    return DataLoader(keyed, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=cfg.data.num_workers, generator=generator,
                      collate_fn=collate_images)


class KeyedDataset(torch.utils.data.Dataset):
    """A data set whose labels come with each item's index, ``(label, index)``, batched as ``(B, 2)``: what a
    cached fill keys its store by (the pair travels together through skipping and sharding)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item, label = self.dataset[index]
        return item, (label, index)


def read_options(cfg: Config) -> dict:
    """How ``cfg`` reads an image (:func:`~patchgd.data.datasets.load_image`'s options): PatchGD keeps files
    that can be read in pieces lazy, on its patch grid; the GD baselines read every image whole."""
    d = cfg.data
    return dict(in_chans=cfg.model.in_chans, image_size=d.image_size, level=d.level, mpp=d.mpp, slide_mpp=d.slide_mpp,
                patch_size=cfg.model.patch_size if patch_method(cfg.method) else None, tissue=d.tissue,
                tissue_fraction=d.tissue_fraction, intensity=Intensity.from_config(d), reader=d.reader)


def first_item(dataset) -> torch.Tensor | LazyImage:
    """The first item of ``dataset`` that could be read (with ``data.on_error: skip`` some may not), as
    stored: not augmented."""
    for index in range(len(dataset)):
        if not isinstance(dataset, ImageDataset):
            return dataset[index][0]
        try:
            return dataset.load_image(index)
        except DataError:
            if dataset.on_error == "stop":
                raise
    raise DataError(f"{origin_of(dataset)}: none of its {len(dataset)} images could be read")


def item_shape(image: torch.Tensor | LazyImage) -> tuple[int, int, int]:
    """``(C, H, W)`` of a dataset item, read from a slide's header for a :class:`~patchgd.data.lazy.LazyImage`."""
    if isinstance(image, LazyImage):
        return image.source.channels, image.source.height, image.source.width
    return tuple(image.shape)


def check_patch_fits(cfg: Config, shape: tuple[int, ...], where) -> None:
    """Refuse PatchGD on an image smaller than one patch (``shape``: its ``(C, H, W)``, read from ``where``):
    its grid would be all padding. Training and prediction alike."""
    if patch_method(cfg.method) and len(shape) == 3 and cfg.model.patch_size > min(shape[1:]):
        raise ValueError(f"model.patch_size={cfg.model.patch_size} is larger than the "
                         f"{'x'.join(map(str, shape[1:]))} images of {where}; expected at most {min(shape[1:])} px "
                         "(a smaller patch, or no data.image_size downscaling)")


def train_loader_drops_last(num_images: int, batch_size: int) -> bool:
    """Whether the training loader drops its last batch: when it would hold a single image.

    A batch of one image whose sampled patches give a single value per channel fails in the backbone's
    BatchNorm (training mode needs more than one value); the images are reshuffled every epoch, so the one
    left out differs from epoch to epoch.
    """
    return batch_size > 1 and num_images % batch_size == 1


def describe_data(cfg: Config, train_set: ImageDataset, val_set: ImageDataset) -> str:
    """One line per class: its name and how many training and validation images it has."""
    train_counts = np.bincount(labels_of(train_set), minlength=cfg.data.num_classes)
    val_counts = np.bincount(labels_of(val_set), minlength=cfg.data.num_classes)
    lines = [f"data: {len(train_set)} train items from {origin_of(train_set)}, {len(val_set)} validation items "
             f"from {origin_of(val_set)}; {cfg.data.num_classes} classes"]
    lines += [f"  {class_name(cfg, c)}: {train_counts[c]} train / {val_counts[c]} val"
              for c in range(cfg.data.num_classes)]
    unknown = getattr(train_set, "unknown_mpp", []) + getattr(val_set, "unknown_mpp", [])
    if unknown:
        path, why = unknown[0]
        lines.append(f"  resolution: {len(unknown)} slide(s) with unknown microns per pixel, e.g. {path}: {why} "
                     "(give it with an mpp column in the CSV or data.slide_mpp)")
    return "\n".join(lines)
