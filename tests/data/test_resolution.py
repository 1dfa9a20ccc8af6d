"""Resolution metadata: a TIFF's microns per pixel is taken only when it can be a microscope scan's; a
placeholder (libvips' 1 px/mm, 72 or 96 dpi, a unit of none, an absurd value) is unknown, said so by
``inspect`` and the run log, and the user's ``mpp`` CSV column or ``data.slide_mpp`` supplies the truth."""

import numpy as np
import pytest
import tifffile

from patchgd.cli import main
from patchgd.data.datasets import ImageCSVDataset
from patchgd.data.errors import DataError
from patchgd.data.readers import open_source

from slide_files import he_tile

PIXELS = np.ascontiguousarray(np.tile(he_tile(), (2, 2, 1)))  # 480 x 480


def write_tiff(path, **tags):
    """A two-level tiled TIFF (480 and 240 px) with the given resolution tags on level 0."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(PIXELS, tile=(64, 64), photometric="rgb", **tags)
        tif.write(PIXELS[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    return path


def write_libvips_tiff(path):
    """A pyramidal TIFF as libvips writes it when nobody set a resolution: 1 px/mm."""
    import pyvips

    pyvips.Image.new_from_array(PIXELS, interpretation="srgb").tiffsave(
        str(path), tile=True, pyramid=True, tile_width=64, tile_height=64, compression="deflate")
    return path


@pytest.mark.parametrize("tags, expected, reason", [
    (dict(resolution=(40000, 40000), resolutionunit=3), 0.25, "file"),  # 40,000 px/cm: a 40x scan
    (dict(resolution=(101600, 101600), resolutionunit=2), 0.25, "file"),  # the same in px/inch
    (dict(resolution=(72, 72), resolutionunit=2), None, "72 dpi: a screen or print default"),
    (dict(resolution=(96, 96), resolutionunit=2), None, "96 dpi"),
    (dict(resolution=(1, 1), resolutionunit=3), None, "the file says 1e+04 um/px"),  # 1 px/cm
    (dict(resolution=(40000, 40000), resolutionunit=1), None, "unit of none"),
    (dict(), None, "unit of none"),  # tifffile's default tags: 1 pixel per unit of none
    (dict(metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"}, resolution=None), 0.5, "file"),  # OME
    (dict(metadata={"PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm"}, resolution=None), 0.5, "file"),
    (dict(description="Aperio Image Library v12\n480x480 [0,0 480x480] (64x64) JPEG/RGB Q=70|MPP = 0.2527",
          metadata=None), 0.2527, "file"),
], ids=["cm", "inch", "72dpi", "96dpi", "1px-per-cm", "unit-none", "tifffile-default", "ome-um", "ome-nm", "aperio"])
def test_resolution_tags_are_trusted_only_when_plausible(tmp_path, tags, expected, reason):
    name = "s.ome.tif" if "PhysicalSizeX" in str(tags.get("metadata")) else "s.tif"
    source = open_source(write_tiff(tmp_path / name, **tags))
    mpp, origin = source.resolution()
    assert mpp == pytest.approx(expected) if expected else mpp is None
    assert reason in origin
    assert source.describe()["mpp"] == mpp


def test_libvips_placeholder_is_unknown_and_inspect_says_so(tmp_path, capsys):
    path = write_libvips_tiff(tmp_path / "vips.tif")
    assert open_source(path).resolution()[0] is None
    assert main(["inspect", str(path), "--out", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "mpp unknown: the file says 1000 um/px (1 px/mm: libvips' placeholder)" in out
    assert "mpp column in the CSV, data.slide_mpp" in out
    assert main(["inspect", str(path), "--slide-mpp", "0.5", "--mpp", "1.0", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "0.5 um/px at level 0 (given)" in out and "<- chosen" in out.splitlines()[3]  # level 1 = 1 um/px
    with pytest.raises(DataError, match=r"vips.tif: microns per pixel unknown \(the file says 1000 um/px.*mpp column"):
        open_source(path, mpp=1.0)


def test_an_mpp_column_or_slide_mpp_gives_the_resolution_that_data_mpp_picks_a_level_by(tmp_path):
    (tmp_path / "train").mkdir()
    write_libvips_tiff(tmp_path / "train" / "a.tif")
    write_libvips_tiff(tmp_path / "train" / "b.tif")
    (tmp_path / "train.csv").write_text("image_id,label,mpp\na,0,0.25\nb,1,\n")
    read = dict(in_chans=3, mpp=0.5, patch_size=64)
    with pytest.raises(DataError, match="b.tif: microns per pixel unknown"):
        ImageCSVDataset(tmp_path / "train.csv", **read)  # b has no value, and its file's is a placeholder
    ds = ImageCSVDataset(tmp_path / "train.csv", slide_mpp=0.5, **read)  # the column's 0.25 wins for a
    assert ds.image_sizes == [(240, 240), (480, 480)]  # a: 0.5 um/px at level 1; b: level 0 is 0.5 um/px
    assert ds[0][0].source.level == 1 and ds[1][0].source.level == 0
    assert ds.unknown_mpp == []
    plain = ImageCSVDataset(tmp_path / "train.csv", in_chans=3, level=0, patch_size=64)  # read by level
    assert plain.slide_mpps == [0.25, None] and [p.name for p, _ in plain.unknown_mpp] == ["b.tif"]
    (tmp_path / "train.csv").write_text("image_id,label,mpp\na,0,0.25\nb,1,fast\n")
    with pytest.raises(DataError, match=r"train.csv, line 3: mpp='fast'; expected a positive number"):
        ImageCSVDataset(tmp_path / "train.csv", **read)


def test_the_run_log_names_slides_of_unknown_resolution(tmp_path):
    from patchgd.config import config_from_dict
    from patchgd.engine.data import describe_data

    (tmp_path / "train").mkdir()
    write_libvips_tiff(tmp_path / "train" / "a.tif")
    write_tiff(tmp_path / "train" / "b.tif", resolution=(40000, 40000), resolutionunit=3)
    (tmp_path / "train.csv").write_text("image_id,label\na,0\nb,1\n")
    ds = ImageCSVDataset(tmp_path / "train.csv", in_chans=3, level=0, patch_size=64)
    line = describe_data(config_from_dict({"data": {"num_classes": 2}}), ds, ds.subset([1])).splitlines()[-1]
    assert "resolution: 1 slide(s) with unknown microns per pixel, e.g. " in line
    assert "a.tif: the file says 1000 um/px" in line and "mpp column in the CSV or data.slide_mpp" in line
