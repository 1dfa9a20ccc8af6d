"""1-D PatchGD: sequences cut into chunks by the same grid and step code as images, held to a naive loop,
and the BasicMotions recipe on the real data set bundled with aeon."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import patchgd
from patchgd.cli import main
from patchgd.config import load_config
from patchgd.grid import PatchGrid
from patchgd.model.heads import ConvHead

P = 5  # chunk length of the faithfulness tests


class TinyEncoder1d(nn.Module):
    """A Conv1d chunk encoder without BatchNorm or dropout, so per-chunk and batched calls agree."""

    def __init__(self, in_chans=2, latent_dim=6):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_chans, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 7, 3, stride=2),
                                 nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(7, latent_dim))

    def forward(self, x):
        return self.net(x)


def test_grid_cuts_sequences_into_chunks_and_pads_the_end():
    sequences = torch.randn(2, 3, 23)
    grid = PatchGrid(sequences, P, pad_value=-7.0)
    assert (grid.rows, grid.cols, grid.shape, grid.num_cells) == (1, 5, (5,), 5)
    padded = torch.cat([sequences, torch.full((2, 3, 2), -7.0)], dim=2)
    expected = torch.stack([padded[b, :, i * P:(i + 1) * P] for b in range(2) for i in range(5)])
    assert torch.equal(grid.patch_range(0, 10), expected)
    assert torch.equal(grid.patches(torch.tensor([[4, 0], [1, 3]])), expected[[4, 0, 6, 8]])


def naive_algorithm1_1d(backbone, head, optimizer, sequences, labels, schedule, eps):
    """Algorithm 1 on sequences with per-chunk loops, written independently of the library."""
    b, c, length = sequences.shape
    n = math.ceil(length / P)
    padded = torch.zeros(b, c, n * P)
    padded[:, :, :length] = sequences
    s = head.features[0][0].in_channels
    backbone.train()
    head.train()
    z = torch.zeros(b, s, n)
    with torch.no_grad():
        for i in range(b):
            for cell in range(n):
                z[i, :, cell] = backbone(padded[i:i + 1, :, cell * P:(cell + 1) * P])[0]
    optimizer.zero_grad()
    per_image = [idx if idx.dim() == 2 else idx.unsqueeze(0).repeat(b, 1) for idx in schedule]
    for g in range(0, len(per_image), eps):
        group = per_image[g:g + eps]
        for idx in group:
            z_j = z.detach().clone()
            for i in range(b):
                for cell in idx[i].tolist():
                    z_j[i, :, cell] = backbone(padded[i:i + 1, :, cell * P:(cell + 1) * P])[0]
            (F.cross_entropy(head(z_j), labels) / len(group)).backward()
            z = z_j.detach()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("eps", [1, 2, 3])
@pytest.mark.parametrize("per_image", [False, True])
def test_1d_step_matches_naive_algorithm1(float64, eps, per_image):
    torch.manual_seed(0)
    ours = patchgd.PatchGDClassifier(TinyEncoder1d(), num_classes=3, patch_size=P, latent_dim=6,
                                     head=ConvHead(6, 3, width=8, dropout=0.2, dims=1))
    theirs = copy.deepcopy(ours)
    # SGD shows float64 rounding as it is (Adam lifts it to ~1e-7, see test_methods.py).
    trainer = patchgd.PatchGD(ours, torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), grad_accum_steps=eps)
    naive_optimizer = torch.optim.SGD(list(theirs.backbone.parameters()) + list(theirs.head.parameters()), lr=0.1,
                                      momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    zeta, k, cells = 3, 4, 13
    for batch_seed in (10, 11):
        torch.manual_seed(batch_seed)
        sequences, labels = torch.randn(2, 2, 63), torch.tensor([2, 0])  # 13 chunks, the last padded
        if per_image:
            schedule = [torch.stack([torch.randperm(cells, generator=generator)[:k] for _ in range(2)])
                        for _ in range(zeta)]
        else:
            schedule = [torch.randperm(cells, generator=generator)[:k] for _ in range(zeta)]
        torch.manual_seed(batch_seed)  # the head's dropout draws the same masks in both
        stats = trainer.step(sequences, labels, schedule=schedule)
        torch.manual_seed(batch_seed)
        naive_algorithm1_1d(theirs.backbone, theirs.head, naive_optimizer, sequences, labels, schedule, eps)
        assert stats["optimizer_steps"] == math.ceil(zeta / eps)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda detail, name=name: f"{name}: {detail}")


def test_basicmotions_recipe_learns_far_above_chance(tmp_path, capsys):
    pytest.importorskip("aeon")
    data = tmp_path / "basicmotions"
    assert main(["prepare", "aeon", "BasicMotions", str(data)]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["channels"], meta["length"], meta["train"], meta["val"]) == (6, 100, 40, 40)
    assert meta["classes"] == ["badminton", "running", "standing", "walking"]
    recipe = patchgd.cli.PACKAGED_CONFIGS / "basicmotions_conv1d_patchgd.yaml"
    run = tmp_path / "run"
    overrides = ["--set", f"data.root={data}", "--set", f"output_dir={run}", "--set", "train.epochs=6",
                 "--set", "train.heatmap_every=6", "--set", "train.heatmap_images=2"]
    assert main(["train", "--config", str(recipe), *overrides]) == 0
    assert load_config(run / "config.yaml").data.kind == "sequences"
    assert len(list((run / "heatmaps" / "epoch006").glob("*_heatmap.png"))) == 2
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt"), "--data", str(data), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert sum(map(sum, results["confusion"])) == 40
    assert results["accuracy"] >= 0.6  # chance is 0.25


def test_prepare_aeon_names_the_bundled_sets(tmp_path, capsys):
    pytest.importorskip("aeon")
    assert main(["prepare", "aeon", "NoSuchSet", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'NoSuchSet' is not a data set bundled with aeon" in err and "BasicMotions" in err
    assert not (tmp_path / "x").exists()
