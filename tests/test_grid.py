import pytest
import torch

from patchgd.grid import PatchGrid, grid_shape


def test_grid_shape_keeps_partial_cells():
    assert grid_shape(512, 512, 128) == (4, 4)
    assert grid_shape(300, 513, 128) == (3, 5)
    assert grid_shape(10, 10, 64) == (1, 1)
    with pytest.raises(ValueError, match="patch_size"):
        grid_shape(10, 10, 0)


def test_patches_are_row_major_and_padded_bottom_right():
    # 1 image, 1 channel, 3 x 5 pixels, patch 2 -> 2 x 3 grid, padded to 4 x 6 with -1.
    image = torch.arange(15.0).view(1, 1, 3, 5)
    grid = PatchGrid(image, 2, pad_value=-1.0)
    assert (grid.rows, grid.cols, grid.num_cells) == (2, 3, 6)
    patches = grid.patches(torch.tensor([[0, 2, 4]]))
    expected = torch.tensor([
        [[0.0, 1.0], [5.0, 6.0]],       # cell 0 = row 0, col 0
        [[4.0, -1.0], [9.0, -1.0]],     # cell 2 = row 0, col 2: right column padded
        [[12.0, 13.0], [-1.0, -1.0]],   # cell 4 = row 1, col 1: bottom row padded
    ]).unsqueeze(1)
    assert torch.equal(patches, expected)


def test_patches_per_image_and_flat_indices_agree():
    images = torch.randn(3, 2, 8, 12)
    grid = PatchGrid(images, 4)
    cells = torch.tensor([[5, 0], [1, 2], [3, 4]])
    per_image = grid.patches(cells)
    flat = grid.patches(cells.flatten(), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(per_image, flat)
    # image 0, cell 5 = row 1, col 2
    assert torch.equal(per_image[0], images[0, :, 4:8, 8:12])


def test_rejects_input_that_is_neither_images_nor_sequences():
    # (B, C, H, W) images and (B, C, L) sequences are cut; anything else is a clear error.
    for shape in ((8, 8), (1, 3, 8, 8, 8)):
        with pytest.raises(ValueError, match=r"\(B, C, H, W\) or, for sequences, \(B, C, L\)"):
            PatchGrid(torch.zeros(shape), 4)


def test_patch_range_equals_slicing_for_every_run_of_cells():
    # 2 images of a padded 3 x 4 grid (5 x 7 px, patch 2): runs that start and stop mid-row, cover whole
    # rows, and cross from one image into the next are all cut as a per-cell slice loop would cut them.
    images = torch.randn(2, 3, 5, 7)
    padded = torch.nn.functional.pad(images, (0, 1, 0, 1), value=0.5)
    grid = PatchGrid(images, 2, pad_value=0.5)
    naive = torch.stack([padded[b, :, r * 2:r * 2 + 2, c * 2:c * 2 + 2]
                         for b in range(2) for r in range(3) for c in range(4)])
    for start in range(25):
        for stop in range(start, 25):
            assert torch.equal(grid.patch_range(start, stop), naive[start:stop]), (start, stop)
    with pytest.raises(ValueError, match="outside"):
        grid.patch_range(3, 25)
