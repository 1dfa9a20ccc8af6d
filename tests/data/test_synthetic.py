import numpy as np
import pytest
import tifffile

from patchgd.data.readers import OpenSlideSource, TiffSource, open_source
from patchgd.data.prepare.synthetic import write_synthetic_slide
from patchgd.data.tissue import tissue_mask

GREEN = (20, 180, 0)


def test_synthetic_slide(tmp_path):
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :] = GREEN  # a colour no glass has, so tissue pixels can be counted
    path = write_synthetic_slide(tmp_path / "synthetic.tif", size=2000, tile=256, tissue=0.1, seed=1,
                                 mpp=0.5, texture=texture)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left beside it
    src = open_source(path)
    assert isinstance(src, TiffSource)
    assert OpenSlideSource(path).describe()["levels"] == src.describe()["levels"]  # OpenSlide reads it too
    described = src.describe()
    assert (src.height, src.width) == (2000, 2000) and described["mpp"] == pytest.approx(0.5)
    assert [lv["downsample"] for lv in described["levels"]][:3] == [1.0, 2.0, 4.0]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256) and page.compression == 7  # JPEG
        pixels = page.asarray().astype(int)
    tissue = np.abs(pixels - GREEN).max(axis=-1) < 30
    glass = np.abs(pixels - 242).max(axis=-1) < 10
    assert (tissue | glass).mean() > 0.99  # blob edges are the only other pixels
    assert 0.03 < tissue.mean() < 0.2  # about the 10 % asked for (the layout is coarse at this size)
    # The tissue mask finds the blobs: its cells agree with the counted pixels.
    mask = tissue_mask(src, 100, 0.5, thumbnail_side=500).numpy()
    counted = tissue.reshape(20, 100, 20, 100).mean(axis=(1, 3)) >= 0.5
    assert (mask == counted).mean() > 0.97


def test_synthetic_slide_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="tissue=1.5"):
        write_synthetic_slide(tmp_path / "x.tif", size=100, tissue=1.5)
    with pytest.raises(ValueError, match="tile=100"):
        write_synthetic_slide(tmp_path / "x.tif", size=100, tile=100)
    assert not (tmp_path / "x.tif").exists()


def test_without_libvips_the_error_names_the_extra(tmp_path, monkeypatch):
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "pyvips", None)  # as if pyvips were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'patchgd\[synthetic\]'"):
        write_synthetic_slide(tmp_path / "s.tif", size=512)
    assert not (tmp_path / "s.tif").exists()
