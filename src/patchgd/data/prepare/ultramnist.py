"""The UltraMNIST generator (Gupta et al., App. B.2): large black images holding 3–5 MNIST digits of very
different sizes, labelled by the sum of the digits.

Layout written to ``OUT``::

    OUT/train/<image_id>.png   grayscale 8-bit
    OUT/val/<image_id>.png
    OUT/train.csv, OUT/val.csv  header ``image_id,label``
    OUT/meta.json               options, seed, digit source and every placed digit (class, source index, box)

Train images take their digits only from the train pool and validation images only from the val pool
(:func:`patchgd.data.prepare.digits.split_pools`), so no digit instance is seen in both.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from patchgd.io import atomic_directory
from patchgd.data.prepare.digits import MNIST_PX, DigitSource, digit_pools

MAX_SCALE = 9  # digits are 1..9 times the MNIST size at 512 px and above
REFERENCE_SIZE = 512  # the image size at which the full 1..9 range is used
_PLACEMENT_TRIES = 50  # random positions tried per digit before the sizes are redrawn
_LAYOUT_TRIES = 1000  # size redraws before giving up on an image

PRESETS: dict[str, dict[str, int]] = {
    "default": {"image_size": 512, "num_classes": 10},
    "original": {"image_size": 4000, "num_classes": 28},
}


@dataclass(frozen=True)
class PlacedDigit:
    """One digit drawn on an UltraMNIST image.

    Args:
        digit: The digit's class, 0..9.
        source_index: Its index in the digit source.
        box: ``(x0, y0, x1, y1)`` in pixels, end exclusive.
    """

    digit: int
    source_index: int
    box: tuple[int, int, int, int]


def preset_options(name: str) -> dict[str, int]:
    """Options of a named variant: ``"default"`` (512 px, sums 0–9) or ``"original"`` (4000 px, 0–27).

    Args:
        name: The preset's name.

    Example:
        >>> generate_ultramnist("data/um", train=100, val=20, **preset_options("original"))  # doctest: +SKIP
    """
    if name not in PRESETS:
        raise ValueError(f"unknown UltraMNIST preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def default_max_scale(image_size: int) -> int:
    """The largest digit scale factor for an image size: 9 at 512 px and above, proportionally less below.

    Shrinking the factor range (rather than the 28 px unit) keeps the smallest digits small relative to the
    image while letting the largest still fit several times over.

    Args:
        image_size: The side of the square image in pixels.
    """
    return max(1, min(MAX_SCALE, (MAX_SCALE * image_size) // REFERENCE_SIZE))


def scale_weights(max_scale: int) -> np.ndarray:
    """Probabilities of the scale factors ``1..max_scale``: V-shaped, favouring the smallest and largest.

    The weight of factor ``f`` is ``|f - mid| + 1`` with ``mid`` the middle of the range, so for the
    full range 1..9 the weights are 5, 4, 3, 2, 1, 2, 3, 4, 5.

    Args:
        max_scale: The largest factor.
    """
    factors = np.arange(1, max_scale + 1)
    weights = np.abs(factors - (1 + max_scale) / 2) + 1
    return weights / weights.sum()


def sample_digit_sizes(rng: np.random.Generator, count: int, max_scale: int) -> np.ndarray:
    """Side lengths in pixels of ``count`` digits: a V-distributed factor times 28 px, half of the
    factor-1 digits at 14 px.

    Args:
        rng: The random generator.
        count: The number of digits.
        max_scale: The largest factor.
    """
    factors = rng.choice(np.arange(1, max_scale + 1), size=count, p=scale_weights(max_scale))
    sizes = factors * MNIST_PX
    halved = (factors == 1) & (rng.random(count) < 0.5)
    sizes[halved] = MNIST_PX // 2
    return sizes


def sample_composition(rng: np.random.Generator, label: int, min_digits: int, max_digits: int) -> list[int]:
    """Digits (0..9) whose sum is ``label``: a uniform count among those that can reach the label, then a
    tuple drawn uniformly from all tuples of that length summing to it.

    Args:
        rng: The random generator.
        label: The required sum.
        min_digits: The fewest digits.
        max_digits: The most digits.

    Raises:
        ValueError: No count in the range can reach ``label``.
    """
    counts = [n for n in range(min_digits, max_digits + 1) if 0 <= label <= 9 * n]
    if not counts:
        raise ValueError(f"label {label} cannot be the sum of {min_digits}..{max_digits} digits")
    n = int(rng.choice(counts))
    ways = _tuple_counts(n, label)
    digits = []
    remaining = label
    for left in range(n - 1, -1, -1):
        # Choosing d leaves ways[left][remaining - d] completions; weighting by them makes tuples uniform.
        options = np.arange(0, min(9, remaining) + 1)
        options = options[remaining - options <= 9 * left]
        weights = np.array([ways[left][remaining - d] for d in options], dtype=np.float64)
        d = int(rng.choice(options, p=weights / weights.sum()))
        digits.append(d)
        remaining -= d
    return digits


def place_boxes(
    rng: np.random.Generator, sizes: np.ndarray, image_size: int
) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping square boxes for digits of the given sizes, or None if they don't fit.

    Larger digits are placed first (they are the hardest to fit); each digit gets a bounded number of
    random positions.

    Args:
        rng: The random generator.
        sizes: Side lengths in pixels.
        image_size: The side of the square image.

    Returns:
        Boxes ``(x0, y0, x1, y1)`` (end exclusive) in the order of ``sizes``.
    """
    boxes: list[tuple[int, int, int, int] | None] = [None] * len(sizes)
    placed: list[tuple[int, int, int, int]] = []
    for i in np.argsort(-sizes, kind="stable"):
        size = int(sizes[i])
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
            box = (x0, y0, x0 + size, y0 + size)
            if not any(_overlap(box, other) for other in placed):
                break
        else:
            return None
        boxes[i] = box
        placed.append(box)
    return boxes  # type: ignore[return-value]


def generate_ultramnist(
    out_dir: str | Path,
    *,
    train: int,
    val: int,
    image_size: int = 512,
    digits: str | Path | DigitSource | None = None,
    seed: int = 0,
    num_classes: int = 10,
    min_digits: int = 3,
    max_digits: int = 5,
    max_scale: int | None = None,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate an UltraMNIST data set into ``out_dir``, atomically.

    Labels are balanced (per split, class counts differ by at most one). The same arguments and seed give
    byte-identical files; the train images do not depend on the number of validation images.

    Args:
        out_dir: The folder to create.
        train: The number of training images.
        val: The number of validation images.
        image_size: The side of the square images in pixels.
        digits: An MNIST folder, a loaded :class:`DigitSource`, or None for scikit-learn's digits.
        seed: The random seed.
        num_classes: Labels are the sums ``0..num_classes-1``.
        min_digits: The fewest digits per image.
        max_digits: The most digits per image.
        max_scale: The largest digit scale factor (× 28 px); None for :func:`default_max_scale`.
        val_fraction: The share of the digit source reserved for validation images.
        overwrite: Replace an existing non-empty ``out_dir``.
        progress: Show a progress bar.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: Inconsistent options (a label unreachable with the digit counts, digits larger than
            the image, a pool lacking some digit class).
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.

    Example:
        >>> generate_ultramnist("data/um", train=1000, val=200, digits="mnist/")  # doctest: +SKIP
    """
    max_scale = default_max_scale(image_size) if max_scale is None else max_scale
    _check_options(train, val, image_size, num_classes, min_digits, max_digits, max_scale)
    source, pools = digit_pools(digits, val_fraction)
    options = {
        "image_size": image_size,
        "num_classes": num_classes,
        "min_digits": min_digits,
        "max_digits": max_digits,
        "max_scale": max_scale,
        "val_fraction": val_fraction,
        "train": train,
        "val": val,
    }
    meta: dict[str, Any] = {
        "format": "ultramnist",
        "seed": seed,
        "options": options,
        "digit_source": source.description,
        "pools": {split: [int(pool[0]), int(pool[-1]) + 1] for split, pool in pools.items()},
        "images": {},
    }
    # One independent stream per split: the train set stays the same when only `val` changes.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, tqdm(
        total=train + val, desc="UltraMNIST", unit="img", disable=not progress
    ) as bar:
        for (split, count), rng in zip((("train", train), ("val", val)), rngs):
            (tmp / split).mkdir()
            records = []
            labels = rng.permutation(np.arange(count) % num_classes)
            width = max(6, len(str(count - 1)))
            for i, label in enumerate(labels):
                image_id = f"{split}_{i:0{width}d}"
                image, placed = _make_image(rng, source, pools[split], int(label), options)
                Image.fromarray(image, mode="L").save(tmp / split / f"{image_id}.png")
                digits_json = [_as_json(p) for p in placed]
                records.append({"image_id": image_id, "label": int(label), "digits": digits_json})
                bar.update()
            _write_csv(tmp / f"{split}.csv", records)
            meta["images"][split] = records
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return Path(out_dir)


def _make_image(
    rng: np.random.Generator, source: DigitSource, pool: np.ndarray, label: int, options: dict[str, Any]
) -> tuple[np.ndarray, list[PlacedDigit]]:
    image_size = options["image_size"]
    classes = sample_composition(rng, label, options["min_digits"], options["max_digits"])
    pool_labels = source.labels[pool]
    # A digit that cannot be placed is never dropped (the label is the sum): the sizes are redrawn instead.
    for _ in range(_LAYOUT_TRIES):
        sizes = sample_digit_sizes(rng, len(classes), options["max_scale"])
        boxes = place_boxes(rng, sizes, image_size)
        if boxes is not None:
            break
    else:
        raise RuntimeError(
            f"could not place {len(classes)} non-overlapping digits in a {image_size} px image after "
            f"{_LAYOUT_TRIES} tries; use a smaller max_scale or fewer digits"
        )
    canvas = np.zeros((image_size, image_size), dtype=np.uint8)
    placed = []
    for digit, box in zip(classes, boxes):
        index = int(rng.choice(pool[pool_labels == digit]))
        x0, y0, x1, y1 = box
        glyph = Image.fromarray(source.images[index]).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        # Pasting with max keeps the black background and, unlike adding, can never overflow uint8.
        np.maximum(canvas[y0:y1, x0:x1], np.asarray(glyph), out=canvas[y0:y1, x0:x1])
        placed.append(PlacedDigit(digit, index, box))
    return canvas, placed


def _check_options(
    train: int, val: int, image_size: int, num_classes: int, min_digits: int, max_digits: int, max_scale: int
) -> None:
    if train < 0 or val < 0 or train + val == 0:
        raise ValueError(f"train={train}, val={val}; expected non-negative counts, not both zero")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(
            f"min_digits={min_digits}, max_digits={max_digits}; expected 1 <= min_digits <= max_digits"
        )
    if not 1 <= num_classes <= 9 * max_digits + 1:
        raise ValueError(
            f"num_classes={num_classes}; sums of at most {max_digits} digits "
            f"allow 1..{9 * max_digits + 1} classes"
        )
    if max_scale < 1 or max_scale * MNIST_PX > image_size:
        raise ValueError(
            f"max_scale={max_scale} makes digits of {max_scale * MNIST_PX} px; expected 1.."
            f"{image_size // MNIST_PX} for {image_size} px images"
        )


def _tuple_counts(n: int, total: int) -> list[list[int]]:
    """``ways[k][t]``: the number of k-tuples of digits 0..9 summing to t, for k <= n and t <= total."""
    ways = [[1] + [0] * total]
    for _ in range(n):
        prev = ways[-1]
        ways.append([sum(prev[t - d] for d in range(min(9, t) + 1)) for t in range(total + 1)])
    return ways


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _as_json(p: PlacedDigit) -> dict[str, Any]:
    return {"digit": p.digit, "source_index": p.source_index, "box": list(p.box)}


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "label"])
        writer.writerows((r["image_id"], r["label"]) for r in records)
