"""The transformer head (and the attention-MIL head): any grid, padded cells ignored, positions seen; the DeiT recipes through the trainer,
the planner and the command line."""

import json

import pytest
import torch

from benchmarks.__main__ import main as bench
from patchgd.engine import build
from patchgd.checkpoint import load_checkpoint
from patchgd.cli import PACKAGED_CONFIGS, main
from patchgd.config import config_from_dict, load_config
from patchgd.model.heads import AttentionMILHead, ConvHead, TransformerHead
from patchgd.memory import PeakMemory
from patchgd.engine.plan import plan_budget


def make_head(**options):
    torch.manual_seed(0)
    return TransformerHead(12, 3, width=16, depth=2, heads=2, **options).eval()


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (7,)])
@pytest.mark.parametrize("kind", ["transformer", "attention"])
def test_any_grid_and_sequences(grid, kind):
    torch.manual_seed(0)
    head = (make_head() if kind == "transformer" else AttentionMILHead(12, 3, width=16)).train()
    z = torch.randn(2, 12, *grid, requires_grad=True)
    logits = head(z)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert z.grad.abs().sum() > 0 and all(p.grad is not None for p in head.parameters())


def test_padded_cells_are_ignored():
    head = make_head()
    small = [torch.randn(1, 12, 2, 3), torch.randn(1, 12, 4, 2)]
    padded = torch.zeros(2, 12, 4, 3)
    mask = torch.zeros(2, 1, 4, 3)
    padded[0, :, :2, :3], mask[0, :, :2, :3] = small[0][0], 1
    padded[1, :, :4, :2], mask[1, :, :4, :2] = small[1][0], 1
    padded[mask.expand_as(padded) == 0] = 100.0  # whatever the padding holds must not matter
    alone = torch.cat([head(z) for z in small])
    torch.testing.assert_close(head(padded, mask=mask), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(padded, mask=mask[:, 0].bool()), alone, rtol=1e-5, atol=1e-5)


def test_positions_are_seen():
    """Attention alone is blind to order; with the 2-D encodings, moving a cell changes the logits, and
    a cell's encoding depends on its row and column only."""
    head = make_head()
    z = torch.randn(1, 12, 3, 4)
    swapped = z.clone()
    swapped[:, :, 0, 0], swapped[:, :, 2, 3] = z[:, :, 2, 3], z[:, :, 0, 0]
    assert (head(z) - head(swapped)).abs().max() > 1e-3
    transposed = z.transpose(2, 3).contiguous()  # same cells, rows and columns exchanged
    assert (head(z) - head(transposed)).abs().max() > 1e-3


def test_recipes_build_deit_backbones_and_transformer_heads_that_train():
    for recipe in ("ultramnist_deit_tiny_transformer_patchgd.yaml", "panda_2048_deit_tiny_transformer_patchgd.yaml"):
        cfg = load_config(PACKAGED_CONFIGS / recipe, ["model.patch_size=32", "model.latent_dim=16"])
        model = build.build_model(cfg)
        assert isinstance(model.head, TransformerHead)
        assert type(model.backbone.features).__name__ == "VisionTransformer"
        assert model.backbone.features.patch_embed.img_size == (32, 32)  # built for the patch, not 224 px
        before = [p.detach().clone() for p in model.parameters()]
        trainer = build.build_method(cfg, model, build.build_optimizer(cfg, model))
        trainer.step(torch.randn(2, cfg.model.in_chans, 64, 64), torch.tensor([0, 1]))
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def transformer_config(budget="1GB", batch_size=4):
    return config_from_dict({
        "method": "patchgd",
        "data": {"num_classes": 10},  # the planner measures without data: the classes are given
        "model": {"backbone": "test_vit", "patch_size": 32, "latent_dim": 8, "in_chans": 1, "head": "transformer",
                  "head_width": 16, "head_depth": 1, "head_heads": 2},
        "train": {"batch_size": batch_size, "device": "cpu"},
        "patchgd": {"sampling": 0.25},
        "memory": {"budget": budget},
    })


def step_peak(cfg, image):
    torch.manual_seed(0)
    model = build.build_model(cfg)
    optimizer = build.build_optimizer(cfg, model)
    method = build.build_method(cfg, model, optimizer)
    images = torch.randint(256, (cfg.train.batch_size, *image), dtype=torch.uint8)  # as the loader yields
    labels = torch.randint(cfg.data.num_classes, (cfg.train.batch_size,))
    method.step(images, labels)
    with PeakMemory("cpu", baseline=(model, optimizer, images)) as meter:
        method.step(images, labels)
    return meter.peak_bytes


def test_planner_fits_a_transformer_head_run_into_a_budget():
    image = (1, 96, 96)
    peaks = {b: step_peak(transformer_config(batch_size=b), image) for b in (2, 3)}
    budget = (peaks[2] + peaks[3]) // 2
    plan = plan_budget(transformer_config(budget=str(budget)), image, "cpu")
    assert plan.batch_size == 2 and plan.peak_bytes == peaks[2] <= budget


def test_cli_trains_a_transformer_head(tmp_path, mnist_dir, capsys):
    data = tmp_path / "data"
    assert main(["generate", "ultramnist", str(data), "--train", "8", "--val", "4", "--image-size", "64",
                 "--digits", str(mnist_dir)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--set", f"data.root={data}", "--set", f"output_dir={run}", "--set", "model.backbone=test_vit",
                 "--set", "model.patch_size=32", "--set", "model.latent_dim=8", "--set", "model.in_chans=1",
                 "--set", "model.head=transformer", "--set", "model.head_width=16", "--set", "model.head_heads=2",
                 "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.device=cpu",
                 "--config", str(PACKAGED_CONFIGS / "demo.yaml")]) == 0
    assert "head" in load_checkpoint(run / "last.pt")["config"]["model"]
    capsys.readouterr()
    assert main(["predict", str(run / "last.pt"), str(next((data / "val").glob("*.png"))), "--json"]) == 0
    assert main(["train", "--config", str(PACKAGED_CONFIGS / "demo.yaml"), "--set", "model.head=mlp"]) == 2
    assert "model.head='mlp': no such head" in capsys.readouterr().err


def test_bench_heads_compares_both_heads_on_the_same_run(tmp_path, capsys):
    assert bench(["heads", "--backbone", "test_resnet", "--patch-size", "32", "--image-sizes", "64",
                 "--latent-dim", "8", "--head-width", "8", "--transformer-width", "16", "--transformer-heads", "2",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "transformer/conv" in capsys.readouterr().out
    row = json.loads((tmp_path / "heads.json").read_text())["results"]["sizes"][0]
    assert row["grid"] == [2, 2]
    expected = {"conv": ConvHead(8, 10, width=8), "transformer": TransformerHead(8, 10, width=16, depth=2, heads=2)}
    for head, module in expected.items():
        assert row[head]["head_parameters"] == sum(p.numel() for p in module.parameters())
        assert row[head]["peak_bytes"] > 0 and row[head]["step_s"] > 0 and 0 < row[head]["head_s"] < row[head]["step_s"]
    assert row["ratio_peak"] == row["transformer"]["peak_bytes"] / row["conv"]["peak_bytes"]
