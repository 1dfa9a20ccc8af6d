"""Heatmaps and Z pictures: exact values on a hand-built model, evidence on the deciding cell of a trained one."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.decomposition import PCA

import patchgd
from patchgd.explain import explain, z_to_rgb
from patchgd.heatmaps import save_heatmap, save_z_image
from patchgd.model.heads import ConvHead

from helpers import TinyEncoder

P = 8


class MeanIntensity(nn.Module):
    """Backbone whose one latent feature is a patch's (or chunk's) mean value."""

    def forward(self, x):
        return x.flatten(1).mean(dim=1, keepdim=True)


class CellWeightedHead(nn.Module):
    """Class 1's logit is ``sum_c w_c * Z_c``, class 0's its negative: every cell's part is known by hand."""

    def __init__(self, weights):
        super().__init__()
        self.weights = nn.Parameter(torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, z):
        evidence = (z[:, 0] * self.weights).flatten(1).sum(dim=1)
        return torch.stack([-evidence, evidence], dim=1)


@pytest.mark.parametrize("pad_value", [0.0, 0.5])
@pytest.mark.parametrize("method", ["occlusion", "grad"])
def test_scores_equal_the_hand_computed_part_of_each_cell(method, pad_value):
    torch.manual_seed(0)
    weights = torch.randn(3, 4)
    model = patchgd.PatchGDClassifier(MeanIntensity(), 2, P, latent_dim=1, head=CellWeightedHead(weights),
                                      pad_value=pad_value)
    images = torch.rand(2, 1, 3 * P, 4 * P)
    means = images.view(2, 3, P, 4, P).mean(dim=(2, 4))  # the patches' means, cut by hand
    logit1 = (means * weights).sum(dim=(1, 2))
    target = (logit1 > 0).long()
    sign = torch.where(target == 1, 1.0, -1.0)[:, None, None]
    # Occluding cell c puts the blank patch's code (its mean, the padding value) in place of Z_c, so the
    # logit drops by w_c * (mean_c - pad_value); gradient x activation of a linear head is w_c * mean_c.
    baseline = pad_value if method == "occlusion" else 0.0
    expected = sign * weights * (means - baseline)
    evidence = explain(model, images, method)
    assert evidence.target.tolist() == target.tolist()
    torch.testing.assert_close(evidence.scores, expected, rtol=1e-5, atol=1e-6)


def test_sequences_are_explained_per_chunk():
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    model = patchgd.PatchGDClassifier(MeanIntensity(), 2, P, latent_dim=1, head=CellWeightedHead(weights))
    sequences = torch.rand(1, 3, 5 * P)
    means = sequences.view(1, 3, 5, P).mean(dim=(1, 3))
    evidence = explain(model, sequences, target=torch.tensor([1]))
    torch.testing.assert_close(evidence.scores, weights * means, rtol=1e-5, atol=1e-6)


def bright_square_images(n, generator):
    """16 x 16 cells of faint noise; class 1 images hold one bright 8 px square at a random cell."""
    images = torch.rand(n, 1, 4 * P, 4 * P, generator=generator) * 0.3
    labels = torch.arange(n) % 2
    cells = torch.randint(0, 16, (n,), generator=generator)
    for i in range(n):
        if labels[i]:
            r, c = divmod(int(cells[i]), 4)
            images[i, 0, r * P:(r + 1) * P, c * P:(c + 1) * P] = 1.0
    return images, labels, cells


def test_occlusion_evidence_lands_on_the_cell_that_decides_a_trained_model():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = patchgd.PatchGDClassifier(TinyEncoder(in_chans=1, latent_dim=8), 2, P, latent_dim=8,
                                      head=ConvHead(8, 2, width=16, dropout=0.0))
    trainer = patchgd.PatchGD(model, torch.optim.Adam(model.parameters(), lr=3e-3), sampling=0.25,
                              generator=generator)
    for _ in range(60):
        trainer.step(*bright_square_images(16, generator)[:2])
    images, labels, cells = bright_square_images(40, generator)
    model.eval()
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() >= 0.9  # it learnt the task
    positives = labels == 1
    evidence = explain(model, images[positives], target=torch.ones(int(positives.sum()), dtype=torch.long))
    top = evidence.scores.flatten(1).argmax(dim=1)
    assert (top == cells[positives]).float().mean() >= 0.9


def test_z_picture_is_the_first_three_principal_components():
    torch.manual_seed(0)
    z = torch.randn(16, 5, 6) * torch.linspace(3, 0.1, 16)[:, None, None]
    rgb = z_to_rgb(z)
    reference = PCA(n_components=3).fit_transform(z.flatten(1).T.double().numpy())
    for k in range(3):
        channel = rgb[..., k].ravel()
        scaled = (reference[:, k] - reference[:, k].min()) / np.ptp(reference[:, k])
        # A principal component's sign is arbitrary: either orientation of the stretched axis is right.
        assert min(np.abs(channel - scaled).max(), np.abs(channel - (1 - scaled)).max()) < 1e-9
    assert z_to_rgb(torch.ones(4, 2, 3)).tolist() == np.full((2, 3, 3), 0.5).tolist()  # no variance: grey


def test_heatmap_and_z_files(tmp_path):
    scores = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    paths = save_heatmap(tmp_path, "img", torch.rand(3, 2 * P, 3 * P), scores, P, "class 1")
    assert [p.name for p in paths] == ["img_heatmap.png", "img_heatmap.npy", "img_heatmap.csv"]
    assert np.load(paths[1]).tolist() == scores.tolist()
    rows = paths[2].read_text().splitlines()
    assert rows[0] == "row,col,score" and rows[5] == "1,1,3" and len(rows) == 7
    z_path = save_z_image(tmp_path, "img", torch.randn(8, 2, 3))
    from PIL import Image

    with Image.open(z_path) as picture:
        assert picture.size == (3 * 86, 2 * 86) and picture.mode == "RGB"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_cli_heatmaps_in_training_and_predict(tmp_path, mnist_dir, capsys):
    from patchgd.cli import PACKAGED_CONFIGS, main

    data = tmp_path / "data"
    assert main(["generate", "ultramnist", str(data), "--train", "8", "--val", "4", "--image-size", "96",
                 "--digits", str(mnist_dir)]) == 0
    # The demo's config with the paper's conv head and 32 px patches: a 3 x 3 grid of these 96 px images.
    common = ["--config", str(PACKAGED_CONFIGS / "demo.yaml"), "--set", f"data.root={data}", "--set",
              "model.latent_dim=8", "--set", "model.head_width=8", "--set", "train.epochs=1", "--set",
              "train.batch_size=4", "--set", "model.patch_size=32", "--set", "model.head=conv"]
    run = tmp_path / "run"
    assert main(["train", *common, "--set", f"output_dir={run}", "--set", "train.heatmap_every=1",
                 "--set", "train.heatmap_images=2"]) == 0
    labels = [line.split(",")[1] for line in (data / "val.csv").read_text().splitlines()[1:]]
    written = sorted(p.name for p in (run / "heatmaps" / "epoch001").iterdir())
    assert written == sorted(f"val{i:04d}_label{labels[i]}_{suffix}" for i in (0, 3)  # the first and the last
                             for suffix in ("heatmap.csv", "heatmap.npy", "heatmap.png", "z.png"))

    image = data / "val" / "val_000001.png"
    capsys.readouterr()
    for method in ("occlusion", "grad"):
        out = tmp_path / method
        assert main(["predict", str(run / "last.pt"), str(image), "--heatmap", str(out), "--heatmap-method", method,
                     "--z-image", str(out), "--json"]) == 0
        prediction = json.loads(capsys.readouterr().out)[0]
        scores = np.load(out / "val_000001_heatmap.npy")
        assert scores.shape == (3, 3) and np.isfinite(scores).all()
        assert (out / "val_000001_heatmap.png").stat().st_size > 0 and (out / "val_000001_z.png").is_file()
    assert prediction["class"] == max(range(10), key=prediction["probabilities"].__getitem__)

    gd_run = tmp_path / "gd"
    assert main(["train", *common, "--set", f"output_dir={gd_run}", "--set", "method=gd"]) == 0
    capsys.readouterr()
    assert main(["predict", str(gd_run / "last.pt"), str(image), "--heatmap", str(tmp_path / "gd-maps")]) == 2
    assert "explain PatchGD's latent grid Z" in capsys.readouterr().err
    assert not (tmp_path / "gd-maps").exists()


def test_heatmap_drawn_on_a_thumbnail_of_a_larger_image(tmp_path):
    import matplotlib.image

    scores = torch.zeros(2, 4)
    scores[1, 3] = 1.0  # the bottom-right cell of a 2 x 4 grid of 8 px cells over a 16 x 32 px image
    thumbnail = torch.zeros(1, 4, 8)  # the same image at a quarter of its size

    def red_box(**options):
        picture = matplotlib.image.imread(save_heatmap(tmp_path, "slide", thumbnail, scores, P, "", **options)[0])
        picture = picture[:, : round(picture.shape[1] * 0.83)]  # the image, left of the colour bar
        red = picture[..., 0] > picture[..., 1] + 0.15
        dark = picture[..., :3].max(axis=2) < 0.2  # the black thumbnail, under see-through zero evidence
        rows, cols = np.nonzero(red | dark)
        image = rows.min(), rows.max(), cols.min(), cols.max()
        rows, cols = np.nonzero(red)
        return image, (rows.min(), rows.max(), cols.min(), cols.max()) if rows.size else None

    image, cell = red_box(image_width=4 * P)
    height, width = image[1] - image[0] + 1, image[3] - image[2] + 1
    # The cell is the lower half of the rightmost quarter of the drawn image.
    assert cell[0] - image[0] == pytest.approx(height / 2, abs=3) and cell[1] == pytest.approx(image[1], abs=2)
    assert cell[2] - image[2] == pytest.approx(width * 3 / 4, abs=3) and cell[3] == pytest.approx(image[3], abs=2)
    assert red_box()[1] is None  # taken as the image itself, the grid would lie beyond the thumbnail


def test_slides_heatmaps_on_thumbnails_and_background_cells_hold_no_evidence(tmp_path, capsys):
    """Pyramidal TIFFs of real tissue on glass, tissue mask on, images of two sizes (a padded batch)."""
    import yaml

    from patchgd.cli import main
    from patchgd.data.datasets import ImageCSVDataset
    from slide_files import write_slide_dataset

    write_slide_dataset(tmp_path, {"train": 2, "val": 2}, height_step=64)
    cfg = {"output_dir": str(tmp_path / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 64, "latent_dim": 8, "head_width": 8},
           "data": {"root": str(tmp_path), "num_classes": 2, "pad_value": 255, "tissue_fraction": 0.5},
           "train": {"epochs": 1, "batch_size": 2, "device": "cpu", "heatmap_every": 1, "heatmap_images": 2},
           "patchgd": {"sampling": 0.5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    maps = tmp_path / "run" / "heatmaps" / "epoch001"
    # Each slide's scores cover its own grid (4 x 5 and 5 x 5 cells of 64 px), not the padded batch grid.
    assert np.load(maps / "val0000_label0_heatmap.npy").shape == (4, 5)
    assert np.load(maps / "val0001_label1_heatmap.npy").shape == (5, 5)

    out = tmp_path / "maps"
    assert main(["predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / "val" / "s1.tif"),
                 "--heatmap", str(out), "--z-image", str(out)]) == 0
    scores = np.load(out / "s1_heatmap.npy")
    mask = ImageCSVDataset(tmp_path / "val.csv", in_chans=3, patch_size=64, tissue_fraction=0.5)[1][0].tissue
    assert scores.shape == tuple(mask.shape) and 0 < mask.sum() < mask.numel()
    # A background cell already holds the background code: occluding it with that code changes nothing.
    assert (scores[~mask.numpy()] == 0).all()
    assert (out / "s1_heatmap.png").is_file() and (out / "s1_z.png").is_file()


def test_predict_heatmap_writes_qupath_geojson_in_level0_coordinates(tmp_path, capsys):
    """A slide read at level 1 (downsample 2): every tissue cell is one tile whose corners are the cell's
    at level 1, clipped to the image, times 2; its measurements are the heatmap's evidence."""
    import json

    import yaml

    from patchgd.cli import main
    from patchgd.data.datasets import load_image
    from slide_files import write_slide_dataset

    write_slide_dataset(tmp_path, {"train": 2, "val": 2}, height_step=64)  # level 1 of val/s1: 160 x 160 px
    cfg = {"output_dir": str(tmp_path / "run"),
           "model": {"backbone": "test_resnet", "patch_size": 48, "latent_dim": 8, "head_width": 8},
           "data": {"root": str(tmp_path), "num_classes": 2, "pad_value": 255, "tissue_fraction": 0.3, "level": 1,
                    "classes": ["benign", "tumour"]},
           "train": {"epochs": 1, "batch_size": 2, "device": "cpu"}, "patchgd": {"sampling": 0.5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "train.csv").write_text("image_id,label\ns0,benign\ns1,tumour\n")
    (tmp_path / "val.csv").write_text("image_id,label\ns0,benign\ns1,tumour\n")
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    out = tmp_path / "maps"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / "val" / "s1.tif"), "--heatmap",
                 str(out), "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    collection = json.loads((out / "s1.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    slide = load_image(tmp_path / "val" / "s1.tif", 3, level=1, patch_size=48, tissue_fraction=0.3)
    height, width = slide.source.height, slide.source.width
    assert (height, width) == (160, 160) and slide.source.downsample == 2
    scores = np.load(out / "s1_heatmap.npy")
    tissue = slide.tissue.numpy()
    assert scores.shape == tissue.shape == (4, 4) and 0 < tissue.sum() < tissue.size
    assert len(collection["features"]) == tissue.sum()
    seen = set()
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["properties"]["objectType"] == "tile"
        r, c = map(int, feature["properties"]["name"].removeprefix("cell ").split(","))
        assert tissue[r, c]
        seen.add((r, c))
        x0, y0, x1, y1 = c * 48, r * 48, min((c + 1) * 48, width), min((r + 1) * 48, height)
        ring = [[2 * x, 2 * y] for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]]
        assert feature["geometry"] == {"type": "Polygon", "coordinates": [ring]}
        measurements = feature["properties"]["measurements"]
        assert measurements["evidence"] == pytest.approx(float(scores[r, c]), abs=1e-5)
        assert measurements[f"evidence: {prediction['class_name']}"] == measurements["evidence"]
        assert set(measurements) == {"evidence", "evidence: benign", "evidence: tumour"}
    assert len(seen) == tissue.sum()
    assert collection["patchgd"]["class"] == prediction["class_name"] and collection["patchgd"]["downsample"] == 2
    assert collection["patchgd"]["probabilities"][prediction["class_name"]] == pytest.approx(
        max(prediction["probabilities"]), abs=1e-5)
