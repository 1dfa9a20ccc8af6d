"""Augmentation of slides read in pieces: every flip, turn and colour jitter of a lazy grid gives exactly what
the same augmentation of the whole decoded level gives in memory (padded to its grid, moved, jittered),
in Z, in the patches a schedule samples and in a training step; the stain jitter is scikit-image's."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import patchgd
from patchgd.config import AugmentConfig
from patchgd.data.augment import Augment
from patchgd.data.colour import ColourJitter, hed_jitter
from patchgd.data.readers import ArraySource, open_source
from patchgd.data.lazy import LazyImage, SourceGrid
from patchgd.grid import Orientation, PatchGrid
from patchgd.model.heads import ConvHead
from patchgd.normalize import to_unit_range

from helpers import TinyEncoder
from slide_files import he_tile, write_pyramid_tiff, write_slide_dataset

P = 16
ORIENTATIONS = [Orientation(h, v, t) for h in (False, True) for v in (False, True) for t in range(4)]
JITTER = ColourJitter(brightness=1.1, contrast=0.85, saturation=1.2, hue=0.03,
                      hed_scale=torch.tensor([1.04, 0.97, 1.02]), hed_shift=torch.tensor([0.01, -0.02, 0.005]))


def make_model(seed=0):
    torch.manual_seed(seed)
    return patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=3, patch_size=P, latent_dim=6,
                                     head=ConvHead(6, 3, width=8, dropout=0.2), mean=[0.6], std=[0.2], pad_value=255)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A lossless tiled TIFF of real H&E pixels, 100 x 120 (neither side a multiple of P), and its level 0."""
    pixels = np.ascontiguousarray(he_tile()[:100, :120])
    path = tmp_path_factory.mktemp("augment") / "slide.tif"
    write_pyramid_tiff(path, pixels, tile=32, levels=2, compression="zlib")
    return path, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def whole(pixels, orientation, colour=None, pad_value=255):
    """The independent reference: the level padded to its grid, flipped and turned whole, jittered whole."""
    m, n = math.ceil(pixels.shape[1] / P), math.ceil(pixels.shape[2] / P)
    padded = F.pad(pixels, (0, n * P - pixels.shape[2], 0, m * P - pixels.shape[1]), value=pad_value)
    moved = orientation.apply(padded)
    return colour.apply(to_unit_range(moved)) if colour is not None else moved


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=str)
def test_z_and_sampled_patches_of_an_augmented_slide_equal_the_whole_level_augmented(slide, orientation):
    path, pixels = slide
    model = make_model().eval()
    lazy = LazyImage(open_source(path, in_chans=3), orientation=orientation)
    reference = whole(pixels, orientation)
    assert lazy.size == orientation.shape(100, 120)
    assert torch.equal(model.fill_z([lazy]), model.fill_z(reference[None]))
    grid, memory = SourceGrid([lazy], P, pad_value=255), PatchGrid(reference[None], P)
    assert grid.shape == memory.shape == ((8, 7) if orientation.turns % 2 else (7, 8))
    cells = torch.tensor([[0, 5, 13, 55, 31]])  # corners and middles of the turned grid
    assert torch.equal(grid.patches(cells), memory.patches(cells))


def test_colour_jitter_per_patch_on_a_slide_equals_jitter_of_the_whole_level(slide):
    path, pixels = slide
    model = make_model().eval()
    for orientation in (Orientation(), Orientation(True, False, 3)):
        lazy = LazyImage(open_source(path, in_chans=3), orientation=orientation, colour=JITTER)
        reference = whole(pixels, orientation, JITTER)
        torch.testing.assert_close(model.fill_z([lazy], batch_size=5), model.fill_z(reference[None]),
                                   rtol=0, atol=1e-6)
        cells = torch.tensor([[3, 40, 7]])
        torch.testing.assert_close(SourceGrid([lazy], P, 255).patches(cells),
                                   PatchGrid(reference[None], P).patches(cells), rtol=0, atol=1e-6)


def test_training_step_on_an_augmented_slide_equals_the_step_on_the_augmented_level(slide):
    path, pixels = slide
    orientation = Orientation(False, True, 1)
    runs = []
    for images in (whole(pixels, orientation, JITTER)[None],
                   [LazyImage(open_source(path, in_chans=3), orientation=orientation, colour=JITTER)]):
        model = make_model()
        trainer = patchgd.PatchGD(model, torch.optim.Adam(model.parameters(), lr=1e-2), sampling=0.2,
                                  generator=torch.Generator().manual_seed(3))
        torch.manual_seed(5)  # dropout
        stats = trainer.step(images, torch.tensor([1]))
        runs.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_tissue_mask_turns_with_the_grid():
    image = torch.randint(0, 255, (3, 3 * P, 5 * P), dtype=torch.uint8)
    tissue = torch.zeros(3, 5, dtype=torch.bool)
    tissue[0, 1] = tissue[2, 4] = tissue[1, 2] = True
    orientation = Orientation(True, False, 1)
    grid = SourceGrid([LazyImage(ArraySource(image), tissue, orientation)], P)
    turned = orientation.apply(tissue)
    assert grid.shape == (5, 3)
    assert torch.equal(grid.sampleable(0), turned.flatten().nonzero().squeeze(1))
    # Every sampleable cell holds the pixels of the stored tissue cell it came from.
    memory = PatchGrid(orientation.apply(image)[None], P)
    assert torch.equal(grid.patches(grid.sampleable(0)[None]), memory.patches(grid.sampleable(0)[None]))


def test_hed_jitter_is_scikit_images_stain_round_trip():
    from skimage.color import hed2rgb, rgb2hed

    rgb = he_tile()[:40, :50].astype(np.float64) / 255
    scale, shift = np.array([1.05, 0.96, 1.0]), np.array([0.02, -0.01, 0.03])
    expected = hed2rgb(rgb2hed(rgb) * scale + shift)
    ours = hed_jitter(torch.from_numpy(rgb).permute(2, 0, 1).float(), torch.tensor(scale), torch.tensor(shift))
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), expected, atol=2e-5)


def test_augment_draws_per_image_and_turns_lazy_grids_only_when_square():
    torch.manual_seed(0)
    augment = Augment(AugmentConfig(flip=True, rotate90=True, hed=0.05), patch_size=P)
    wide = LazyImage(ArraySource(np.zeros((3, 2 * P, 5 * P), np.uint8)))
    square = LazyImage(ArraySource(np.zeros((3, 5 * P - 3, 5 * P), np.uint8)))  # a square 5 x 5 grid
    wide_turns = {augment(wide).orientation.turns for _ in range(100)}
    square_turns = {augment(square).orientation.turns for _ in range(100)}
    assert wide_turns == {0, 2} and square_turns == {0, 1, 2, 3}
    draws = [augment(wide).colour for _ in range(3)]
    assert all(0.95 <= float(s.min()) and float(s.max()) <= 1.05 for s in (d.hed_scale for d in draws))
    assert not torch.equal(draws[0].hed_scale, draws[1].hed_scale)  # drawn anew for every image and step
    assert wide.orientation is None and wide.colour is None  # the dataset's item is left as it was


def test_train_on_slides_with_flips_turns_and_stain_jitter_evaluates_unaugmented(tmp_path, capsys):
    import yaml

    from patchgd.cli import main

    write_slide_dataset(tmp_path, {"train": 4, "val": 2}, height_step=32)  # square grids among them: quarter turns
    cfg = {"output_dir": str(tmp_path / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 64, "latent_dim": 8, "head_width": 8},
           "data": {"root": str(tmp_path), "num_classes": 2, "pad_value": 255, "tissue_fraction": 0.5, "level": 0},
           "augment": {"flip": True, "rotate90": True, "hed": 0.05, "brightness": 0.1},
           "train": {"epochs": 1, "batch_size": 2, "device": "cpu"}, "patchgd": {"sampling": 0.5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    capsys.readouterr()
    # The run's validation is the unaugmented evaluation of the checkpoint it saved.
    assert main(["evaluate", str(tmp_path / "run" / "last.pt"), "--data", str(tmp_path), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["loss"] == pytest.approx(trained["loss"], rel=1e-6)
