"""The Megapixel MNIST generator (Katharopoulos & Fleuret, ICML 2019, "Processing Megapixel Images with
Deep Attention-Sampling Models"): a large black canvas holding five 28 px MNIST digits at random places,
three of them of the image's class and two of other classes, among line scribbles that look like digit
strokes. The class can be read only at full resolution: downscaled to a budget, 28 px digits vanish.

The ``original`` preset is the paper's (1500 x 1500 px, 50 scribbles, 5,000 training and 1,000 test
images; attention sampling, IPS and DPS report on it); ``scaled`` keeps its digit size and scribble
density on a 500 px canvas with 1,000 / 200 images, for a CPU. The layout is UltraMNIST's
(:mod:`patchgd.data.prepare.ultramnist`), so ``patchgd train`` reads it as it is::

    OUT/train/<image_id>.png, OUT/val/<image_id>.png   grayscale 8-bit
    OUT/train.csv, OUT/val.csv                        header ``image_id,label`` (label: the digit class)
    OUT/meta.json                                     options, seed, digit source, every digit and scribble

Train images take their digits only from the train pool and validation images only from the val pool
(:func:`patchgd.data.prepare.digits.split_pools`): with the MNIST test set as the source (what this machine has),
no digit instance is seen in both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from patchgd.data.prepare.digits import MNIST_PX, DigitSource, digit_pools
from patchgd.data.prepare.ultramnist import _write_csv
from patchgd.io import atomic_directory

__all__ = ["BACKGROUND", "PRESETS", "cut_digit_cells", "generate_megapixel_mnist", "scribbles"]

PRESETS = {
    "original": {"image_size": 1500, "noise": 50, "train": 5000, "val": 1000},
    # The same 28 px digits and scribbles per pixel (50 per 1500^2 px) on a 500 px canvas.
    "scaled": {"image_size": 500, "noise": 6, "train": 1000, "val": 200},
    # patchgd demo: the same digits and density on a 256 px canvas, sized to train in minutes on two cores.
    "demo": {"image_size": 256, "noise": 2, "train": 900, "val": 200},
}
BACKGROUND = 10  # the label of a cell that holds no digit (cut_digit_cells)
DIGITS, POSITIVES = 5, 3  # digits per image, of which this many are of the image's class
_PATTERNS = 50  # distinct scribbles of a data set, as the original
_PLACEMENT_TRIES = 1000


def scribbles(rng: np.random.Generator, count: int = _PATTERNS) -> np.ndarray:
    """``count`` 28 x 28 uint8 scribbles: two straight strokes right across the box (from one side to the
    opposite one, at random places), each pixel of a stroke at a random intensity of 80-100 %: digit-like
    clutter without a digit's shape."""
    out = np.zeros((count, MNIST_PX, MNIST_PX), np.float32)
    t = np.linspace(0, 1, 4 * MNIST_PX)
    edge = MNIST_PX - 1
    for pattern in out:
        for _ in range(2):
            start, end = rng.uniform(0, edge, size=2)
            along, across = t * edge, start + t * (end - start)
            rows, cols = (along, across) if rng.random() < 0.5 else (across, along)  # top-bottom or left-right
            pattern[np.rint(rows).astype(int), np.rint(cols).astype(int)] = 1.0
    out *= rng.uniform(0.8, 1.0, size=out.shape)
    return (out * 255).round().astype(np.uint8)


def _digit_boxes(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Top-left corners of ``DIGITS`` 28 px boxes that do not overlap, uniformly over the canvas."""
    corners: list[np.ndarray] = []
    for _ in range(_PLACEMENT_TRIES):
        corner = rng.integers(0, image_size - MNIST_PX + 1, size=2)
        if all(np.abs(corner - other).max() >= MNIST_PX for other in corners):
            corners.append(corner)
            if len(corners) == DIGITS:
                return np.stack(corners)
    raise RuntimeError(f"could not place {DIGITS} non-overlapping digits in a {image_size} px image")


def generate_megapixel_mnist(
    out_dir: str | Path,
    *,
    train: int,
    val: int,
    image_size: int = 1500,
    noise: int = 50,
    digits: str | Path | DigitSource | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate a Megapixel MNIST data set into ``out_dir``, atomically.

    Labels are balanced (per split, class counts differ by at most one); the two other digits are of
    classes drawn uniformly among the nine others. The same arguments and seed give byte-identical files.

    Args:
        out_dir: The folder to create.
        train: The number of training images.
        val: The number of validation images.
        image_size: The side of the square canvas in pixels (at least 3 digits wide).
        noise: Scribbles per image (drawn from 50 per data set), placed anywhere, pasted under the
            digits' strokes (a pixel keeps the brighter of both).
        digits, seed, val_fraction, overwrite, progress: As for
            :func:`~patchgd.data.prepare.ultramnist.generate_ultramnist`.

    Returns:
        ``out_dir`` as a Path.

    Example:
        >>> generate_megapixel_mnist("data/mpmnist", train=1000, val=200, image_size=500, noise=6,
        ...                          digits="mnist/")  # doctest: +SKIP
    """
    if train < 1 or val < 1:
        raise ValueError(f"train={train}, val={val}; expected at least one image in each split")
    if image_size < 3 * MNIST_PX or noise < 0:
        raise ValueError(f"image_size={image_size}, noise={noise}; expected image_size >= {3 * MNIST_PX} "
                         "and noise >= 0")
    source, pools = digit_pools(digits, val_fraction)
    options = {"image_size": image_size, "noise": noise, "digits": DIGITS, "positives": POSITIVES,
               "val_fraction": val_fraction, "train": train, "val": val}
    meta: dict[str, Any] = {"format": "megapixel-mnist", "seed": seed, "options": options,
                            "digit_source": source.description,
                            "pools": {split: [int(pool[0]), int(pool[-1]) + 1] for split, pool in pools.items()},
                            "images": {}}
    patterns_rng, *rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    patterns = scribbles(patterns_rng)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, tqdm(
        total=train + val, desc="Megapixel MNIST", unit="img", disable=not progress
    ) as bar:
        for (split, count), rng in zip((("train", train), ("val", val)), rngs):
            (tmp / split).mkdir()
            pool, records = pools[split], []
            pool_labels = source.labels[pool]
            width = max(6, len(str(count - 1)))
            for i, label in enumerate(rng.permutation(np.arange(count) % 10)):
                label = int(label)
                others = rng.choice([c for c in range(10) if c != label], size=DIGITS - POSITIVES)
                classes = [label] * POSITIVES + [int(c) for c in others]
                canvas = np.zeros((image_size, image_size), np.uint8)
                # Scribbles first, digits over them with max: clutter never erases a digit's stroke.
                scribbled = []
                for _ in range(noise):
                    y, x = rng.integers(0, image_size - MNIST_PX + 1, size=2)
                    k = int(rng.integers(len(patterns)))
                    np.maximum(canvas[y:y + MNIST_PX, x:x + MNIST_PX], patterns[k],
                               out=canvas[y:y + MNIST_PX, x:x + MNIST_PX])
                    scribbled.append([int(y), int(x), k])
                placed = []
                for digit, (y, x) in zip(classes, _digit_boxes(rng, image_size)):
                    index = int(rng.choice(pool[pool_labels == digit]))
                    np.maximum(canvas[y:y + MNIST_PX, x:x + MNIST_PX], source.images[index],
                               out=canvas[y:y + MNIST_PX, x:x + MNIST_PX])
                    placed.append({"digit": digit, "source_index": index,
                                   "box": [int(x), int(y), int(x) + MNIST_PX, int(y) + MNIST_PX]})
                image_id = f"{split}_{i:0{width}d}"
                Image.fromarray(canvas, mode="L").save(tmp / split / f"{image_id}.png")
                records.append({"image_id": image_id, "label": label, "digits": placed, "scribbles": scribbled})
                bar.update()
            _write_csv(tmp / f"{split}.csv", records)
            meta["images"][split] = records
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    return Path(out_dir)


def cut_digit_cells(data_dir: str | Path, out_dir: str | Path, patch_size: int, *, split: str = "train",
                    background: float = 1.0, seed: int = 0, overwrite: bool = False) -> Path:
    """Cut a generated data set's images into their ``patch_size`` cells, labelled from ``meta.json``: a
    cell takes the class of the digit that lies at least half inside it (the most inside if two do), or
    :data:`BACKGROUND` if none does. The cells are the patches PatchGD's backbone sees, so a classifier
    trained on them is a backbone pretrained for the task (the paper's App. C idea with digit labels).

    Written atomically in the same layout (``OUT/train/``, ``OUT/val/``, ``train.csv``, ``val.csv``): a
    seeded 20 % of the images give the validation cells, so no image has cells on both sides.

    Args:
        data_dir: A folder written by :func:`generate_megapixel_mnist`.
        out_dir: The folder to create.
        patch_size: The cell side in pixels; the image side must be a multiple of it.
        split: Whose images to cut (``"train"``: a backbone pretrained on them never sees a validation image).
        background: Digit-free cells kept per digit cell (they far outnumber digit cells), drawn at random.
        seed: The random seed of the validation images and of the background cells kept.
        overwrite: Replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    size = meta["options"]["image_size"]
    if meta.get("format") != "megapixel-mnist" or size % patch_size:
        raise ValueError(f"{data_dir}: expected a Megapixel MNIST folder whose image side ({size} px) is a "
                         f"multiple of patch_size={patch_size}")
    rng = np.random.default_rng(seed)
    images = meta["images"][split]
    val_images = set(rng.permutation(len(images))[:max(1, len(images) // 5)].tolist())
    cells: dict[str, list[tuple[dict, list[tuple[int, int, int]]]]] = {"train": [], "val": []}
    half = MNIST_PX * MNIST_PX / 2
    for i, record in enumerate(images):
        labels = np.full((size // patch_size, size // patch_size), BACKGROUND)
        inside = np.zeros(labels.shape)
        for digit in record["digits"]:
            x0, y0, x1, y1 = digit["box"]
            for r in range(y0 // patch_size, (y1 - 1) // patch_size + 1):
                for c in range(x0 // patch_size, (x1 - 1) // patch_size + 1):
                    area = ((min(y1, (r + 1) * patch_size) - max(y0, r * patch_size))
                            * (min(x1, (c + 1) * patch_size) - max(x0, c * patch_size)))
                    if area >= half and area > inside[r, c]:
                        labels[r, c], inside[r, c] = digit["digit"], area
        digit_cells = np.argwhere(labels != BACKGROUND)
        empty = np.argwhere(labels == BACKGROUND)
        kept = empty[rng.permutation(len(empty))[:round(background * len(digit_cells))]]
        chosen = [(int(r), int(c), int(labels[r, c])) for r, c in np.concatenate([digit_cells, kept])]
        cells["val" if i in val_images else "train"].append((record, chosen))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for part, entries in cells.items():
            (tmp / part).mkdir()
            records = []
            for record, chosen in entries:
                with Image.open(data_dir / split / f"{record['image_id']}.png") as image:  # once per image
                    for r, c, label in chosen:
                        box = (c * patch_size, r * patch_size, (c + 1) * patch_size, (r + 1) * patch_size)
                        cell_id = f"{record['image_id']}_r{r}c{c}"
                        image.crop(box).save(tmp / part / f"{cell_id}.png")
                        records.append({"image_id": cell_id, "label": label})
            _write_csv(tmp / f"{part}.csv", records)
    return Path(out_dir)
