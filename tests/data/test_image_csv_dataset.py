from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from patchgd.data.datasets import ImageCSVDataset, collate_images, compute_normalization
from patchgd.data.errors import DataError
from patchgd.data.images import require_one_size


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def ultra(tmp_path) -> Path:
    """An UltraMNIST-style folder: train.csv with image_id,label and train/<id>.png."""
    (tmp_path / "train").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        save_png(tmp_path / "train" / f"im{i}.png", rng.integers(0, 256, (16, 16)))
    return write_csv(tmp_path / "train.csv", "image_id,label\nim0,0\nim1,3\nim2,9\nim3,1\n")


def test_items(ultra):
    ds = ImageCSVDataset(ultra, num_classes=10)
    assert len(ds) == 4 and ds.labels == [0, 3, 9, 1] and ds.image_dir == ultra.parent / "train"
    image, label = ds[1]
    expected = np.asarray(Image.open(ultra.parent / "train" / "im1.png"))
    # Pixels stay in the file's integer type: scaling and normalisation are the model's first step.
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16) and label == 3
    np.testing.assert_array_equal(image[0].numpy(), expected)


def test_collate_stacks_equal_images_and_lists_mixed_sizes():
    a, b = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(3, 8, 8, dtype=torch.uint8)
    images, labels = collate_images([(a, 1), (b, 2)])
    assert torch.equal(images, torch.stack([a, b])) and labels.tolist() == [1, 2]
    c = torch.ones(3, 8, 16, dtype=torch.uint8)
    images, labels = collate_images([(a, 0), (c, 1)])
    assert isinstance(images, list) and images[0] is a and images[1] is c and labels.tolist() == [0, 1]


def test_resize_matches_pil(ultra):
    ds = ImageCSVDataset(ultra, image_size=8)
    image, _ = ds[2]
    assert image.shape == (1, 8, 8)
    source = Image.open(ultra.parent / "train" / "im2.png")
    expected = np.asarray(source.resize((8, 8), Image.Resampling.BILINEAR), np.float32)
    assert image.dtype == torch.uint8
    np.testing.assert_allclose(image[0].numpy().astype(np.float32), expected, atol=2)
    assert ImageCSVDataset(ultra, image_size=24)[0][0].shape == (1, 24, 24)


def test_channel_conversion(tmp_path):
    (tmp_path / "train").mkdir()
    save_png(tmp_path / "train" / "red.png", np.tile([255, 0, 0], (4, 4, 1)))
    save_png(tmp_path / "train" / "gray.png", np.full((4, 4), 51))
    csv_path = write_csv(tmp_path / "train.csv", "image_id,label\nred,0\ngray,1\n")
    gray = ImageCSVDataset(csv_path, in_chans=1)
    assert gray[0][0].shape == (1, 4, 4)
    assert gray[0][0].float().mean().item() == pytest.approx(0.299 * 255, abs=1)  # ITU-R 601 luma of pure red
    rgb = ImageCSVDataset(csv_path, in_chans=3)
    assert rgb[1][0].shape == (3, 4, 4) and torch.equal(rgb[1][0], torch.full((3, 4, 4), 51, dtype=torch.uint8))
    assert rgb[0][0][:, 0, 0].tolist() == [255, 0, 0]


def test_panda_layout_with_folds_and_tiffs(tmp_path):
    images = tmp_path / "train_images"
    images.mkdir()
    rows = ["image_id,data_provider,isup_grade,kfold"]
    for i in range(9):
        tifffile.imwrite(images / f"s{i}.tiff", np.full((6, 10, 3), 20 * i, np.uint8), photometric="rgb")
        rows.append(f"s{i},karolinska,{i % 6},{i % 3}")
    csv_path = write_csv(tmp_path / "train.csv", "\n".join(rows) + "\n")
    ds = ImageCSVDataset(csv_path, num_classes=6, in_chans=3)
    assert ds.label_column == "isup_grade" and ds.image_dir == images and len(ds) == 9
    assert torch.equal(ds[4][0], torch.full((3, 6, 10), 80, dtype=torch.uint8))
    val = ImageCSVDataset(csv_path, num_classes=6, fold=1, split="val")
    train = ImageCSVDataset(csv_path, num_classes=6, fold=1, split="train")
    assert val.image_ids == ["s1", "s4", "s7"]
    assert train.image_ids == ["s0", "s2", "s3", "s5", "s6", "s8"]
    with pytest.raises(DataError, match=r"fold=5 not in the kfold column; folds found: \[0, 1, 2\]"):
        ImageCSVDataset(csv_path, fold=5, split="val")
    with pytest.raises(ValueError, match="give both"):
        ImageCSVDataset(csv_path, fold=1)
    with pytest.raises(ValueError, match="split='test'"):
        ImageCSVDataset(csv_path, fold=1, split="test")


def test_fold_without_kfold_column(ultra):
    with pytest.raises(DataError, match=r"no fold column 'kfold'; found columns \['image_id', 'label'\]"):
        ImageCSVDataset(ultra, fold=0, split="train")


def test_ids_with_extension_and_other_formats(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_png(folder / "a.png", np.zeros((4, 4)))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "b.JPG")
    tifffile.imwrite(folder / "c.tif", np.full((4, 4), 65535, np.uint16))
    csv_path = write_csv(tmp_path / "list.csv", "\ufeffimage_id,label\na.png,0\nb,1\nc,2\n")
    ds = ImageCSVDataset(csv_path, folder)
    assert [p.name for p in ds.paths] == ["a.png", "b.JPG", "c.tif"]
    assert ds[2][0].dtype == torch.uint16 and ds[2][0].int().min().item() == 65535


def test_missing_csv_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        ImageCSVDataset(tmp_path / "nope.csv", tmp_path)
    write_csv(tmp_path / "train.csv", "image_id,label\na,0\n")
    with pytest.raises(FileNotFoundError, match="no image folder .*train_images"):
        ImageCSVDataset(tmp_path / "train.csv")


def test_missing_image(ultra):
    (ultra.parent / "train" / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) missing from .*train: 'im2'"):
        ImageCSVDataset(ultra)


def test_missing_or_misnamed_columns(ultra):
    write_csv(ultra, "image_id,target\nim0,1\n")
    with pytest.raises(DataError, match=r"no label column; expected one of \['label', 'isup_grade'\], found columns \['image_id', 'target'\]"):
        ImageCSVDataset(ultra)
    assert ImageCSVDataset(ultra, label_column="target").labels == [1]
    with pytest.raises(DataError, match=r"no label column 'grade'; found columns"):
        ImageCSVDataset(ultra, label_column="grade")
    write_csv(ultra, "id,label\nim0,1\n")
    with pytest.raises(DataError, match=r"no image id column 'image_id'; found columns \['id', 'label'\]"):
        ImageCSVDataset(ultra)
    assert ImageCSVDataset(ultra, id_column="id").image_ids == ["im0"]
    write_csv(ultra, "")
    with pytest.raises(DataError, match="empty file"):
        ImageCSVDataset(ultra)


def test_bad_labels(ultra):
    write_csv(ultra, "image_id,label\nim0,0\nim1,10\n")
    with pytest.raises(DataError, match=r"line 3: label 10 of image 'im1' is out of range; expected \[0, 10\)"):
        ImageCSVDataset(ultra, num_classes=10)
    write_csv(ultra, "image_id,label\nim0,-1\n")
    with pytest.raises(DataError, match="label -1 of image 'im0' is out of range"):
        ImageCSVDataset(ultra)
    write_csv(ultra, "image_id,label\nim0,seven\n")
    with pytest.raises(DataError, match=r"line 2: label 'seven' of image 'im0' is not a known class; "
                       r"expected one of \['one', 'two'\]"):
        ImageCSVDataset(ultra, classes=["one", "two"])
    write_csv(ultra, "image_id,label\nim0,2.0\n")
    assert ImageCSVDataset(ultra).labels == [2]


def test_corrupt_image_fails_when_the_dataset_is_built_naming_the_file(ultra):
    bad = ultra.parent / "train" / "im3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"im3.png: cannot decode image header"):
        ImageCSVDataset(ultra)
    bad.unlink()
    (ultra.parent / "train" / "im3.tiff").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"im3.tiff: no image data"):
        ImageCSVDataset(ultra)


def test_corrupt_pixel_data_behind_a_good_header_needs_a_full_check(ultra):
    bad = ultra.parent / "train" / "im3.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    ds = ImageCSVDataset(ultra)  # the header check passes
    with pytest.raises(DataError, match=r"im3.png: cannot decode image"):
        ds[3]
    with pytest.raises(DataError, match=r"im3.png: cannot decode image"):
        ImageCSVDataset(ultra, verify="full")


def test_float_pixels_non_finite_included_are_an_error_naming_the_file(ultra):
    # Float images are read (data.intensity says how they scale); a non-finite pixel is refused when read.
    pixels = np.full((16, 16), 0.5, np.float32)
    pixels[3, 4] = np.nan
    (ultra.parent / "train" / "im2.png").unlink()
    tifffile.imwrite(ultra.parent / "train" / "im2.tiff", pixels)
    ds = ImageCSVDataset(ultra)
    with pytest.raises(DataError, match=r"im2.tiff: 1 non-finite pixel value\(s\) \(nan or inf\)"):
        ds[2]


def test_odd_layouts_and_pixel_types_fail_at_build(ultra):
    (ultra.parent / "train" / "im1.png").unlink()
    tifffile.imwrite(ultra.parent / "train" / "im1.tiff", np.zeros((16, 16, 7), np.uint8), planarconfig="contig")
    with pytest.raises(DataError, match=r"im1.tiff: image of shape \(16, 16, 7\)"):
        ImageCSVDataset(ultra)
    # signed integers are images (data.intensity scales them); complex numbers are not
    tifffile.imwrite(ultra.parent / "train" / "im1.tiff", np.zeros((16, 16), np.complex64))
    with pytest.raises(DataError, match=r"im1.tiff: pixel type complex64"):
        ImageCSVDataset(ultra)


def test_mixed_sizes_are_read_from_the_headers_and_named_with_the_ways_out(ultra):
    save_png(ultra.parent / "train" / "im2.png", np.zeros((16, 20)))
    ds = ImageCSVDataset(ultra)
    assert ds.image_sizes == [(16, 16), (16, 16), (16, 20), (16, 16)]
    with pytest.raises(DataError, match=r"im2.png: image is 16x20 px but .*im0.png is 16x16; .*data.image_size"):
        require_one_size(ds.paths, ds.image_sizes)


@pytest.mark.parametrize("text, expected", [
    ("image_id,label\nim0,0\nim1,3\nim0,0\n", r"lines 2 and 4: image 'im0' is listed twice"),
    ("image_id,label\nim0,0\nim1,3\nim1,4\n", r"lines 3 and 4: image 'im1' has two labels \('3' and '4'\)"),
    ("image_id,label\nim0,0\nim1,3,7\n", r"line 3: 3 fields; expected 2"),
    ("image_id,label\nim0,0\nim1\n", r"line 3: 1 fields; expected 2"),
])
def test_malformed_csv_rows_are_errors_naming_the_rows(ultra, text, expected):
    write_csv(ultra, text)
    with pytest.raises(DataError, match=expected):
        ImageCSVDataset(ultra)


def test_a_utf16_csv_is_an_error_naming_the_file(ultra):
    ultra.write_text("image_id,label\nim0,0\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"train.csv: not UTF-8 text \(a UTF-16 file\)"):
        ImageCSVDataset(ultra)


def test_compute_normalization_matches_numpy(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3)) for h, w in ((5, 7), (12, 3), (8, 8))]
    for i, a in enumerate(arrays):
        save_png(folder / f"{i}.png", a)
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays]) / 255
    mean, std = compute_normalization(folder, in_chans=3)
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)
    write_csv(tmp_path / "list.csv", "image_id,label\n0,0\n1,0\n2,0\n")
    ds = ImageCSVDataset(tmp_path / "list.csv", folder, in_chans=3)
    np.testing.assert_allclose(compute_normalization(ds)[0], pixels.mean(0), atol=1e-6)
    assert compute_normalization(folder) == (mean, std)  # a folder is read as its images are: RGB here
    gray_mean, gray_std = compute_normalization(folder, in_chans=1)
    assert len(gray_mean) == len(gray_std) == 1
    sub_mean, _ = compute_normalization(ds, max_images=1, seed=0)
    singles = [a.reshape(-1, 3).mean(0) / 255 for a in arrays]
    assert any(np.allclose(sub_mean, s, atol=1e-6) for s in singles)
    with pytest.raises(ValueError, match="in_chans=1 but the dataset has in_chans=3"):
        compute_normalization(ds, in_chans=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        compute_normalization(tmp_path / "empty")
