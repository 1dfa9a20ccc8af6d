import multiprocessing
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from patchgd.data.errors import DataError
from patchgd.data.readers import (
    ArraySource,
    ImageFileSource,
    OpenSlideSource,
    TiffSource,
    open_source,
    select_level_by_mpp,
)
from slide_files import he_tile, write_pyramid_tiff, write_vips_pyramid

BACKENDS = [OpenSlideSource, TiffSource]
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Real H&E texture, 700 x 900 px: not a multiple of the tiles or patches, so edges are exercised."""
    return np.tile(he_tile(), (3, 4, 1))[:700, :900]


def decoded_level(path, level: int) -> np.ndarray:
    """The whole level decoded at once by tifffile, as (C, H, W): the reference for lazy reads."""
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray().transpose(2, 0, 1)


def cut(full: np.ndarray, cells, p: int, fill) -> np.ndarray:
    """Patches cut from a whole (C, H, W) image padded bottom/right with ``fill``: written independently."""
    c, h, w = full.shape
    padded = np.full((c, h + p, w + p), fill, full.dtype)
    padded[:, :h, :w] = full
    return np.stack([padded[:, r * p : (r + 1) * p, q * p : (q + 1) * p] for r, q in cells])


def cut_region(full, y, x, h, w, fill):
    """A region of a whole (C, H, W) image, pixel by pixel, ``fill`` outside it: a naive reference."""
    c, height, width = full.shape
    out = np.full((c, h, w), fill, full.dtype)
    for i in range(h):
        for j in range(w):
            if 0 <= y + i < height and 0 <= x + j < width:
                out[:, i, j] = full[:, y + i, x + j]
    return out


def all_cells(height: int, width: int, p: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(-(-height // p)) for c in range(-(-width // p))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
@pytest.mark.parametrize("level", [0, 1])
def test_lazy_cells_equal_the_decoded_level(tmp_path, tissue, backend, compression, level):
    path = tmp_path / "slide.tif"
    written = write_pyramid_tiff(path, tissue, tile=128, levels=3, compression=compression)
    full = decoded_level(path, level)
    if compression == "zlib":  # lossless: the file holds exactly what was written
        np.testing.assert_array_equal(full, written[level].transpose(2, 0, 1))
    src = backend(path, level=level)
    assert (src.height, src.width) == full.shape[1:]
    assert src.dtype == np.uint8 and src.channels == 3 and src.tiled
    p = 96
    cells = all_cells(src.height, src.width, p)
    rng = np.random.default_rng(0)
    shuffled = [cells[i] for i in rng.permutation(len(cells))] + cells[:3]  # any order, repeats allowed
    np.testing.assert_array_equal(src.read_cells(shuffled, p, fill=255), cut(full, shuffled, p, 255))
    corner = src.read(-7, src.width - 20, 30, 50, fill=3)  # over the top and right edges
    np.testing.assert_array_equal(corner, cut_region(full, -7, src.width - 20, 30, 50, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_libvips_pyramid(tmp_path, tissue, backend):
    """A pyramid written by another tool (libvips), read through both backends."""
    path = tmp_path / "vips.tif"
    write_vips_pyramid(path, tissue, tile=128, mpp=0.5)
    src = backend(path, mpp=1.0)
    assert src.level == 1 and src.describe()["mpp"] == pytest.approx(0.5)
    full = decoded_level(path, 1)
    cells = all_cells(src.height, src.width, 64)
    np.testing.assert_array_equal(src.read_cells(cells, 64), cut(full, cells, 64, 0))


def test_open_source_picks_the_backend(tmp_path, tissue):
    write_pyramid_tiff(tmp_path / "generic.tif", tissue[:200, :300], tile=64, levels=2, compression="zlib")
    assert type(open_source(tmp_path / "generic.tif")) is TiffSource  # OpenSlide can too (tested above)
    with tifffile.TiffWriter(tmp_path / "ome.ome.tif", ome=True) as tif:
        tif.write(tissue[:256, :256], tile=(64, 64), photometric="rgb", subifds=1,
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tif.write(tissue[:256:2, :256:2], tile=(64, 64), photometric="rgb", subfiletype=1)
    # OpenSlide would see one level and no mpp in this OME-TIFF: tifffile reads its SubIFD pyramid.
    ome = open_source(tmp_path / "ome.ome.tif", mpp=1.0)
    assert type(ome) is TiffSource and ome.level == 1 and (ome.height, ome.width) == (128, 128)
    np.testing.assert_array_equal(ome.read(0, 0, 128, 128), tissue[:256:2, :256:2].transpose(2, 0, 1))
    tifffile.imwrite(tmp_path / "strip.tif", tissue[:50, :60])
    Image.fromarray(tissue[:50, :60]).save(tmp_path / "plain.png")
    for name in ("strip.tif", "plain.png"):
        src = open_source(tmp_path / name)
        assert type(src) is ImageFileSource and not src.tiled and src.dtype == np.uint8
        np.testing.assert_array_equal(src.read(0, 0, 50, 60), tissue[:50, :60].transpose(2, 0, 1))


def test_level_and_mpp_selection(tmp_path, tissue):
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, tissue, tile=128, levels=3, compression="zlib", mpp=0.25)
    for backend in BACKENDS:
        assert backend(path).level == 0
        assert (backend(path, level=2).height, backend(path, level=2).width) == (175, 225)
        # The coarsest level at most as coarse as asked: 0.25, 0.5, 1.0 um/px levels.
        for mpp, level in [(0.1, 0), (0.25, 0), (0.4, 0), (0.5, 1), (0.9, 1), (1.0, 2), (8.0, 2)]:
            assert backend(path, mpp=mpp).level == level, (backend, mpp)
        with pytest.raises(DataError, match="slide.tif: level 3 asked for; the file has levels 0..2"):
            backend(path, level=3)
        with pytest.raises(ValueError, match="at most one"):
            backend(path, level=1, mpp=0.5)
    described = open_source(path, level=1).describe()
    assert [(lv["height"], lv["width"], lv["downsample"], lv["mpp"]) for lv in described["levels"]] == [
        (700, 900, 1.0, 0.25), (350, 450, 2.0, 0.5), (175, 225, 4.0, 1.0)]
    assert described["vendor"] == "generic-tiff" and described["level"] == 1


def test_mpp_rule_tolerates_vendor_downsamples():
    assert select_level_by_mpp([0.2520, 1.0082, 4.0328], 1.0) == 1  # Aperio stores 4.0005x, not 4x
    assert select_level_by_mpp([0.25, 1.0, 4.0], 0.99) == 0
    assert select_level_by_mpp([0.5, 2.0], 0.25) == 0


def test_mpp_without_metadata_is_an_error_naming_the_file(tmp_path, tissue):
    path = tmp_path / "nompp.tif"
    write_pyramid_tiff(path, tissue[:256, :256], tile=64, levels=2, compression="zlib", mpp=None)
    for backend in [*BACKENDS, open_source]:
        assert backend(path, level=1).describe()["mpp"] is None
        with pytest.raises(DataError, match=r"nompp.tif: microns per pixel unknown .*mpp=0.5 needs it"):
            backend(path, mpp=0.5)
    Image.fromarray(tissue[:20, :20]).save(tmp_path / "plain.png")
    with pytest.raises(DataError, match=r"plain.png: microns per pixel unknown \(the file holds no microns-per-pixel metadata\)"):
        open_source(tmp_path / "plain.png", mpp=0.5)


@pytest.mark.parametrize("backend", [*BACKENDS, ImageFileSource])
def test_grey_and_colour_conversion(tmp_path, tissue, backend):
    path = tmp_path / "slide.tif"
    if backend is ImageFileSource:
        path = tmp_path / "slide.png"
        Image.fromarray(tissue).save(path)
    else:
        write_pyramid_tiff(path, tissue, tile=128, compression="zlib")
    grey = backend(path, in_chans=1).read(5, 7, 40, 50)
    rgb = tissue[5:45, 7:57].astype(np.float64)
    assert grey.dtype == np.uint8 and grey.shape == (1, 40, 50)
    # PIL's own L conversion rounds in fixed point: within one grey level of ITU-R 601 luma.
    assert np.abs(grey[0].astype(int) - np.rint(rgb @ LUMA)).max() <= 1
    write_pyramid_tiff(tmp_path / "grey.tif", tissue[:, :, :1], tile=128, compression="zlib")
    colour = open_source(tmp_path / "grey.tif", in_chans=3).read(0, 0, 8, 8)
    np.testing.assert_array_equal(colour, np.repeat(tissue[None, :8, :8, 0], 3, axis=0))


def test_image_files_keep_their_integer_type(tmp_path):
    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    src = open_source(tmp_path / "deep.png", in_chans=1)
    assert src.dtype == np.uint16
    np.testing.assert_array_equal(src.read_cells([(1, 1)], 16, fill=7), cut(deep[None], [(1, 1)], 16, 7))
    with pytest.raises(DataError, match="deep.png: level 1 asked for; the file has levels 0..0"):
        open_source(tmp_path / "deep.png", level=1)


def test_array_source(tmp_path):
    array = torch.rand(2, 50, 70)
    src = ArraySource(array)
    assert src.channels == 2 and src.dtype == np.float32
    cells = all_cells(50, 70, 32)
    np.testing.assert_array_equal(src.read_cells(cells, 32, fill=0.5), cut(array.numpy(), cells, 32, 0.5))
    colour = torch.rand(3, 40, 60)
    thumb = ArraySource(colour).thumbnail(30)
    expected = Image.fromarray((colour.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)).reduce(2)
    np.testing.assert_array_equal(thumb, np.asarray(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_overlapping_tiles_are_decoded(tmp_path, tissue, backend):
    """Every tile but the four under one patch is garbage: the patch still reads, a neighbour does not."""
    path = tmp_path / "sparse.tif"
    write_pyramid_tiff(path, tissue, tile=64, levels=1, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // 64)
        segments = list(zip(page.dataoffsets, page.databytecounts))
    patch_tiles = {(r, c) for r in (1, 2) for c in (2, 3)}  # pixels 96..160 x 160..224 at 64 px tiles
    with open(path, "r+b") as f:
        for index, (offset, count) in enumerate(segments):
            if divmod(index, tiles_across) not in patch_tiles:
                f.seek(offset)
                f.write(b"\xff" * count)
    src = backend(path)
    np.testing.assert_array_equal(src.read(96, 160, 64, 64), tissue[96:160, 160:224].transpose(2, 0, 1))
    with pytest.raises(DataError, match=r"sparse.tif: cannot decode level 0 region y=96..160, x=224..288"):
        src.read(96, 224, 64, 64)
    with pytest.raises(DataError, match=r"sparse.tif: .* grid row 0, columns 0..0 of 64 px patches"):
        backend(path).read_cells([(0, 0)], 64)


def test_unreadable_files_are_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        open_source(tmp_path / "missing.svs")
    (tmp_path / "junk.svs").write_bytes(b"not a slide at all")
    with pytest.raises(DataError, match="junk.svs: cannot decode image"):
        open_source(tmp_path / "junk.svs")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(DataError, match="cut.tif"):
        open_source(tmp_path / "cut.tif")


@pytest.mark.parametrize("backend", [*BACKENDS, ImageFileSource])
def test_sources_pickle_without_their_handles(tmp_path, tissue, backend):
    path = tmp_path / ("slide.png" if backend is ImageFileSource else "slide.tif")
    if backend is ImageFileSource:
        Image.fromarray(tissue).save(path)
    else:
        write_pyramid_tiff(path, tissue, tile=128, compression="zlib")
    src = backend(path)
    payload = pickle.dumps(src)
    assert len(payload) < 4096  # the path and the geometry, not pixels or handles
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.read_cells([(1, 2), (0, 0)], 100), src.read_cells([(1, 2), (0, 0)], 100))
    src.close()
    np.testing.assert_array_equal(src.read(0, 0, 5, 5), copy.read(0, 0, 5, 5))  # reopens after close


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_reads_a_small_level(tmp_path, tissue, backend):
    """Level 0 is garbage: a thumbnail must come from a smaller level, and look like the image."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, tissue, tile=64, levels=3, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        segments = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    with open(path, "r+b") as f:
        for offset, count in segments:
            f.seek(offset)
            f.write(b"\xff" * count)
    thumb = backend(path).thumbnail(300)
    assert thumb.shape == (233, 300, 3) and thumb.dtype == np.uint8
    expected = np.asarray(Image.fromarray(tissue).resize((300, 233), Image.Resampling.BOX)).astype(int)
    assert np.abs(thumb.astype(int) - expected).mean() < 12  # the same picture, resampled differently
    assert backend(path).thumbnail(400).shape == (311, 400, 3)  # from level 1 (450 px wide)


def _read_in_child(src, queue):
    patch = src.read(0, 0, 8, 8)
    queue.put((src._pid == os.getpid(), patch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_worker_opens_its_own_handle(tmp_path, tissue, backend):
    """A DataLoader worker forked after the parent read inherits the source, not the parent's handle."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, tissue[:256, :256], tile=64, levels=1, compression="zlib")
    src = backend(path)
    expected = src.read(0, 0, 8, 8)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(src, queue))
    child.start()
    reopened, patch = queue.get(timeout=60)
    child.join()
    assert reopened and child.exitcode == 0
    np.testing.assert_array_equal(patch, expected)


def test_openslide_transparent_pixels_become_the_background_colour(tmp_path, tissue):
    """OpenSlide returns transparent RGBA where nothing was scanned (here: past the image's corner)."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, tissue[:100, :120], tile=64, levels=1, compression="zlib")
    src = OpenSlideSource(path)
    region = src._region(0, 96, 116, 8, 8)  # 4 x 4 scanned pixels, the rest transparent
    np.testing.assert_array_equal(region[:4, :4], tissue[96:100, 116:120])
    assert (region[4:] == 255).all() and (region[:, 4:] == 255).all()  # generic TIFF: white background
