"""The training path on images read in pieces: normalisation in the model, lazy grids over sources,
tissue masks, batches of mixed image sizes. Every check is against an independent computation: the same
pixels held in memory, a per-image run, or a backbone that records what it sees."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import patchgd
from patchgd.data.readers import ArraySource, open_source
from patchgd.data.lazy import LazyImage, SourceGrid
from patchgd.model.heads import ConvHead
from patchgd.methods import sample_schedule

from helpers import TinyEncoder
from slide_files import he_tile, write_pyramid_tiff, write_slide_dataset

P = 16


def make_model(seed=0, mean=None, std=None, **kwargs):
    torch.manual_seed(seed)
    return patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=3, patch_size=P, latent_dim=6,
                                     head=ConvHead(6, 3, width=8, dropout=0.2), mean=mean, std=std, **kwargs)


@pytest.fixture
def slide(tmp_path):
    """A lossless tiled pyramidal TIFF of real H&E pixels (100 x 120, not a multiple of P) and its level 0."""
    pixels = np.ascontiguousarray(he_tile()[:100, :120])
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, pixels, tile=32, levels=2, compression="zlib")
    return path, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def test_model_normalises_integer_pixels_by_their_range_then_mean_std():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    model = make_model(mean=mean, std=std).eval()
    patches = torch.randint(0, 256, (4, 3, P, P), dtype=torch.uint8)
    by_hand = (patches.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(patches), model.backbone(by_hand.float()))
        wide = patches.to(torch.int32) * 257  # the same pixels as uint16 would hold them, scaled by 65535
        torch.testing.assert_close(model.encode(wide.to(torch.uint16)), model.backbone(by_hand.float()))
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor(mean))
    # A checkpoint carries its statistics: a model built without them (a rebuild from the config alone) or
    # with others takes the saved ones, per channel, and encodes as the saved model did.
    for restored in (make_model(seed=1, mean=None, std=None), make_model(seed=1, mean=[0, 0, 0], std=[1, 1, 1])):
        restored.load_state_dict(state)
        assert torch.equal(restored.normalize.std.flatten(), torch.tensor(std))
        with torch.no_grad():
            torch.testing.assert_close(restored.eval().encode(patches), model.encode(patches))
    state["normalize.mean"] = torch.zeros(2, 1, 1)  # statistics of another channel count are refused
    with pytest.raises(RuntimeError, match="normalize.mean"):
        make_model(seed=1, mean=None, std=None).load_state_dict(state)


def test_z_of_a_slide_equals_z_of_its_pixels_in_memory(slide):
    path, pixels = slide
    model = make_model(mean=[0.6], std=[0.2]).eval()
    source = open_source(path, in_chans=3)
    assert source.tiled and (source.height, source.width) == (100, 120)
    in_memory = model.fill_z(pixels[None])
    assert torch.equal(model.fill_z([LazyImage(source)]), in_memory)
    # Read ahead in two worker processes, chunk by chunk: the same Z.
    model.fill_workers = 2
    assert torch.equal(model.fill_z([LazyImage(open_source(path, in_chans=3))], batch_size=7), in_memory)


@pytest.mark.parametrize("explicit", [True, False])
def test_training_step_on_a_slide_equals_the_step_on_its_pixels(slide, explicit):
    path, pixels = slide
    m, n = math.ceil(100 / P), math.ceil(120 / P)
    runs = []
    for images in (pixels[None], [LazyImage(open_source(path, in_chans=3))]):
        model = make_model(mean=[0.5], std=[0.25])
        trainer = patchgd.PatchGD(model, torch.optim.Adam(model.parameters(), lr=1e-2), sampling=0.2,
                                  generator=torch.Generator().manual_seed(3))
        torch.manual_seed(5)  # dropout
        schedule = sample_schedule(1, m * n, 9, 3, torch.Generator().manual_seed(1)) if explicit else None
        stats = trainer.step(images, torch.tensor([2]), schedule=schedule)
        runs.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


class Recorder(nn.Module):
    """A backbone that encodes a constant patch by its value, and records every value it is given."""

    def __init__(self, latent_dim=4):
        super().__init__()
        self.latent_dim = latent_dim
        self.scale = nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, x):
        values = (x[:, 0, 0, 0] * 255).round().long()
        self.seen += values.tolist()
        return self.scale * x.mean(dim=(1, 2, 3))[:, None].expand(-1, self.latent_dim)


def cell_numbered_image(m, n, channels=3):
    """A uint8 image whose cell r, c is constant ``r * n + c + 1``: a backbone can tell which cell it saw."""
    values = torch.arange(1, m * n + 1, dtype=torch.uint8).view(m, n)
    return values.repeat_interleave(P, 0).repeat_interleave(P, 1).expand(channels, -1, -1).contiguous()


def test_background_cells_are_never_encoded_nor_sampled():
    m, n = 4, 5
    image = cell_numbered_image(m, n)
    tissue = torch.zeros(m, n, dtype=torch.bool)
    tissue[1:3, 1:4] = True  # 6 tissue cells
    tissue[0, 4] = True
    tissue_cells = {int(c) + 1 for c in tissue.flatten().nonzero()}
    backbone = Recorder()
    model = patchgd.PatchGDClassifier(backbone, num_classes=2, patch_size=P, latent_dim=4,
                                      head=ConvHead(4, 2, width=4, dropout=0.0))
    lazy = LazyImage(ArraySource(image.numpy()), tissue)
    z = model.fill_z([lazy])
    # The fill encodes each tissue cell once, and one blank (pad_value 0) patch for the background code.
    assert sorted(backbone.seen) == [0] + sorted(tissue_cells)
    z_cells = z[0, 0].flatten()
    for cell in range(m * n):
        expected = (cell + 1) / 255 if tissue.flatten()[cell] else 0.0
        assert z_cells[cell].item() == pytest.approx(expected)

    backbone.seen.clear()
    trainer = patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sampling=0.3, max_sampled=1.0,
                              generator=torch.Generator().manual_seed(0))
    stats = trainer.step([lazy], torch.tensor([1]))
    k = math.ceil(0.3 * 7)  # from the tissue cell count, not the 20 cells of the grid
    assert stats["patches_per_image"] == k and stats["inner_iterations"] == math.ceil(1 / 0.3)
    inner = backbone.seen[len(tissue_cells) + 1:]
    assert len(inner) == k * stats["inner_iterations"] and set(inner) <= tissue_cells
    with pytest.raises(ValueError, match="background"):
        trainer.step([lazy], torch.tensor([1]), schedule=[torch.tensor([0])])


def test_tissue_mask_with_every_cell_is_the_in_memory_path():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    model = make_model().eval()
    full = torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(model.fill_z([LazyImage(ArraySource(image.numpy()), full)]), model.fill_z(image[None]))


def test_mixed_sizes_give_each_image_its_own_grid_and_the_head_ignores_the_padding():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 64), (70, 30), (16, 16))]
    model = make_model(mean=[0.5], std=[0.3]).eval()
    grid = model.grid(images)
    assert (grid.rows, grid.cols) == (5, 4)
    z = model.fill_z(grid)
    for b, image in enumerate(images):
        own = model.fill_z(image[None])[0]
        m, n = own.shape[1:]
        torch.testing.assert_close(z[b, :, :m, :n], own)  # other chunks: equal up to float rounding
        assert not z[b, :, m:].any() and not z[b, :, :, n:].any()
    with torch.no_grad():
        batched = model(images)
        for b, image in enumerate(images):
            torch.testing.assert_close(batched[b], model(image[None])[0], rtol=1e-5, atol=1e-6)


def test_mixed_sizes_train_and_a_head_without_mask_is_a_clear_error():
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((32, 48), (48, 32))]
    model = make_model()
    trainer = patchgd.PatchGD(model, torch.optim.Adam(model.parameters()), sampling=0.5)
    assert math.isfinite(trainer.step(images, torch.tensor([0, 1]))["loss"])
    plain = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=3, patch_size=P, latent_dim=6,
                                      head=nn.Sequential(nn.Flatten(), nn.LazyLinear(3)))
    with pytest.raises(ValueError, match="takes no cell mask"):
        plain(images)


def test_conv_head_without_padding_is_unchanged():
    head = ConvHead(6, 3, width=8).eval()
    z = torch.randn(2, 6, 5, 4)
    assert torch.equal(head(z), head.fc(head.pool(head.features(z)).flatten(1)))


def test_source_grid_rejects_mixed_pixel_types():
    with pytest.raises(ValueError, match="share channels and pixel type"):
        SourceGrid([torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16)], P)


def test_train_evaluate_predict_on_a_folder_of_slides(tmp_path, capsys):
    """The whole path on pyramidal JPEG TIFFs of real tissue on white glass, tissue mask on (the default)."""
    import yaml

    from patchgd.cli import main
    from patchgd.data.datasets import ImageCSVDataset

    write_slide_dataset(tmp_path, {"train": 4, "val": 2}, height_step=32)  # sizes differ: mixed-size batches
    cfg = {"output_dir": str(tmp_path / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 64, "latent_dim": 8, "head_width": 8},
           "data": {"root": str(tmp_path), "num_classes": 2, "pad_value": 255, "tissue_fraction": 0.5,
                    "mean": [0.8], "std": [0.2]},
           "train": {"epochs": 1, "batch_size": 2, "device": "cpu"}, "patchgd": {"sampling": 0.5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))

    train = ImageCSVDataset(tmp_path / "train.csv", in_chans=3, patch_size=64, tissue_fraction=0.5)
    image = train[0][0]
    assert isinstance(image, LazyImage) and image.tissue.shape == (4, 5)
    assert 0 < image.tissue.sum() < 20  # the glass around the tissue is background

    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    checkpoint = tmp_path / "run" / "best.pt"
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["confusion"] is not None
    assert main(["predict", str(checkpoint), str(tmp_path / "val" / "s1.tif"), "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert prediction["class"] in (0, 1) and sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-5)
