"""The UltraMNIST benchmark runs end to end on its tiny --quick configuration, and PatchGD's backbone can
start from another run's backbone (model.init_backbone)."""

import json

import pytest
import torch

from benchmarks import ultramnist
from benchmarks.__main__ import main
from patchgd.config import load_config
from patchgd.memory import parse_size
from patchgd.methods import create_model
from patchgd.engine.build import init_backbone


def test_quick_benchmark_end_to_end(tmp_path):
    # The digits default to the shared MNIST beside the repository (scikit-learn's, with a warning, if absent).
    assert main(["ultramnist", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "ultramnist.json").read_text())
    results = record["results"]
    budgets = results["budgets_bytes"]
    assert budgets == {"loose": parse_size("64MB"), "tight": parse_size("16MB")}
    runs = {(r["budget"], r["name"]): r for r in results["runs"]}
    assert set(runs) == {(b, m) for b in ("loose", "tight") for m in ("gd", "gd-extended", "patchgd")}
    for r in results["runs"] + results["ablations"]:
        assert 1 <= r["batch_size"] <= ultramnist.QUICK["max_batch"]
        assert 0 < r["peak_memory_bytes"] <= budgets[r["budget"]]
        assert 0 <= r["final_accuracy"] <= r["best_accuracy"] <= 1
        assert len(r["val_accuracy_per_epoch"]) == ultramnist.QUICK["epochs"]
    ablations = {r["name"]: r for r in results["ablations"]}
    assert ablations["patchgd s=0.5 max=1"]["sampling"] == 0.5
    assert ablations["patchgd s=0.25 max=0.5"]["max_sampled"] == 0.5
    assert ablations["patchgd eps=1"]["grad_accum_steps"] == 1
    assert ablations["patchgd init from gd"]["init_backbone"].endswith("tight/gd/best.pt")
    assert (tmp_path / "ultramnist.md").read_text().count("| tight |") == 3 + len(ablations)
    assert (tmp_path / "ultramnist_curves.png").stat().st_size > 0


def test_auto_budgets_are_gd_peak_at_loose_batch_and_a_quarter():
    args = ultramnist.argparse.Namespace(budgets=["auto", "auto"], loose_batch=16)
    peaks = {1: 100, 2: 200, 4: 400, 8: 800, 16: 1600}
    assert ultramnist.choose_budgets(args, peaks) == (1632, 408)
    args.budgets = ["1KB", "auto"]
    assert ultramnist.choose_budgets(args, peaks) == (parse_size("1KB"), parse_size("1KB") // 4)


def test_init_backbone_maps_a_gd_checkpoint_into_patchgd(tmp_path):
    assert load_config(None, ["model.init_backbone=runs/gd/best.pt"]).model.init_backbone == "runs/gd/best.pt"
    torch.manual_seed(0)
    gd = create_model("gd", "test_resnet", 10, in_chans=1)
    torch.save({"model": gd.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    torch.manual_seed(1)
    patchgd = create_model("patchgd", "test_resnet", 10, patch_size=16, latent_dim=8, head_width=8, in_chans=1)
    head_before = {k: v.clone() for k, v in patchgd.head.state_dict().items()}
    loaded = init_backbone(patchgd, tmp_path / "best.pt")
    features = patchgd.backbone.features.state_dict()
    assert loaded == len(features)  # every feature tensor, and GD's classifier (fc) ignored
    for name, value in gd.backbone.state_dict().items():
        if name in features:
            assert torch.equal(features[name], value), name
        else:
            assert name.startswith(gd.backbone.default_cfg["classifier"]), name
    assert all(torch.equal(v, head_before[k]) for k, v in patchgd.head.state_dict().items())

    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no key matches"):
        init_backbone(patchgd, tmp_path / "other.pt")


def test_init_backbone_into_gd_keeps_its_own_classifier(tmp_path):
    # A cell classifier (11 classes) starts a GD model of another task (10 classes): features copied,
    # the target's classifier left as it was built.
    torch.manual_seed(0)
    source = create_model("gd", "test_resnet", 11, in_chans=1)
    torch.save({"model": source.state_dict()}, tmp_path / "cells.pt")
    torch.manual_seed(1)
    gd = create_model("gd", "test_resnet", 10, in_chans=1)
    classifier = gd.backbone.default_cfg["classifier"]
    before = {k: v.clone() for k, v in gd.backbone.state_dict().items()}
    loaded = init_backbone(gd, tmp_path / "cells.pt")
    after, expected = gd.backbone.state_dict(), source.backbone.state_dict()
    assert loaded == len([k for k in after if not k.startswith(classifier + ".")]) > 0
    for name, value in after.items():
        assert torch.equal(value, before[name] if name.startswith(classifier + ".") else expected[name]), name


def test_quick_study_end_to_end(tmp_path):
    # The 256 px study's code on its tiny --quick configuration (128 px images, 2 x 2 grid, one epoch).
    from benchmarks import ultramnist_study

    assert main(["ultramnist_study", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "study.json").read_text())["results"]
    budget, peaks = results["budget_bytes"], results["gd_full_res_peak_bytes_by_batch"]
    assert peaks["1"] <= budget < peaks["2"]  # full-resolution GD fits batch 1 only
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == list(ultramnist_study.ARMS)
    batch = runs["patchgd"]["batch_size"]
    full, low, init = runs["gd full-res accum"], runs["gd low-res"], runs["patchgd init low-res gd"]
    assert batch > 1 and full["batch_size"] == low["batch_size"] == init["batch_size"] == batch
    assert full["micro_batch_size"] == 1 and full["resolution"] == 128  # accumulated to PatchGD's batch
    sides, step = results["low_res_sides_tried"], ultramnist_study.QUICK["size_step"]
    assert low["resolution"] < 128 and sides[str(low["resolution"])] == batch
    assert sides.get(str(low["resolution"] + step), 0) < batch  # the next side up does not fit the batch
    assert init["init_backbone"].endswith("gd_low-res/best.pt") and runs["patchgd"]["init_backbone"] is None
    for r in runs.values():
        assert 0 < r["peak_memory_bytes"] <= budget
        assert len(r["val_accuracy_per_epoch"]) == ultramnist_study.QUICK["epochs"]
    assert (tmp_path / "study.md").read_text().count("\n| ") == 1 + len(runs)
    assert (tmp_path / "study_curves.png").stat().st_size > 0


def test_quick_study_on_megapixel_mnist_with_the_attention_head(tmp_path):
    from patchgd.config import load_config

    assert main(["ultramnist_study", "--quick", "--task", "megapixel-mnist", "--head", "attention",
                 "--grad-accum-steps", "1", "--pretrain-cells", "1", "--backbone-lr", "1e-4", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "study.json").read_text())["results"]
    assert results["task"] == "megapixel-mnist" and results["pretrain_cells_epochs"] == 1
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["format"] == "megapixel-mnist"
    runs = {r["name"]: r for r in results["runs"]}
    for name in ("patchgd", "patchgd init low-res gd"):
        used = load_config(tmp_path / "runs" / name.replace(" ", "_") / "config.yaml")
        assert used.model.head == "attention" and used.patchgd.grad_accum_steps == 1
        assert runs[name]["fits"]
    # Every arm but App. C's starts from the cell classifier, every arm moves its backbone at --backbone-lr.
    cells = str(tmp_path / "runs" / "pretrain_cells" / "best.pt")
    pretrain = load_config(tmp_path / "runs" / "pretrain_cells" / "config.yaml")
    assert pretrain.method == "gd" and pretrain.data.num_classes == 11 and pretrain.model.patch_size == 64
    for name in ("patchgd", "gd full-res accum", "gd low-res", "patchgd init low-res gd"):
        used = load_config(tmp_path / "runs" / name.replace(" ", "_") / "config.yaml")
        assert used.train.backbone_lr == 1e-4
        assert used.model.init_backbone == (str(tmp_path / "runs" / "gd_low-res" / "best.pt")
                                            if name == "patchgd init low-res gd" else cells), name
    report = (tmp_path / "study.md").read_text()
    assert report.startswith("# Megapixel MNIST study, 128 px") and "pretrained 1 epoch(s) on cells" in report


def test_pretrain_cells_needs_megapixel_mnist(tmp_path):
    with pytest.raises(SystemExit, match="megapixel-mnist"):
        main(["ultramnist_study", "--quick", "--pretrain-cells", "1", "--out", str(tmp_path)])


def test_study_reports_full_resolution_gd_that_does_not_fit_at_all(tmp_path):
    # 17 MB at 256 px: PatchGD fits batch 2 (about 16 MiB), full-resolution GD not even one image (19.8 MiB).
    argv = ["ultramnist_study", "--image-size", "256", "--train", "8", "--val", "4", "--epochs", "1",
            "--max-batch", "2", "--budget", "17MB", "--size-step", "32", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = {r["name"]: r for r in json.loads((tmp_path / "study.json").read_text())["results"]["runs"]}
    assert runs["patchgd"]["fits"] and runs["patchgd"]["batch_size"] == 2
    full = runs["gd full-res accum"]
    assert not full["fits"] and "(gd, micro-batch 1)" in full["reason"]
    assert runs["gd low-res"]["fits"] and runs["gd low-res"]["resolution"] < 256
    assert runs["patchgd init low-res gd"]["fits"]
    assert "| gd full-res accum | 256 | - | - | does not fit |" in (tmp_path / "study.md").read_text()
