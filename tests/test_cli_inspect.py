"""`patchgd inspect`: a slide's levels, mpp, grid and tissue cells, and the picture of them."""

import re

import numpy as np
import pytest
from PIL import Image

from patchgd.cli import main
from slide_files import he_tile, write_pyramid_tiff


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """H&E tissue at rows 256..496, columns 384..864 of a 640 x 1024 px glass slide; levels at 0.5, 1, 2 um/px."""
    canvas = np.full((640, 1024, 3), 240, np.uint8)
    canvas[256:496, 384:864] = np.tile(he_tile(), (1, 2, 1))
    path = tmp_path_factory.mktemp("inspect") / "slide.tif"
    write_pyramid_tiff(path, canvas, tile=128, levels=3, compression="zlib", mpp=0.5)
    return path, canvas


def test_inspect_prints_the_pyramid_and_draws_the_grid(slide, tmp_path, capsys):
    path, canvas = slide
    png = tmp_path / "grid.png"
    assert main(["inspect", str(path), "--out", str(png), "--patch-size", "64", "--mpp", "1.0",
                 "--thumbnail-side", "512"]) == 0
    out = capsys.readouterr().out
    assert "generic-tiff, 0.5 um/px at level 0" in out
    for level, (h, w, ds, mpp) in enumerate([(640, 1024, 1, 0.5), (320, 512, 2, 1), (160, 256, 4, 2)]):
        assert re.search(rf"^\s+{level}\s+{h} x {w}\s+{ds}\s+{mpp}", out, re.M), out
    assert re.search(r"1\s+320 x 512 .*<- chosen", out)
    assert "grid: 5 x 8 cells of 64 px at level 1 (40 cells)" in out
    # At level 1 the tissue spans rows 128..248 and columns 192..432: cells (2..3, 3..6) are wholly tissue,
    # cells (1, *), (*, 2) and (*, 6) hold part of it.
    tissue = int(re.search(r"tissue: (\d+) cells", out).group(1))
    assert 2 * 4 <= tissue <= 3 * 5
    picture = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert picture.shape == (320, 512, 3)  # level 1 is the smallest level at least 512 px wide
    level1 = np.asarray(Image.fromarray(canvas).reduce(2)).astype(int)
    # A tissue cell's inside is the slide itself; a background cell's inside is dimmed glass.
    np.testing.assert_array_equal(picture[140:180, 262:310], level1[140:180, 262:310])  # inside cell (2, 4)
    glass = picture[270:310, 10:50]  # inside cell (4, 0), away from the title in the top-left corner
    assert np.all(glass < 240 * 0.7) and np.all(glass > 240 * 0.5)


def test_inspect_errors_name_the_slide(slide, tmp_path, capsys):
    path, _ = slide
    assert main(["inspect", str(path), "--level", "7"]) == 2
    assert f"{path}: level 7 asked for; the file has levels 0..2" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "plain.png")
    assert main(["inspect", str(tmp_path / "plain.png"), "--mpp", "0.5"]) == 2
    assert "plain.png: microns per pixel unknown (the file holds no microns-per-pixel metadata)" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.svs")]) == 2
    assert "missing.svs: no such image or slide file" in capsys.readouterr().err
