"""A newcomer's path: a folder of class folders, a short config, train, evaluate, predict; and the run's
logs, TensorBoard events, augmentation, balanced sampling, early stopping and intensity options."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

import patchgd.data.errors
import patchgd.heatmaps
import patchgd.engine.data
import patchgd.engine.loop
import patchgd.engine.trainer
from patchgd.checkpoint import load_checkpoint
from patchgd.cli import main
from patchgd.config import ConfigError, config_from_dict, load_config
from patchgd.data.datasets import ImageFolderDataset
from patchgd.runlog import Progress

CLASSES = {"benign": (40, 200, 90), "malignant": (160, 40, 140)}  # H&E-ish colours, one per class


@pytest.fixture
def folders(tmp_path) -> Path:
    """``images/<class>/*.png``: 6 RGB images per class, 48 and 64 px alternating."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(6):
            size = 48 if i % 2 else 64
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    return root


def six_line_config(tmp_path, root, extra: str = "") -> Path:
    """The short config of the README's "Train on your own images" section; batches mix the two image sizes."""
    text = (f"data:\n  root: {root}\nmodel: {{backbone: test_resnet, patch_size: 16, latent_dim: 8, head_width: 8}}\n"
            f"train: {{epochs: 2, batch_size: 4, device: cpu}}\noutput_dir: {tmp_path / 'run'}\n"
            "patchgd: {sampling: 0.5}\n")
    assert len(text.splitlines()) == 6
    path = tmp_path / "config.yaml"
    path.write_text(text + extra)
    return path


def test_class_folders_of_two_sizes_train_and_predict_names(tmp_path, folders, capsys, monkeypatch):
    assert main(["train", "--config", str(six_line_config(tmp_path, folders))]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["num_classes"] == 2 and saved["data"]["classes"] == ["benign", "malignant"]
    rows = list(csv.DictReader((run / "split.csv").open()))
    val = [r for r in rows if r["split"] == "val"]
    # 20% of 12 stratified: 3 images held out, from both classes; every image listed once
    assert len(rows) == 12 and len(val) == 3 and {r["label"] for r in val} == {"benign", "malignant"}
    assert sorted(r["image"] for r in rows) == sorted(p.relative_to(folders).as_posix() for p in folders.rglob("*.png"))
    log = (run / "train.log").read_text()
    assert "benign: 5 train / 1 val" in log or "benign: 4 train / 2 val" in log
    assert "epoch 2/2" in log and "tensor peak" in log and "process peak RSS" in log
    state = load_checkpoint(run / "best.pt")
    assert state["config"]["data"]["classes"] == ["benign", "malignant"]  # plain lists in the checkpoint
    evaluated = json.loads((run / "eval.json").read_text())  # last.pt's epoch, and which one best.pt holds
    assert (evaluated["epoch"], evaluated["checkpoint"]) == (2, "last.pt")
    assert evaluated["best_epoch"] == state["epoch"] == state["best_epoch"]
    capsys.readouterr()

    images = [folders / "benign" / "benign0.png", folders / "malignant" / "malignant1.png"]
    assert main(["predict", str(run / "best.pt"), *map(str, images)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    # progress over the patches of each image (more than one backbone call: 4 x 4 cells, one row a call)
    assert f"{images[0]}: 16/16 patch" in captured.err and f"{images[1]}: 9/9 patch" in captured.err
    for line, image in zip(lines, images):
        name = line.split(": ", 1)[1].split(" ")[0]
        assert line.startswith(str(image)) and name in CLASSES and "benign" in line and "malignant" in line

    # The heatmap's title names the class as predict does (issue 30 item 12).
    titles = []
    drawn = patchgd.heatmaps.save_heatmap
    monkeypatch.setattr(patchgd.heatmaps, "save_heatmap", lambda *a, **k: titles.append(a[5]) or drawn(*a, **k))
    assert main(["predict", str(run / "best.pt"), str(images[0]), "--heatmap", str(tmp_path / "maps"), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]
    assert titles[0].startswith(f"benign0: {predicted['class_name']} (p=")

    # An image smaller than one patch is refused, as training refuses it (issue 30 item 11).
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((10, 40, 3), np.uint8)).save(tiny)
    assert main(["predict", str(run / "best.pt"), str(tiny)]) == 2
    assert f"model.patch_size=16 is larger than the 10x40 images of {tiny}" in capsys.readouterr().err

    # The README's evaluate on the run's own folder scores the 3 images it held out, as the run scored them.
    assert main(["evaluate", str(run / "best.pt"), "--data", str(folders), "--batch-size", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("scored 3 images: the run's validation set") and "precision" in captured.out
    assert captured.out.count("benign") == 2 and captured.out.count("malignant") == 2  # per-class, confusion rows
    assert "warning" not in captured.err
    assert main(["evaluate", str(run / "last.pt"), "--data", str(folders), "--json"]) == 0  # eval.json's epoch
    scored = json.loads(capsys.readouterr().out)
    assert scored["scored"]["images"] == 3 and scored["scored"]["training_images"] == 0
    assert scored["confusion"] == json.loads((run / "eval.json").read_text())["confusion"]
    # --all: every image, and a warning that 9 of them trained the model
    assert main(["evaluate", str(run / "best.pt"), "--data", str(folders), "--all"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"scored 12 images: every image of {folders}")
    assert "warning: 9 of the 12 images scored trained this model" in captured.err


def test_num_classes_that_disagrees_with_the_labels_is_an_error(tmp_path, folders, capsys):
    config = six_line_config(tmp_path, folders)
    assert main(["train", "--config", str(config), "--set", "data.num_classes=3"]) == 2
    err = capsys.readouterr().err
    assert "data.num_classes=3 but the labels of" in err and "name 2 classes ['benign', 'malignant']" in err


def test_a_float_tiff_up_to_4000_is_refused_or_read_with_the_chosen_range(tmp_path, capsys):
    root = tmp_path / "micro"
    for name, scale in (("dim", 1000.0), ("bright", 4000.0)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            tifffile.imwrite(root / name / f"{name}{i}.tif", np.full((32, 32), scale * (i + 1) / 3, np.float32))
    config = six_line_config(tmp_path, root)
    overrides = ["--set", "model.in_chans=1", "--set", "train.epochs=1", "--set", "data.val_fraction=0.34"]
    assert main(["train", "--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "bright" in err and ".tif: float pixel values range from" in err and "expects [0, 1]" in err
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "stopped: DataError: " in (tmp_path / "run" / "train.log").read_text()  # the log says why

    assert main(["stats", "--config", str(config), *overrides, "--set", "data.intensity=range",
                 "--set", "data.intensity_range=[0, 4000]"]) == 0
    stats = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_dict({"data": {"root": str(root), "val_fraction": 0.34}, "model": {"in_chans": 1}})
    train_set = patchgd.engine.data.build_datasets(cfg)[0]
    values = [tifffile.imread(p).mean() / 4000 for p in train_set.paths]  # constant images: one value each
    assert stats["mean"][0] == pytest.approx(np.mean(values), abs=1e-5)

    assert main(["train", "--config", str(config), *overrides, "--set", "data.intensity=range",
                 "--set", "data.intensity_range=[0, 4000]"]) == 0


def csv_data(tmp_path, header: str, label) -> Path:
    """``csvdata/train.csv`` listing 8 grey 32 px images ``s0..s7`` of ``csvdata/train/``, labelled ``label(i)``."""
    root = tmp_path / "csvdata"
    (root / "train").mkdir(parents=True)
    rows = [header]
    for i in range(8):
        Image.fromarray(np.full((32, 32), 30 * i, np.uint8)).save(root / "train" / f"s{i}.png")
        rows.append(f"s{i},{label(i)}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_csv_with_class_names_and_custom_columns(tmp_path):
    root = csv_data(tmp_path, "file,diagnosis", lambda i: "noise" if i % 2 else "signal")
    cfg = config_from_dict({"data": {"root": str(root), "id_column": "file", "label_column": "diagnosis",
                                     "val_fraction": 0.5}, "model": {"in_chans": 1}})
    train_set, val_set = patchgd.engine.data.build_datasets(cfg)
    resolved = patchgd.engine.data.resolve_classes(cfg, train_set, val_set)
    assert (resolved.data.num_classes, resolved.data.classes) == (2, ["noise", "signal"])
    assert Counter(val_set.labels) == {0: 2, 1: 2} and len(train_set) == 4


def test_data_classes_name_integer_labels(tmp_path):
    """``data.classes: [sparse, dense]`` names the integer labels 0 and 1 of a CSV (item 4 of issue 30)."""
    root = csv_data(tmp_path, "image_id,label", lambda i: i % 2)
    cfg = config_from_dict({"data": {"root": str(root), "classes": ["sparse", "dense"], "val_fraction": 0.5},
                            "model": {"in_chans": 1}})
    train_set, val_set = patchgd.engine.data.build_datasets(cfg)
    resolved = patchgd.engine.data.resolve_classes(cfg, train_set, val_set)
    assert (resolved.data.num_classes, resolved.data.classes) == (2, ["sparse", "dense"])
    labels = dict(zip((p.stem for p in train_set.paths + val_set.paths), train_set.labels + val_set.labels))
    assert labels == {f"s{i}": i % 2 for i in range(8)}
    # an integer beyond the named classes is an error naming the line; names still work as names
    (root / "train.csv").write_text("image_id,label\ns0,0\ns1,2\n")
    with pytest.raises(patchgd.data.errors.DataError, match="line 3: label 2 of image 's1' is out of range; "
                                                             r"expected \[0, 2\)"):
        patchgd.engine.data.build_datasets(cfg)


def test_the_classes_order_keeps_the_held_out_images(tmp_path, folders):
    """The same seed holds out the same images whatever order ``data.classes`` gives the classes."""
    held_out = {}
    for classes in (None, ["malignant", "benign"]):
        cfg = config_from_dict({"data": {"root": str(folders), "classes": classes}, "train": {"seed": 3}})
        held_out[str(classes)] = sorted(map(str, patchgd.engine.data.build_datasets(cfg)[1].paths))
    assert held_out["None"] == held_out["['malignant', 'benign']"]


def test_strip_tiffs_in_class_folders_are_images_not_slides_of_unknown_resolution(tmp_path):
    """96 px strip TIFFs (no tiles, no resolution tags) are decoded whole like PNGs: nothing to say about
    microns per pixel, which is a slide's (issue 30 item 9)."""
    rng = np.random.default_rng(0)
    for name in ("plain", "spotted"):
        (tmp_path / name).mkdir()
        for i in range(3):
            tifffile.imwrite(tmp_path / name / f"{name}{i}.tif", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    cfg = config_from_dict({"data": {"root": str(tmp_path), "val_fraction": 0.34}, "model": {"in_chans": 3}})
    train_set, val_set = patchgd.engine.data.build_datasets(cfg)
    cfg = patchgd.engine.data.resolve_classes(cfg, train_set, val_set)
    assert "microns per pixel" not in patchgd.engine.data.describe_data(cfg, train_set, val_set)
    assert len(train_set) + len(val_set) == 6


def test_stats_reads_rgb_images_as_rgb_and_grey_as_grey(tmp_path, folders, capsys):
    pixels = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3) for p in sorted(folders.rglob("*.png"))]) / 255
    assert main(["stats", str(folders)]) == 0
    stats = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), atol=1e-6)
    grey = tmp_path / "grey" / "a"
    grey.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(grey / "x.png")
    assert main(["stats", str(tmp_path / "grey")]) == 0
    assert json.loads(capsys.readouterr().out)["mean"] == [0.2]


def test_progress_off_a_terminal_is_plain_lines():
    lines = []
    progress = Progress(range(25), "epoch 1", every=10, write=lines.append, terminal=False, unit="batch")
    for i in progress:
        progress.set_info(loss=f"{i:.1f}")
    assert [line.split("  (")[0] for line in lines] == [
        "epoch 1: 10/25 batch  loss 9.0", "epoch 1: 20/25 batch  loss 19.0", "epoch 1: 25/25 batch  loss 24.0"]
    assert not any("\r" in line for line in lines)


def test_tensorboard_event_files(tmp_path, folders):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(six_line_config(tmp_path, folders), ["train.tensorboard=true", "train.epochs=1",
                                                            "train.log_every=2"])
    patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"loss/train", "loss/val", "accuracy/val", "qwk/val", "lr", "memory/tensor_peak_bytes",
            "memory/process_peak_bytes", "loss/train_step"} <= set(tags)


def test_validation_heatmaps_reach_tensorboard(tmp_path, folders):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(six_line_config(tmp_path, folders), ["train.tensorboard=true", "train.epochs=1",
                                                            "train.heatmap_every=1", "train.heatmap_images=2"])
    patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    pngs = sorted((tmp_path / "run" / "heatmaps" / "epoch001").glob("*.png"))
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    images = EventAccumulator(str(events)).Reload().Tags()["images"]
    assert len(pngs) == 4 and sorted(images) == sorted(f"heatmaps/{png.stem}" for png in pngs)


def test_early_stopping_on_the_validation_accuracy(tmp_path, folders, monkeypatch):
    accuracies = iter([0.5, 0.6, 0.6, 0.55, 0.9])
    real = patchgd.engine.loop.evaluate

    def scripted(*args, **kwargs):
        results = real(*args, **kwargs)
        results["accuracy"] = next(accuracies)
        return results

    monkeypatch.setattr(patchgd.engine.trainer, "evaluate", scripted)
    cfg = load_config(six_line_config(tmp_path, folders), ["train.epochs=5", "train.patience=2"])
    summary = patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    # best at epoch 2; epochs 3 and 4 bring nothing better, so the run stops after epoch 4
    assert (summary["best_epoch"], summary["epochs"], summary["best_accuracy"]) == (2, 4, 0.6)
    assert [int(r["epoch"]) for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open())] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2


def test_augmentation_moves_whole_images_only():
    cfg = config_from_dict({"augment": {"flip": True, "rotate90": True}})
    transform = patchgd.engine.data.build_augmentation(cfg)
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    dihedral = [torch.rot90(x, k, (1, 2)) for x in (image, image.flip(2)) for k in range(4)]
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        out = transform(image)
        matches = [i for i, d in enumerate(dihedral) if torch.equal(out, d)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))
    wide = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    assert all(transform(wide).shape == wide.shape for _ in range(50))  # non-square: no quarter turns


def test_colour_jitter_needs_colour_images():
    with pytest.raises(ConfigError, match=r"model.in_chans=1: colour and stain jitter need colour images \(in_chans 3\)"):
        config_from_dict({"augment": {"hue": 0.05, "saturation": 0.1}, "model": {"in_chans": 1}})
    cfg = config_from_dict({"augment": {"hue": 0.05, "saturation": 0.1}, "model": {"in_chans": 3}})
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    out = patchgd.engine.data.build_augmentation(cfg)(image)
    assert out.shape == image.shape and not torch.equal(out, image) and 0 <= out.min() and out.max() <= 1


def test_balanced_sampler_draws_classes_equally(tmp_path):
    root = tmp_path / "imbalanced"
    for name, count in (("common", 18), ("rare", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / name / f"{i}.png")
    dataset = ImageFolderDataset(root)
    cfg = config_from_dict({"train": {"balanced_sampler": True, "batch_size": 10}})
    loader = patchgd.engine.data.build_train_loader(cfg, dataset, torch.Generator().manual_seed(0))
    labels = torch.cat([labels for _ in range(50) for _, labels in loader])
    assert len(labels) == 50 * 20 and abs(labels.float().mean().item() - 0.5) < 0.05
    cfg = config_from_dict({"train": {"balanced_sampler": False, "batch_size": 10}})
    plain = torch.cat([labels for _, labels in patchgd.engine.data.build_train_loader(cfg, dataset, torch.Generator())])
    assert plain.float().mean().item() == pytest.approx(0.1)


def test_learning_curves_mark_chance_and_best_epoch(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from patchgd.plots import plot_learning_curves

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,lr,train_loss,val_loss,val_accuracy,val_qwk\n1,0.001,1.0,1.1,0.3,0.1\n"
                       "2,0.0008,0.8,0.9,0.55,0.4\n3,0.0005,0.6,1.0,0.5,0.45\n")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_learning_curves(metrics, tmp_path / "curves.png", num_classes=4)
    assert (tmp_path / "curves.png").stat().st_size > 0
    loss_ax, score_ax, lr_ax = figures[0].axes
    lines = {line.get_label(): line for line in score_ax.get_lines()}
    assert list(lines["chance (1/4)"].get_ydata()) == [0.25, 0.25]
    assert list(lines["best epoch 2 (0.550)"].get_xdata()) == [2, 2]
    assert list(lines["kappa (QWK)"].get_ydata()) == [0.1, 0.4, 0.45]
    assert list(lr_ax.get_lines()[0].get_ydata()) == [0.001, 0.0008, 0.0005]


def test_threads_setting(tmp_path, folders):
    cfg = load_config(six_line_config(tmp_path, folders), ["train.epochs=1", "train.threads=1"])
    torch.set_num_threads(2)
    try:
        patchgd.engine.trainer.fit(cfg, log=lambda line: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_help_does_not_import_torch(capsys):
    import subprocess
    import sys

    code = ("import sys\nfrom patchgd.cli import build_parser\nbuild_parser()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
