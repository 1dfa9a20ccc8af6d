import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from patchgd.data.errors import DataError
from patchgd.data.prepare.panda import prepare_panda, read_slide

GRADES = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
LEVEL_VALUES = (40, 80, 120)  # level k of a pyramid is filled with LEVEL_VALUES[k]


def write_pyramid(path: Path, height: int, width: int, subifds: bool) -> None:
    """A 3-level RGB pyramid, each level a constant colour so a test can tell which one was read."""
    levels = [np.full((height >> k, width >> k, 3), v, np.uint8) for k, v in enumerate(LEVEL_VALUES)]
    with tifffile.TiffWriter(path) as tif:
        if subifds:
            tif.write(levels[0], subifds=2, photometric="rgb", tile=(16, 16))
            for level in levels[1:]:
                tif.write(level, subfiletype=1, photometric="rgb", tile=(16, 16))
        else:  # PANDA's own layout: the levels as consecutive pages
            for level in levels:
                tif.write(level, photometric="rgb", tile=(16, 16))


@pytest.fixture
def panda_src(tmp_path) -> Path:
    src = tmp_path / "panda"
    (src / "train_images").mkdir(parents=True)
    lines = ["image_id,data_provider,isup_grade,gleason_score"]
    for i, grade in enumerate(GRADES):
        path = src / "train_images" / f"slide{i:02d}.tiff"
        if i % 3 == 0:
            write_pyramid(path, 96, 160, subifds=True)  # landscape
        elif i % 3 == 1:
            write_pyramid(path, 160, 96, subifds=False)  # portrait
        else:
            tifffile.imwrite(path, np.full((30, 50), 200, np.uint8))  # small, grayscale, one level
        lines.append(f"slide{i:02d},radboud,{grade},0+0")
    (src / "train.csv").write_text("\n".join(lines) + "\n")
    return src


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_prepare(panda_src, tmp_path):
    out = prepare_panda(panda_src, tmp_path / "out", size=64, folds=2, seed=0, progress=False)
    rows = read_rows(out / "train.csv")
    assert list(rows[0]) == ["image_id", "isup_grade", "kfold"]
    assert [r["image_id"] for r in rows] == [f"slide{i:02d}" for i in range(12)]
    assert [int(r["isup_grade"]) for r in rows] == GRADES
    # Stratified: each fold holds one slide of every grade.
    assert Counter((int(r["kfold"]), int(r["isup_grade"])) for r in rows) == {(k, g): 1 for k in (0, 1) for g in range(6)}
    for i in range(12):
        image = Image.open(out / "train_images" / f"slide{i:02d}.png")
        assert image.mode == "RGB" and image.size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "panda"]


def test_level_choice_resize_and_white_padding(panda_src, tmp_path):
    out = prepare_panda(panda_src, tmp_path / "out", size=64, folds=2, progress=False)
    land = np.asarray(Image.open(out / "train_images" / "slide00.png"))
    # 160x96 at levels 160, 80, 40 px long side: the smallest >= 64 is level 1; 80x48 -> 64x38.
    assert (land[:38] == LEVEL_VALUES[1]).all() and (land[39:] == 255).all()
    portrait = np.asarray(Image.open(out / "train_images" / "slide01.png"))
    assert (portrait[:, :38] == LEVEL_VALUES[1]).all() and (portrait[:, 39:] == 255).all()
    small = np.asarray(Image.open(out / "train_images" / "slide02.png"))
    # 50x30 is upsampled to 64x38 (no level is large enough), grayscale becomes RGB.
    assert (small[:38] == 200).all() and (small[39:] == 255).all()


def test_read_slide_levels(panda_src):
    slide = panda_src / "train_images" / "slide03.tiff"
    # Read from the smallest level whose long side is at least `size`, shrunk to `size`, never enlarged.
    for size, value, shape in ((10, 120, (10, 6)), (40, 120, (40, 24)), (41, 80, (41, 25)), (81, 40, (81, 49)),
                               (999, 40, (160, 96))):
        image = read_slide(slide, size)
        assert image.size == shape and (np.asarray(image) == value).all()


def test_folds_deterministic(panda_src, tmp_path):
    a = prepare_panda(panda_src, tmp_path / "a", size=16, folds=2, seed=7, progress=False)
    b = prepare_panda(panda_src, tmp_path / "b", size=16, folds=2, seed=7, workers=2, progress=False)
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    for p in (a / "train_images").iterdir():
        assert (b / "train_images" / p.name).read_bytes() == p.read_bytes()


def test_missing_slide_fails_before_writing(panda_src, tmp_path):
    (panda_src / "train_images" / "slide05.tiff").unlink()
    with pytest.raises(FileNotFoundError, match="'slide05'"):
        prepare_panda(panda_src, tmp_path / "out", size=32, folds=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_grade(panda_src, tmp_path):
    text = (panda_src / "train.csv").read_text().replace("slide04,radboud,2", "slide04,radboud,6")
    (panda_src / "train.csv").write_text(text)
    with pytest.raises(DataError, match=r"label 6 of image 'slide04' is out of range; expected \[0, 6\)"):
        prepare_panda(panda_src, tmp_path / "out", size=32, folds=2, progress=False)


def test_corrupt_slide_leaves_nothing(panda_src, tmp_path):
    (panda_src / "train_images" / "slide07.tiff").write_bytes(b"II*\x00garbage")
    # The dataset opens every TIFF when it is built, so the bad file stops the run before any conversion.
    with pytest.raises(DataError, match=r"slide07.tiff: no image data"):
        prepare_panda(panda_src, tmp_path / "out", size=32, folds=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panda"]


def test_bad_folds(panda_src, tmp_path):
    with pytest.raises(ValueError, match=r"folds=1; expected 2..12"):
        prepare_panda(panda_src, tmp_path / "out", size=32, folds=1, progress=False)
