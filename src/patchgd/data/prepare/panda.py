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
from PIL import Image
from tqdm import tqdm

from patchgd.io import atomic_directory
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.readers import open_source

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

    Every slide is read from the smallest pyramid level whose long side is at least ``size`` (level 0 if
    none is), strip by strip, shrunk so its long side is ``size`` (antialiased) and padded with white at
    the right or bottom to a square, the same side the patch grid pads.

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


def read_slide(path: str | Path, size: int) -> Image.Image:
    """Read a slide as RGB with its long side at most ``size``, never decoding a whole large level.

    The smallest pyramid level whose long side is at least ``size`` (level 0 if none is) is read in
    strips, each shrunk as it is read (see :meth:`patchgd.data.readers.PatchSource.thumbnail`), so memory
    stays near that of the result. Levels are what OpenSlide or tifffile find: SubIFDs, reduced pages or,
    as in PANDA's files, further pages holding downsampled copies.

    Args:
        path: The slide (a multi-resolution TIFF, or any file :func:`open_source` reads).
        size: The longest side of the result; a smaller slide is returned at its own size.

    Raises:
        DataError: The file cannot be read as a slide (the message names it).
    """
    with open_source(path, in_chans=3) as source:
        return Image.fromarray(source.thumbnail(size), mode="RGB")


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
