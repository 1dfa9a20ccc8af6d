"""Datasets of images: listed in a CSV file or sorted into class folders (the layouts:
:mod:`patchgd.data.layouts`), whole-slide files among them; loading an item, the collate that batches
them, and the per-channel statistics that ``data.mean``/``data.std`` take. Over 400 lines because every
layout reads its items through :class:`ImageDataset`'s one path (verification, levels, tissue, skips)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from patchgd.config import ON_ERROR, TISSUE_METHODS
from patchgd.data.errors import DataError, Skipped
from patchgd.data.images import check_images, image_channels
from patchgd.data.intensity import Intensity, prepare_pixels
from patchgd.data.layouts import (FOLD_COLUMN, MPP_COLUMN, check_unique, class_folders, encode_labels,
                                  find_images, list_images, mpp_column, pick_label_column, read_csv, require_column,
                                  resolve_image_dir, select_fold)
from patchgd.data.readers import ArraySource, open_source
from patchgd.data.lazy import LazyImage
from patchgd.normalize import to_unit_range
from patchgd.registry import suffixes
from patchgd.runlog import Progress


SPLITS = ("train", "val")
# PNG and JPEG are always decoded whole, so they are not opened up front.
_WHOLE_ONLY = (".png", ".jpg", ".jpeg")
_THUMBNAIL_SIDE = 2048  # the picture of a slide that its statistics are computed from


class ImageDataset(Dataset):
    """Image files with their class indices: the reading every layout shares.

    Every TIFF or slide file is opened when the dataset is built (at the chosen level), so bad data fails
    before training starts. Items are ``(image, label)``, ``image`` as :func:`load_image` gives it:
    unsigned-integer pixels in the file's own dtype (uint8 for 8-bit images and every slide) - scaling and
    ``mean``/``std`` are the model's first step, on the device - or float32 in [0, 1] when ``intensity``
    asks for more than the dtype's range (floats, signed integers, a bit depth, a window, a stretch). With
    ``patch_size`` (PatchGD), a file that can be read in pieces (a whole-slide image, a tiled TIFF) is a
    :class:`~patchgd.data.lazy.LazyImage`. Batch items with :func:`collate_images`.

    Args:
        paths: The image files.
        labels: Their class indices.
        classes: Class names, index ``i`` naming class ``i``; None when the labels are plain integers.
        origin: What the list came from (a CSV file, a folder), named in messages.
        in_chans: 1 (grayscale) or 3 (RGB); images are converted to it.
        image_size: Resize every image to ``image_size × image_size`` (bilinear, antialiased), read whole.
        level: Pyramid level of multi-resolution files (0 = full resolution; None for 0 or ``mpp``).
        mpp: Target microns per pixel, instead of ``level``.
        slide_mpp: Every slide's microns per pixel at level 0, instead of its metadata.
        slide_mpps: One image's level-0 microns per pixel each (None: ``slide_mpp`` or the file's).
        patch_size: PatchGD's patch side: files readable in pieces stay lazy, with a tissue mask of this grid.
        tissue: ``"otsu"`` masks the background cells of lazy images; ``"none"`` keeps every cell.
        tissue_fraction: Least tissue fraction of a cell that is encoded and sampled.
        intensity: How pixel values map to [0, 1] (default: :class:`~patchgd.data.intensity.Intensity`).
        transform: Applied to each item (augmentation of training images; :class:`~patchgd.data.augment.Augment`
            takes lazy images too).
        verify: How the images are checked when the dataset is built: ``"header"`` reads each header
            (size, channels, pixel type), ``"full"`` decodes each image whole (and checks its values against
            ``intensity``); None leaves the images to a caller that reads them its own way. ``image_sizes``
            holds each image's ``(height, width)`` as stored (None without a check).
        groups: The group of each image (a patient, a case), which a validation split keeps on one side;
            None when images are independent.
        reader: The reader of every file by name (``data.reader``); None chooses by suffix
            (:func:`~patchgd.data.readers.open_source`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        *,
        classes: Sequence[str] | None = None,
        origin: str | Path = "",
        in_chans: int = 1,
        image_size: int | None = None,
        level: int | None = None,
        mpp: float | None = None,
        slide_mpp: float | None = None,
        slide_mpps: Sequence[float | None] | None = None,
        patch_size: int | None = None,
        tissue: str = "otsu",
        tissue_fraction: float = 0.1,
        intensity: Intensity | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        verify: str | None = "header",
        groups: Sequence[str] | None = None,
        on_error: str = "stop",
        reader: str | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}; expected 1 or 3")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size}; expected a positive number of pixels")
        if tissue not in TISSUE_METHODS:
            raise ValueError(f"tissue={tissue!r}; expected one of {TISSUE_METHODS}")
        if level is not None and mpp is not None:
            raise ValueError(f"level={level} and mpp={mpp}: choose the resolution by one of them")
        self.paths = list(paths)
        self.labels = list(labels)
        self.groups = list(groups) if groups is not None else None
        self.slide_mpps = [slide_mpp if m is None else m for m in slide_mpps] if slide_mpps else [slide_mpp] * len(self.paths)
        self.classes = list(classes) if classes is not None else None
        self.origin = origin
        self.in_chans = in_chans
        self.image_size = image_size
        self.read_options = dict(level=level, mpp=mpp, patch_size=patch_size, tissue=tissue,
                                 tissue_fraction=tissue_fraction, intensity=intensity or Intensity(), reader=reader)
        self.transform = transform
        self.on_error = on_error
        self.unknown_mpp: list[tuple[Path, str]] = []  # slides whose resolution is unknown, and why
        self.excluded: list[Skipped] = []  # with on_error="skip": the files that could not be opened
        self.image_sizes = None if verify is None else self._check(verify == "full")

    def _check(self, full: bool) -> list[tuple[int, int]]:
        """``(height, width)`` of every image: PNG and JPEG checked as ``verify`` says (a full decode also
        against ``intensity``), every other file (TIFF, slide) opened at the chosen level, which reads its
        header and not its pixels. Progress is shown on stderr. With ``on_error="skip"`` a file that fails
        leaves the dataset and is listed in :attr:`excluded`."""
        shown = Progress(self.paths, f"checking {self.origin}", every=max(10, len(self.paths) // 10), unit="image",
                         write=functools.partial(print, file=sys.stderr))
        level, mpp = self.read_options["level"], self.read_options["mpp"]
        sizes, kept = [], []
        for i, (path, slide_mpp) in enumerate(zip(shown, self.slide_mpps)):
            try:
                if path.suffix.lower() in _WHOLE_ONLY:
                    sizes += check_images([path], self.in_chans, full=full, intensity=self.read_options["intensity"])
                else:
                    with open_source(path, in_chans=self.in_chans, level=level, mpp=mpp, slide_mpp=slide_mpp,
                                     reader=self.read_options["reader"]) as source:
                        sizes.append((source.height, source.width))
                        known, why = source.resolution()
                        if known is None and source.tiled:  # a slide; a strip TIFF, decoded whole, has no mpp to know
                            self.unknown_mpp.append((path, why))
            except DataError as err:
                if self.on_error == "stop":
                    raise
                self.excluded.append(Skipped.of(path, err, level))
                continue
            kept.append(i)
        if self.excluded:
            self._keep(kept)
        return sizes

    def _keep(self, indices: list[int]) -> None:
        """Keep only the items at ``indices`` (the per-item lists, in their order)."""
        self.paths = [self.paths[i] for i in indices]
        self.labels = [self.labels[i] for i in indices]
        self.slide_mpps = [self.slide_mpps[i] for i in indices]
        if self.groups is not None:
            self.groups = [self.groups[i] for i in indices]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | LazyImage | Skipped, int]:
        try:
            image = self.load_image(index)
        except DataError as err:
            if self.on_error == "stop":
                raise
            return Skipped.of(self.paths[index], err, self.read_options["level"]), self.labels[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def load_image(self, index: int) -> torch.Tensor | LazyImage:
        """The image at ``index``, as :func:`load_image` reads it with this dataset's options (not augmented).

        Args:
            index: The row.
        """
        return load_image(self.paths[index], self.in_chans, self.image_size, slide_mpp=self.slide_mpps[index],
                          **self.read_options)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """A dataset of the items at ``indices``, read the same way (without ``transform``)."""
        indices = list(indices)
        subset = ImageDataset([self.paths[i] for i in indices], [self.labels[i] for i in indices],
                              classes=self.classes, origin=self.origin, in_chans=self.in_chans,
                              image_size=self.image_size, verify=None,
                              groups=None if self.groups is None else [self.groups[i] for i in indices],
                              slide_mpps=[self.slide_mpps[i] for i in indices], on_error=self.on_error,
                              **self.read_options)
        subset.excluded = list(self.excluded)  # of the data set both sides were taken from
        if self.image_sizes is not None:  # checked already, as part of this dataset
            subset.image_sizes = [self.image_sizes[i] for i in indices]
            picked = {self.paths[i] for i in indices}
            subset.unknown_mpp = [(path, why) for path, why in self.unknown_mpp if path in picked]
        return subset


class ImageCSVDataset(ImageDataset):
    """Images in a folder, listed with their labels (integers or class names) in a CSV file.

    The CSV is validated when the dataset is built (columns, labels, folds and that every image file
    exists), so bad data fails before training starts. Labels that are all integers are class indices
    (into ``classes`` when given: ``[sparse, dense]`` names 0 and 1); otherwise they are class names,
    indexed in ``classes`` (given, or the sorted names found).

    Args:
        csv_path: The CSV file, with an id column and a label column.
        image_dir: The image folder. None looks beside the CSV for a folder named like it
            (``train.csv`` -> ``train/``), then for ``<stem>_images/`` (``train_images/``, as PANDA).
        num_classes: When given, every integer label must lie in ``[0, num_classes)``.
        classes: Class names in index order; every label must be one of them, or an index into them
            (None: the sorted names found, or integer labels).
        label_column: The label column; None picks the first of ``label``, ``isup_grade`` present.
        id_column: The image id column. An id is a file name, with or without one of the extensions of
            the suffixes the readers claim (:func:`patchgd.registry.suffixes`: ``.png .jpg .jpeg .tif .tiff`` and the slide formats).
        fold: With a ``kfold`` column, the fold held out for validation.
        split: With ``fold``: ``"train"`` keeps rows whose ``kfold != fold``, ``"val"`` those with
            ``kfold == fold``.
        group_column: A column naming each image's group (a patient or case id), kept on one side of
            every validation split.
        exclude_fold: With a ``kfold`` column, a fold left out altogether (the test fold), before ``fold``.
        **read: How images are read: ``in_chans``, ``image_size``, ``level``, ``mpp``, ``patch_size``,
            ``tissue``, ``tissue_fraction``, ``intensity``, ``transform`` (see :class:`ImageDataset`).

    Raises:
        FileNotFoundError: The CSV, the image folder or an image file is missing.
        DataError: A column is missing, a label or fold value is invalid, or a file cannot be opened.

    Example:
        >>> ds = ImageCSVDataset("data/panda/train.csv", num_classes=6, fold=0, split="val",
        ...                      in_chans=3, image_size=512)  # doctest: +SKIP
        >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path | None = None,
        *,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        label_column: str | None = None,
        id_column: str = "image_id",
        fold: int | None = None,
        split: str | None = None,
        group_column: str | None = None,
        exclude_fold: int | None = None,
        **read,
    ) -> None:
        if (fold is None) != (split is None):
            raise ValueError(f"fold={fold}, split={split!r}; give both (split one of {SPLITS}) or neither")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {SPLITS}")
        self.csv_path = Path(csv_path)
        self.image_dir = resolve_image_dir(self.csv_path, image_dir)

        rows, columns = read_csv(self.csv_path)
        self.label_column = pick_label_column(self.csv_path, columns, label_column)
        require_column(self.csv_path, columns, id_column, "image id")
        check_unique(self.csv_path, rows, id_column, self.label_column)
        if group_column is not None:
            require_column(self.csv_path, columns, group_column, "group")
        if exclude_fold is not None:  # a test fold: out of the training and validation rows
            require_column(self.csv_path, columns, FOLD_COLUMN, "fold")
            rows = select_fold(self.csv_path, rows, exclude_fold, "train")
        if fold is not None:
            require_column(self.csv_path, columns, FOLD_COLUMN, "fold")
            rows = select_fold(self.csv_path, rows, fold, split)
        self.image_ids = [row[id_column] for _, row in rows]
        labels, classes = encode_labels(self.csv_path, [(line, row[id_column], row[self.label_column])
                                                         for line, row in rows], classes, num_classes)
        groups = None if group_column is None else [row[group_column].strip() for _, row in rows]
        slide_mpps = mpp_column(self.csv_path, rows) if MPP_COLUMN in columns else None
        super().__init__(find_images(self.image_dir, self.image_ids), labels, classes=classes,
                         origin=self.csv_path, groups=groups, slide_mpps=slide_mpps, **read)


class ImageFolderDataset(ImageDataset):
    """Images sorted into one subfolder per class, as torchvision's ``ImageFolder``: ``folder/cat/1.png``.

    Class names are the subfolder names, indexed in sorted order unless ``classes`` gives the order.
    Images are found in each class folder and its subfolders, in sorted order; files of other types are
    ignored.

    Args:
        folder: The folder holding the class folders.
        classes: Class names in index order; every class folder must be one of them, and a class
            without a folder has no images here (a validation set may lack one).
        **read: How images are read (see :class:`ImageDataset`).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        DataError: No class folder holds an image, or a folder is not among ``classes``.

    Example:
        >>> ds = ImageFolderDataset("my_images/train", in_chans=3)  # doctest: +SKIP
        >>> ds.classes  # doctest: +SKIP
        ['benign', 'malignant']
    """

    def __init__(self, folder: str | Path, *, classes: Sequence[str] | None = None, **read) -> None:
        self.folder = Path(folder)
        found = class_folders(self.folder)
        if not found:
            raise DataError(f"{self.folder}: no class folders with images; expected {self.folder}/<class name>/"
                            f"<images> with extensions {' '.join(suffixes())}")
        if classes is None:
            classes = sorted(found)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{self.folder}: class folder(s) {unknown} are not among the classes {list(classes)} "
                            "(of the training set, or data.classes)")
        index = {name: i for i, name in enumerate(classes)}
        paths, labels = [], []
        for name in sorted(found):
            paths += found[name]
            labels += [index[name]] * len(found[name])
        super().__init__(paths, labels, classes=classes, origin=self.folder, **read)


_tissue_masks: dict[tuple, torch.Tensor] = {}  # per process: a mask is computed once per file and grid


def load_image(path: str | Path, in_chans: int, image_size: int | None = None, *, level: int | None = None,
               mpp: float | None = None, slide_mpp: float | None = None, patch_size: int | None = None,
               tissue: str = "otsu", tissue_fraction: float = 0.1, intensity: Intensity | None = None,
               reader: str | None = None) -> torch.Tensor | LazyImage:
    """Read an image the one way training, evaluation and prediction do.

    A file that can be read in pieces (OpenSlide formats, tiled TIFF) becomes, given ``patch_size`` and no
    ``image_size``, a :class:`~patchgd.data.lazy.LazyImage`: its source plus, with ``tissue="otsu"``, the mask of
    its grid cells whose tissue fraction is at least ``tissue_fraction``. Anything else is decoded whole,
    at the chosen level, as an integer ``(in_chans, H, W)`` tensor (uint8 for 8-bit data), and resized to
    ``image_size x image_size`` if that is set.

    Args:
        path: The image file.
        in_chans: 1 or 3.
        image_size: Side of the square to resize to (bilinear, antialiased); None keeps the size.
        level: Pyramid level (0 = full resolution).
        mpp: Target microns per pixel, instead of ``level``.
        slide_mpp: The slide's microns per pixel at level 0, instead of its metadata.
        patch_size: PatchGD's patch side; None decodes every file whole (the GD baselines).
        tissue: ``"otsu"`` or ``"none"``.
        tissue_fraction: Least tissue fraction of an encoded cell.
        intensity: How pixel values map to [0, 1] (:func:`~patchgd.data.intensity.prepare_pixels`).
        reader: A reader by name (``data.reader``); None chooses by suffix.

    Raises:
        DataError: The file cannot be read, its values do not fit ``intensity``, or a tissue mask finds no
            tissue cell in it.
    """
    intensity = intensity or Intensity()
    source = open_source(path, in_chans=in_chans, level=level, mpp=mpp, slide_mpp=slide_mpp, reader=reader)
    if patch_size is not None and image_size is None and source.tiled and not isinstance(source, ArraySource):
        if not intensity.model_scales(source.dtype):
            source.close()
            raise DataError(f"{path} is read in pieces (a slide or tiled TIFF) with pixel type {source.dtype}; "
                            "data.intensity, data.bit_depth and non-uint pixels need images read whole")
        mask = None
        if tissue != "none":
            key = (str(path), in_chans, level, mpp, slide_mpp, patch_size, tissue_fraction, reader)
            if key not in _tissue_masks:
                from patchgd.data.tissue import tissue_mask

                _tissue_masks[key] = tissue_mask(source, patch_size, tissue_fraction)
            mask = _tissue_masks[key]
            if not mask.any():
                raise DataError(f"{path}: no {patch_size} px cell has a tissue fraction of at least "
                                f"{tissue_fraction}; expected some tissue (lower data.tissue_fraction, or "
                                "data.tissue: none to use every cell)")
        return LazyImage(source, mask)
    try:
        pixels = prepare_pixels(np.ascontiguousarray(source.read(0, 0, source.height, source.width)), path, intensity)
    finally:
        source.close()
    image = torch.from_numpy(pixels)
    if image_size is not None and image.shape[1:] != (image_size, image_size):
        image = _resize(image, image_size)
    return image


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` resized to ``size x size`` (bilinear, antialiased), rounded back to its integer dtype."""
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    if image.dtype.is_floating_point:
        return resized.to(image.dtype)
    info = torch.iinfo(image.dtype)
    return resized.round_().clamp_(info.min, info.max).to(image.dtype)


def collate_images(batch: Sequence[tuple[torch.Tensor | LazyImage, int]]) -> tuple[torch.Tensor | list, torch.Tensor]:
    """Batch ``(image, label)`` items: one stacked tensor when all images are tensors of one shape and dtype,
    otherwise a list with one item per image (a PatchGD model gives each its own grid and pads ``Z``)."""
    images, labels = zip(*batch)
    labels = torch.as_tensor(labels)
    if all(isinstance(x, torch.Tensor) for x in images) and len({(x.shape, x.dtype) for x in images}) == 1:
        return torch.stack(images), labels
    return list(images), labels


def image_pixels(image: torch.Tensor | LazyImage) -> torch.Tensor:
    """``(C, H, W)`` pixels of an item in [0, 1] for statistics: a slide's from its thumbnail."""
    if isinstance(image, LazyImage):
        # np.array copies: a thumbnail can be read-only (Pillow's buffer), which torch warns about.
        image = torch.from_numpy(np.array(image.source.thumbnail(_THUMBNAIL_SIDE))).permute(2, 0, 1)
    return to_unit_range(image)


def compute_normalization(
    source: ImageDataset | str | Path,
    in_chans: int | None = None,
    *,
    intensity: Intensity | None = None,
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the [0, 1] pixels of a dataset or an image folder.

    Images are read one at a time, so any number fits in memory; the statistics of all pixels are
    combined exactly (Chan et al.'s parallel variance), in float64. A slide contributes the pixels of
    its thumbnail (longest side 2048 px).

    Args:
        source: A dataset (its resized images, read with its own options) or a folder of images (its
            subfolders too, so a folder of class folders works).
        in_chans: 1 or 3; for a dataset, None or its own ``in_chans``; for a folder, None reads the images
            as their first is (:func:`~patchgd.data.images.image_channels`: RGB as 3, grey as 1).
        intensity: For a folder, how pixel values map to [0, 1], as training reads them.
        max_images: Use a random subset of this many images (drawn with ``seed``); None for all.
        seed: The seed of the subset.
        progress: Show a progress bar.

    Returns:
        ``(mean, std)``, each a tuple with one value per channel.

    Example:
        >>> mean, std = compute_normalization("data/ultramnist/train", max_images=500)  # doctest: +SKIP
    """
    count, load = _image_loader(source, in_chans, intensity)
    indices = np.arange(count)
    if max_images is not None and max_images < count:
        indices = np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))
    total = 0
    mean = m2 = None
    for i in tqdm(indices, desc="normalisation", unit="img", disable=not progress):
        pixels = image_pixels(load(int(i))).double().flatten(1)
        n = pixels.shape[1]
        image_mean = pixels.mean(dim=1)
        image_m2 = ((pixels - image_mean[:, None]) ** 2).sum(dim=1)
        if mean is None:
            total, mean, m2 = n, image_mean, image_m2
            continue
        delta = image_mean - mean
        mean = mean + delta * n / (total + n)
        m2 = m2 + image_m2 + delta**2 * total * n / (total + n)
        total += n
    if mean is None:
        raise DataError(f"{source}: no images to compute the normalisation from")
    std = (m2 / total).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _image_loader(
    source: ImageDataset | str | Path, in_chans: int | None, intensity: Intensity | None
) -> tuple[int, Callable[[int], torch.Tensor]]:
    if isinstance(source, ImageDataset):
        if in_chans not in (None, source.in_chans):
            raise ValueError(f"in_chans={in_chans} but the dataset has in_chans={source.in_chans}")
        return len(source), source.load_image
    paths = list_images(Path(source))
    channels = image_channels(paths[0]) if in_chans is None and paths else in_chans or 1
    # patch_size only marks slides as lazy: their statistics come from a thumbnail, not a whole level.
    return len(paths), lambda i: load_image(paths[i], channels, patch_size=1, tissue="none", intensity=intensity)
