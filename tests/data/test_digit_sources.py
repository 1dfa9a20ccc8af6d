import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from patchgd.data.prepare.digits import (DigitSource, digit_pools, load_digits_source, load_mnist, load_sklearn_digits,
                                        read_idx, split_pools)
from patchgd.data.errors import DataError

# Published class counts of the MNIST test set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


def test_mnist_test_set(mnist_dir):
    source = load_digits_source(mnist_dir)
    assert source.images.shape == (10000, 28, 28) and source.images.dtype == np.uint8
    assert source.labels.dtype == np.int64
    assert np.bincount(source.labels).tolist() == MNIST_TEST_COUNTS
    assert source.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert "MNIST (10000 digits)" in source.description and str(mnist_dir) in source.description


def test_torchvision_root(mnist_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(mnist_dir / name)
    assert len(load_mnist(tmp_path)) == 10000


def test_prefers_train_files(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not read")
    source = load_mnist(tmp_path)
    assert source.labels.tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(source.images, images)


def test_wrong_magic_names_file_and_values(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 28, 28)), magic=0x0801)
    with pytest.raises(DataError, match=r"x-idx3-ubyte.*0x00000801.*expected 0x00000803"):
        read_idx(path, ndim=3)


def test_truncated_file(tmp_path):
    path = write_idx(tmp_path / "t", np.zeros((2, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t: 1574 bytes; expected 1584"):
        read_idx(path, ndim=3)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="expected an IDX header of 16 bytes"):
        read_idx(path, ndim=3)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        read_idx(path, ndim=3)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no MNIST images"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_count_mismatch_and_bad_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2]))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 12]))
    with pytest.raises(DataError, match="label 12 found"):
        load_mnist(tmp_path)


def test_sklearn_fallback():
    source = load_digits_source(None)
    assert source.images.shape == (1797, 28, 28) and source.images.dtype == np.uint8
    assert source.labels.dtype == np.int64 and set(source.labels.tolist()) == set(range(10))
    assert source.images.max() == 255
    # Placed like MNIST: a 20x20 digit centred in the frame, a blank 4 px border.
    border = np.ones((28, 28), bool)
    border[4:24, 4:24] = False
    assert source.images[:, border].max() == 0
    assert source.description == "scikit-learn bundled digits (1797, upsampled to 28x28)"


def test_sklearn_matches_original_digits():
    from PIL import Image
    from sklearn.datasets import load_digits

    original = load_digits().images * (255 / 16)
    centred = load_sklearn_digits().images[:100, 4:24, 4:24]
    # Area-averaging the 20x20 digits back to 8x8 cannot be exact, but must track the originals closely.
    back = np.stack([np.asarray(Image.fromarray(d).resize((8, 8), Image.Resampling.BOX), float) for d in centred])
    assert np.corrcoef(back.ravel(), original[:100].ravel())[0, 1] > 0.95


def test_split_pools():
    source = load_sklearn_digits()
    train, val = split_pools(source, 0.2)
    assert len(val) == 359 and len(train) == 1797 - 359
    assert train.tolist() == list(range(1438)) and val.tolist() == list(range(1438, 1797))
    for bad in (0.0, 1.0, -0.1, 1e-6):
        with pytest.raises(ValueError, match="val_fraction"):
            split_pools(source, bad)


def test_digit_pools_hold_every_digit_or_name_the_missing_ones():
    source = load_sklearn_digits()
    same, pools = digit_pools(source, 0.2)
    assert same is source and pools["val"].tolist() == list(range(1438, 1797))
    sevens_last = np.argsort(source.labels == 7, kind="stable")  # every 7 at the end: the val pool is all 7s
    skewed = DigitSource(source.images[sevens_last], source.labels[sevens_last], "skewed digits")
    missing = r"the val digit pool of skewed digits lacks digits \[0, 1, 2, 3, 4, 5, 6, 8, 9\]"
    with pytest.raises(ValueError, match=missing):
        digit_pools(skewed, 0.05)
