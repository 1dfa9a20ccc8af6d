"""Pixel scaling: integer ranges, bit depth, float checks, windows and percentile stretches."""

import numpy as np
import pytest
import tifffile
import torch

from patchgd.data.datasets import compute_normalization, load_image
from patchgd.data.errors import DataError
from patchgd.data.intensity import Intensity, scale_pixels
from patchgd.normalize import Normalize, to_unit_range


def read(path, intensity=None):
    """An image as the model sees it: read, then scaled by the model's first step (raw unsigned integers)."""
    return to_unit_range(load_image(path, 1, intensity=intensity))


@pytest.fixture
def float_tiff(tmp_path):
    """A microscopy-like float image with values 0..4000."""
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, np.linspace(0, 4000, 64, dtype=np.float32).reshape(8, 8))
    return path


def test_float_outside_unit_is_refused_naming_the_file(float_tiff):
    with pytest.raises(DataError, match=r"cells.tif: float pixel values range from 0 to 4000; "
                       r"data.intensity: unit expects \[0, 1\]"):
        read(float_tiff)


def test_float_read_with_a_range(float_tiff):
    image = read(float_tiff, Intensity("range", value_range=(0.0, 4000.0)))
    expected = np.linspace(0, 4000, 64).reshape(8, 8) / 4000
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    window = read(float_tiff, Intensity("range", value_range=(1000.0, 2000.0)))
    np.testing.assert_allclose(window[0].numpy(), np.clip((expected * 4000 - 1000) / 1000, 0, 1), atol=1e-6)


def test_percentile_stretch(float_tiff):
    image = read(float_tiff, Intensity("percentile", percentiles=(10.0, 90.0)))
    values = np.linspace(0, 4000, 64)
    low, high = np.percentile(values, [10, 90])
    np.testing.assert_allclose(image[0].numpy().ravel(), np.clip((values - low) / (high - low), 0, 1), atol=1e-5)


def test_twelve_bit_in_uint16(tmp_path):
    path = tmp_path / "twelve.tif"
    tifffile.imwrite(path, np.array([[0, 1000], [2047, 4095]], np.uint16))
    np.testing.assert_allclose(read(path)[0].numpy(), np.array([[0, 1000], [2047, 4095]]) / 65535, atol=1e-7)
    twelve = read(path, Intensity(bit_depth=12))
    np.testing.assert_allclose(twelve[0].numpy(), np.array([[0, 1000], [2047, 4095]]) / 4095, atol=1e-7)
    with pytest.raises(DataError, match=r"twelve.tif: pixel values range from 0 to 4095; data.bit_depth=10 "
                       r"expects 0 to 1023"):
        read(path, Intensity(bit_depth=10))


def test_signed_integers(tmp_path):
    path = tmp_path / "signed.tif"
    tifffile.imwrite(path, np.array([[-32768, 0], [100, 32767]], np.int16))
    np.testing.assert_allclose(read(path)[0].numpy(),
                               (np.array([[-32768, 0], [100, 32767]]) + 32768) / 65535, atol=1e-7)
    ct = read(path, Intensity("range", value_range=(-1000.0, 1000.0)))
    np.testing.assert_allclose(ct[0].numpy(), [[0, 0.5], [0.55, 1]], atol=1e-7)
    with pytest.raises(DataError, match="pixel values range from -32768 to 32767; data.bit_depth=12"):
        read(path, Intensity(bit_depth=12))


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"range needs data.intensity_range: \[low, high\]"):
        Intensity("range")
    with pytest.raises(ValueError, match="only used with data.intensity: range"):
        Intensity("unit", value_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="data.percentiles"):
        Intensity("percentile", percentiles=(99.0, 1.0))


def test_stats_reads_as_training_does(float_tiff):
    with pytest.raises(DataError, match="cells.tif: float pixel values"):
        compute_normalization(float_tiff.parent)
    mean, std = compute_normalization(float_tiff.parent, intensity=Intensity("range", value_range=(0.0, 4000.0)))
    values = np.linspace(0, 4000, 64) / 4000
    assert mean[0] == pytest.approx(values.mean(), abs=1e-6) and std[0] == pytest.approx(values.std(), abs=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32])
def test_one_scaling_rule_for_reader_and_model(dtype):
    """The model's input step and the reader scale every integer type by the same rule, exactly: the dtype's
    range onto [0, 1] (signed integers shifted by their minimum, not divided by their maximum)."""
    info = np.iinfo(dtype)
    values = np.array([info.min, info.min + 1, -1 if info.min else 1, 0, 1, info.max // 3, info.max - 1, info.max],
                      dtype)
    expected = ((values.astype(np.float64) - info.min) / (float(info.max) - info.min)).astype(np.float32)
    read_scaled = scale_pixels(values, "x.tif", Intensity())
    model_scaled = Normalize(1)(torch.from_numpy(values).view(1, 1, 1, -1)).flatten().numpy()
    assert read_scaled.dtype == np.float32
    np.testing.assert_array_equal(read_scaled, expected)
    np.testing.assert_array_equal(model_scaled, expected)
    assert read_scaled.min() == 0.0 and read_scaled.max() == 1.0


def test_scaling_of_bits_windows_booleans_and_floats():
    twelve = to_unit_range(torch.tensor([0, 4095], dtype=torch.int16), bit_depth=12)
    assert torch.equal(twelve, torch.tensor([0.0, 1.0]))
    hounsfield = torch.tensor([-2000, -1000, 0, 1000, 3000], dtype=torch.int16)
    window = to_unit_range(hounsfield, value_range=(-1000.0, 1000.0))
    assert torch.equal(window, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(to_unit_range(torch.tensor([True, False])), torch.tensor([1.0, 0.0]))
    half = torch.tensor([0.25], dtype=torch.float16)
    assert to_unit_range(half) is half  # floats are already the model's input: kept, dtype and all
    assert scale_pixels(np.array([0.25], np.float64), "x.tif", Intensity()).dtype == np.float32
