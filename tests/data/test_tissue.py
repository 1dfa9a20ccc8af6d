import numpy as np
import pytest
import torch

from patchgd.data.readers import ArraySource, open_source
from patchgd.data.tissue import cell_fractions, hsv_saturation, tissue_mask, tissue_pixels
from slide_files import he_tile, write_pyramid_tiff

P = 64


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """Real H&E tissue (two 240 px tiles side by side) on near-white glass with sensor noise, 1000 x 1280 px."""
    rng = np.random.default_rng(0)
    canvas = (235 + rng.integers(0, 15, (1000, 1280, 3))).astype(np.uint8)
    canvas[320:560, 640:1120] = np.tile(he_tile(), (1, 2, 1))
    path = tmp_path_factory.mktemp("tissue") / "slide.tif"
    write_pyramid_tiff(path, canvas, tile=128, levels=3, compression="jpeg")
    return path


def expected_cells(y0: int, y1: int, x0: int, x1: int, p: int, shape: tuple[int, int]):
    """Cells wholly inside the tissue box, and cells at least one cell away from it."""
    inside = np.zeros(shape, bool)
    inside[-(-y0 // p) : y1 // p, -(-x0 // p) : x1 // p] = True
    near = np.zeros(shape, bool)
    near[max(y0 // p - 1, 0) : -(-y1 // p) + 1, max(x0 // p - 1, 0) : -(-x1 // p) + 1] = True
    return inside, ~near


@pytest.mark.parametrize("level", [0, 1])
def test_tissue_cells_are_where_the_tissue_is(slide, level):
    src = open_source(slide, level=level)
    mask = tissue_mask(src, P, 0.5, thumbnail_side=400)
    scale = 2**level
    assert mask.dtype == torch.bool and mask.shape == (-(-1000 // scale // P), -(-1280 // scale // P))
    inside, far = expected_cells(320 // scale, 560 // scale, 640 // scale, 1120 // scale, P, tuple(mask.shape))
    assert mask[torch.from_numpy(inside)].all()
    assert not mask[torch.from_numpy(far)].any()


def test_blank_glass_has_no_tissue_and_fraction_zero_keeps_all():
    glass = ArraySource(np.full((3, 200, 300), 240, np.uint8))
    assert not tissue_mask(glass, P, 0.1).any()
    assert tissue_mask(glass, P, 0.0).all()


def test_grey_images_use_darkness():
    grey = np.full((1, 256, 256), 230, np.uint8)
    grey[0, 64:192, 64:192] = 90
    mask = tissue_mask(ArraySource(grey), P, 0.5)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(mask, expected)


def test_tissue_pixels_find_real_tissue():
    canvas = np.full((600, 600, 3), 245, np.uint8)
    canvas[100:340, 200:440] = he_tile()
    pixels = tissue_pixels(canvas)
    assert pixels[100:340, 200:440].mean() > 0.7  # the tile itself has some glass (lumen, fat) in it
    outside = np.ones_like(pixels)
    outside[90:350, 190:450] = False
    assert not pixels[outside].any()


def test_cell_fractions_match_block_means():
    rng = np.random.default_rng(1)
    pixels = rng.random((12, 20)) > 0.5
    # Thumbnail at full resolution: each 8 x 8 cell is the mean of its own block; the bottom and right
    # edge cells count only their part inside the image.
    fractions = cell_fractions(pixels, 12, 20, 8)
    expected = np.array([[pixels[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].mean() for c in range(3)]
                         for r in range(2)])
    np.testing.assert_allclose(fractions, expected)
    # Thumbnail at half resolution: a 4 px cell covers one 2 x 2 block of thumbnail pixels.
    np.testing.assert_allclose(
        cell_fractions(pixels, 24, 40, 4),
        pixels.reshape(6, 2, 10, 2).mean(axis=(1, 3)),
    )
    # Cells smaller than a thumbnail pixel get the pixel they fall in.
    np.testing.assert_allclose(cell_fractions(pixels, 120, 200, 5), np.repeat(np.repeat(pixels, 2, 0), 2, 1))


def test_min_fraction_is_checked():
    with pytest.raises(ValueError, match="min_fraction=1.5"):
        tissue_mask(ArraySource(np.zeros((3, 8, 8), np.uint8)), 4, 1.5)


def test_saturation_is_that_of_scikit_image():
    from skimage.color import rgb2hsv

    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [7, 7, 7]]  # black and greys: saturation 0
    np.testing.assert_allclose(hsv_saturation(rgb), rgb2hsv(rgb)[:, :, 1], atol=1e-6)
