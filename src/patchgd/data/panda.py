"""Prepare the PANDA prostate biopsy data set (App. B.1): each multi-resolution TIFF becomes an N×N PNG
(long side resized to N, padded with white), and the labels get stratified cross-validation folds.

Input ``SRC``: ``train.csv`` with ``image_id,isup_grade`` and ``train_images/<image_id>.tiff``.
Output ``OUT``: ``train_images/<image_id>.png`` and ``train.csv`` with ``image_id,isup_grade,kfold``,
which :class:`patchgd.data.datasets.ImageCSVDataset` reads directly.
"""

from __future__ import annotations

import csv
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from patchgd.io import atomic_directory
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.errors import DataError

ISUP_GRADES = 6
WHITE = (255, 255, 255)  # slide background: padding with it adds no tissue-like content


def prepare_panda(
    src: str | Path,
    out: str | Path,
    *,
    size: int,
    folds: int = 5,
    seed: int = 42,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert PANDA slides to ``size × size`` PNGs with stratified folds, writing ``out`` atomically.

    Every slide is read at the smallest pyramid level whose long side is at least ``size`` (level 0 if
    none is), resized so its long side is ``size`` (antialiased) and padded with white at the right or
    bottom to a square, the same side the patch grid pads.

    Args:
        src: The PANDA folder with ``train.csv`` and ``train_images/``.
        out: The folder to create.
        size: The side of the output squares in pixels (the recipes use 512, 2048 and 4096).
        folds: The number of ``StratifiedKFold`` folds over ``isup_grade``.
        seed: The fold shuffling seed.
        workers: Processes converting slides in parallel.
        overwrite: Replace an existing non-empty ``out``.
        progress: Show a progress bar.

    Returns:
        ``out`` as a Path.

    Raises:
        FileNotFoundError: ``train.csv`` or a slide is missing.
        DataError: A column, grade or slide is invalid.

    Example:
        >>> prepare_panda("/data/panda", "data/panda-2048", size=2048, workers=8)  # doctest: +SKIP
    """
    if size < 1:
        raise ValueError(f"size={size}; expected a positive number of pixels")
    if workers < 1:
        raise ValueError(f"workers={workers}; expected at least 1")
    # The dataset checks columns, grades and that every slide exists before any slide is converted.
    # verify=None: the slides are read by read_slide, whose errors say what a slide must be.
    slides = ImageCSVDataset(Path(src) / "train.csv", num_classes=ISUP_GRADES, label_column="isup_grade",
                             verify=None)
    kfold = assign_folds(slides.labels, folds, seed)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "train_images").mkdir()
        jobs = [
            (path, tmp / "train_images" / f"{image_id}.png", size)
            for path, image_id in zip(slides.paths, slides.image_ids)
        ]
        _run(jobs, workers, tqdm(total=len(jobs), desc=f"PANDA {size}px", unit="slide", disable=not progress))
        with (tmp / "train.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_id", "isup_grade", "kfold"])
            writer.writerows(zip(slides.image_ids, slides.labels, kfold))
    return Path(out)


def assign_folds(labels: list[int], folds: int, seed: int) -> list[int]:
    """The validation fold of every row from ``StratifiedKFold(folds, shuffle=True, random_state=seed)``.

    Args:
        labels: The class of each row.
        folds: The number of folds, at least 2 and at most the number of rows.
        seed: The shuffling seed.
    """
    # Imported here: scikit-learn takes about a second to import, which every `patchgd` command would pay.
    from sklearn.model_selection import StratifiedKFold

    if not 2 <= folds <= len(labels):
        raise ValueError(f"folds={folds}; expected 2..{len(labels)} for {len(labels)} rows")
    kfold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val_index) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        kfold[val_index] = k
    return kfold.tolist()


def read_slide(path: str | Path, min_side: int) -> Image.Image:
    """Read a slide as RGB at the smallest pyramid level whose long side is at least ``min_side``.

    Levels are the TIFF's sub-resolutions (SubIFDs) or, as in PANDA's files, further pages holding
    downsampled copies of the same aspect ratio. Level 0 is used if no level is large enough.

    Args:
        path: The TIFF file.
        min_side: The smallest acceptable long side in pixels.

    Raises:
        DataError: The file is not a readable TIFF with an (H, W[, channels]) image.
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            levels = _pyramid_levels(tif)
            large_enough = [lv for lv in levels if max(_height_width(lv)) >= min_side]
            level = min(large_enough, key=lambda lv: max(_height_width(lv))) if large_enough else levels[0]
            array = level.asarray()
            axes = level.axes
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise DataError(f"{path}: cannot read slide ({err}); expected a (multi-resolution) TIFF") from err
    return _to_rgb(array, axes, path)


def square_pad(image: Image.Image, size: int) -> Image.Image:
    """Resize an image so its long side is ``size`` (antialiased) and pad it with white to a square.

    Args:
        image: An RGB image.
        size: The side of the square.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(image, (0, 0))
    return canvas


def _run(jobs: list[tuple[Path, Path, int]], workers: int, bar: tqdm) -> None:
    with bar:
        if workers == 1:
            for job in jobs:
                _convert_slide(job)
                bar.update()
            return
        with ProcessPoolExecutor(workers) as pool:
            try:
                for _ in pool.map(_convert_slide, jobs):
                    bar.update()
            except BaseException:
                # Without this the pool would finish every queued slide before the error surfaces.
                pool.shutdown(cancel_futures=True)
                raise


def _convert_slide(job: tuple[Path, Path, int]) -> None:
    src, dst, size = job
    square_pad(read_slide(src, size), size).save(dst)


def _pyramid_levels(tif: tifffile.TiffFile) -> list:
    if not tif.series:
        raise ValueError("no image in the file")
    base = tif.series[0]
    levels = list(base.levels)
    height, width = _height_width(base)
    for series in tif.series[1:]:
        if series.axes != base.axes:
            continue
        h, w = _height_width(series)
        # Same aspect ratio up to the rounding of a downsampled side: another level, not a label image.
        if abs(h - height * w / width) <= 1 + 0.01 * h:
            levels.append(series)
    return levels


def _height_width(level) -> tuple[int, int]:  # noqa: ANN001 - a tifffile series or level
    axes = level.axes
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"TIFF series with axes {axes!r}; expected Y and X axes")
    return level.shape[axes.index("Y")], level.shape[axes.index("X")]


def _to_rgb(array: np.ndarray, axes: str, path: Path) -> Image.Image:
    if "S" not in axes:
        array, axes = array[..., None], axes + "S"
    if any(n != 1 for n, a in zip(array.shape, axes) if a not in "YXS"):
        raise DataError(
            f"{path}: image of shape {array.shape} and axes {axes!r}; expected a single (Y, X[, S]) image"
        )
    kept = "".join(a for a in axes if a in "YXS")
    array = array.reshape([n for n, a in zip(array.shape, axes) if a in "YXS"])
    array = np.moveaxis(array, [kept.index(a) for a in "YXS"], [0, 1, 2])
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(f"{path}: pixel type {array.dtype}; expected uint8 or uint16")
    channels = array.shape[2]
    if channels == 1:
        return Image.fromarray(array[:, :, 0], mode="L").convert("RGB")
    if channels in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), mode="RGB")
    raise DataError(f"{path}: {channels} samples per pixel; expected 1, 3 or 4")
