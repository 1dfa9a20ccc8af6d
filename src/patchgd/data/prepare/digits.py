"""Sources of 28×28 digit images: an MNIST folder in IDX format, or scikit-learn's bundled digits.

Both give ``uint8`` images of shape ``(N, 28, 28)`` (white digit on black) and ``int64`` labels ``(N,)``,
the raw material of the UltraMNIST generator.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchgd.data.errors import DataError

MNIST_PX = 28  # the side of every digit image

# IDX magic numbers: two zero bytes, the type code 0x08 (unsigned byte) and the number of dimensions.
_IDX_UBYTE = 0x08
_MNIST_PREFIXES = ("train", "t10k")
_SKLEARN_DIGIT_PX = 20  # MNIST digits fill a ~20×20 box centred in the 28×28 frame


@dataclass(frozen=True)
class DigitSource:
    """Digit images with their labels.

    Args:
        images: ``uint8`` array ``(N, 28, 28)``, white digit on black.
        labels: ``int64`` array ``(N,)`` with values in ``0..9``.
        description: One line saying where the digits came from, for logs and ``meta.json``.
    """

    images: np.ndarray
    labels: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_source(path: str | Path | None = None) -> DigitSource:
    """Load MNIST from ``path``, or scikit-learn's bundled digits when ``path`` is None.

    Args:
        path: An MNIST folder holding the IDX files (raw or ``.gz``), or a torchvision-style root with
            ``MNIST/raw`` inside. ``None`` selects the offline fallback :func:`load_sklearn_digits`.

    Returns:
        The digits and a description such as ``"MNIST (10000 digits) from /data/mnist"``.

    Example:
        >>> source = load_digits_source(None)
        >>> source.images.shape
        (1797, 28, 28)
    """
    if path is None:
        return load_sklearn_digits()
    return load_mnist(path)


def load_mnist(path: str | Path) -> DigitSource:
    """Read MNIST images and labels from a folder of IDX files.

    The training files (``train-images-idx3-ubyte``) are preferred when present, else the test files
    (``t10k-…``); each may be gzipped.

    Args:
        path: The folder with the IDX files, or a root containing ``MNIST/raw``.

    Raises:
        FileNotFoundError: The folder or its IDX files are missing.
        DataError: A file is not a valid IDX file of the expected shape.
    """
    folder = _resolve_mnist_folder(Path(path))
    for prefix in _MNIST_PREFIXES:
        images_file = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        if images_file:
            break
    else:
        raise FileNotFoundError(
            f"no MNIST images in {folder}; expected train-images-idx3-ubyte or t10k-images-idx3-ubyte "
            "(optionally ending in .gz)"
        )
    labels_file = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if labels_file is None:
        raise FileNotFoundError(
            f"{images_file} has no labels beside it; expected {prefix}-labels-idx1-ubyte[.gz]"
        )
    images = read_idx(images_file, ndim=3)
    labels = read_idx(labels_file, ndim=1)
    if images.shape[1:] != (MNIST_PX, MNIST_PX):
        raise DataError(f"{images_file}: images are {images.shape[1]}x{images.shape[2]}; expected "
                        f"{MNIST_PX}x{MNIST_PX}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_file}: label {int(labels.max())} found; expected digits 0..9")
    return DigitSource(images, labels.astype(np.int64), f"MNIST ({len(labels)} digits) from {folder}")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzipped) into a ``uint8`` array.

    Args:
        path: The file.
        ndim: The number of dimensions the file must have (3 for images, 1 for labels).

    Raises:
        DataError: The magic number, type code, dimension count or data length is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip reports a truncated or non-gzip file as OSError/EOFError
        raise DataError(f"{path}: cannot read ({err}); expected an IDX file") from err
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: {len(data)} bytes; expected an IDX header of {header_len} bytes")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}; expected 0x{expected_magic:08x} "
            f"(unsigned-byte IDX with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(shape))
    if len(data) != expected_len:
        raise DataError(
            f"{path}: {len(data)} bytes; expected {expected_len} for a header of shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def load_sklearn_digits() -> DigitSource:
    """scikit-learn's bundled 8×8 digits, upsampled to 28×28 ``uint8`` like MNIST.

    Each digit (values 0..16) is scaled to 0..255, resized bilinearly to 20×20 and centred in a black
    28×28 frame, the way MNIST digits are placed. Needs no download.
    """
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    small = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    lo = (MNIST_PX - _SKLEARN_DIGIT_PX) // 2
    hi = lo + _SKLEARN_DIGIT_PX
    images = np.zeros((len(small), 28, 28), dtype=np.uint8)
    for i, digit in enumerate(small):
        resized = Image.fromarray(digit).resize((_SKLEARN_DIGIT_PX,) * 2, Image.Resampling.BILINEAR)
        images[i, lo:hi, lo:hi] = np.asarray(resized)
    labels = bunch.target.astype(np.int64)
    return DigitSource(images, labels, f"scikit-learn bundled digits ({len(labels)}, upsampled to 28x28)")


def split_pools(source: DigitSource, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Split a source into disjoint train and validation pools: the first digits train, the last validate.

    A contiguous split (not a random one) keeps the pools stable whatever the generator's seed.

    Args:
        source: The digits.
        val_fraction: The share of digits, taken from the end, reserved for validation images.

    Returns:
        ``(train_indices, val_indices)``, ``int64`` index arrays into ``source``.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1) or leaves a pool empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}; expected a value strictly between 0 and 1")
    n = len(source)
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ValueError(f"val_fraction={val_fraction} of {n} digits leaves a pool empty")
    indices = np.arange(n, dtype=np.int64)
    return indices[: n - n_val], indices[n - n_val :]


def digit_pools(digits: str | Path | DigitSource | None, val_fraction: float
                ) -> tuple[DigitSource, dict[str, np.ndarray]]:
    """The digits a generator draws from, and their disjoint ``"train"`` and ``"val"`` pools
    (:func:`split_pools`), each checked to hold all ten digits.

    Args:
        digits: An MNIST folder, a loaded :class:`DigitSource`, or None for scikit-learn's digits.
        val_fraction: The share of the digits reserved for validation images.

    Raises:
        ValueError: A pool lacks some digit class.
    """
    source = digits if isinstance(digits, DigitSource) else load_digits_source(digits)
    pools = dict(zip(("train", "val"), split_pools(source, val_fraction)))
    for split, pool in pools.items():
        missing = sorted(set(range(10)) - set(np.unique(source.labels[pool]).tolist()))
        if missing:
            raise ValueError(f"the {split} digit pool of {source.description} lacks digits {missing}; "
                             "expected all of 0..9")
    return source, pools


def _resolve_mnist_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"MNIST folder {path} does not exist; expected a folder of IDX files")
    torchvision_raw = path / "MNIST" / "raw"
    return torchvision_raw if torchvision_raw.is_dir() else path


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None
