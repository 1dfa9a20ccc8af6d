"""Results as pathology reports them: the monitor that picks best.pt, a held-out test set scored once by
best.pt, the predictions CSV and pictures, and cross-validation as one command (killed and resumed)."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import patchgd.engine.trainer
from patchgd.checkpoint import load_checkpoint
from patchgd.cli import main
from patchgd.config import config_from_dict
from patchgd.metrics import evaluate_predictions

CLASSES = ("benign", "tumour")


def write_images(folder, names_labels, rng):
    """Grey 48 px images; a tumour has a bright square, a benign image none."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, label in names_labels:
        pixels = rng.integers(20, 60, (48, 48), dtype=np.uint8)
        if label == "tumour":
            y, x = rng.integers(0, 32, 2)
            pixels[y:y + 16, x:x + 16] = 220
        Image.fromarray(pixels).save(folder / f"{name}.png")


def csv_data(root, splits: dict, folds: int | None = None, seed: int = 0):
    """``root/SPLIT.csv`` (``image_id,label[,case_id,kfold]``) and ``root/SPLIT/`` for ``{split: images}``;
    with ``folds``, the training CSV gets a kfold column over patients of two images each."""
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        rows = [(f"{split}{i:02d}", CLASSES[i % 2]) for i in range(count)]
        write_images(root / split, rows, rng)
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "label"] + (["case_id", "kfold"] if folds and split == "train" else []))
            for i, (name, label) in enumerate(rows):  # a patient: images i and i + 2 of a block of 4 (one class)
                extra = [f"case{i % 2}-{i // 4}", (i // 4) % folds] if folds and split == "train" else []
                writer.writerow([name, label, *extra])
    return root


def run_config(tmp_path, root, **train):
    return config_from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"root": str(root)},
        "model": {"backbone": "test_resnet", "patch_size": 16, "latent_dim": 8, "in_chans": 1, "head_width": 8},
        "train": {"epochs": 2, "batch_size": 4, "device": "cpu", "warmup_epochs": 0.5, **train},
        "patchgd": {"sampling": 0.5}})


# Two epochs' class-1 scores of the four validation images (benign, tumour, benign, tumour; val.csv's order):
# epoch 1 predicts 3 of 4 right but ranks one benign above a tumour (AUROC 3/4); epoch 2 predicts every
# image benign (accuracy 2/4) but ranks both tumours above both benign images (AUROC 1).
SCRIPTED = {1: [0.4, 0.7, 0.2, 0.3], 2: [0.41, 0.45, 0.40, 0.42]}


def scripted_evaluate(monkeypatch):
    real = patchgd.engine.trainer.evaluate

    def scripted(*args, epoch=0, **kwargs):
        results = real(*args, epoch=epoch, **kwargs)
        if kwargs.get("split", "val") == "val":
            p = torch.tensor(SCRIPTED[epoch], dtype=torch.float64)
            logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)
            results |= evaluate_predictions(logits, results["labels"], 2) | {"logits": logits}
        return results

    monkeypatch.setattr(patchgd.engine.trainer, "evaluate", scripted)


@pytest.mark.parametrize("monitor, best", [("accuracy", 1), ("auroc", 2)])
def test_the_monitor_picks_best_pt(tmp_path, monitor, best, monkeypatch):
    root = csv_data(tmp_path / "data", {"train": 8, "val": 4})
    scripted_evaluate(monkeypatch)
    summary = patchgd.engine.trainer.fit(run_config(tmp_path, root, monitor=monitor), log=lambda line: None)
    assert summary["best_epoch"] == best == load_checkpoint(tmp_path / "run" / "best.pt")["epoch"]
    assert summary["best_value"] == pytest.approx({"accuracy": 0.75, "auroc": 1.0}[monitor])
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluated["best_epoch"] == best and evaluated["monitor"] == monitor and evaluated["auroc"] == 1.0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [float(r["val_auroc"]) for r in rows] == [0.75, 1.0] and [float(r["val_accuracy"]) for r in rows] == [0.75, 0.5]


def test_a_test_set_is_scored_once_by_best_pt_as_evaluate_scores_it(tmp_path, capsys):
    root = csv_data(tmp_path / "data", {"train": 8, "val": 4, "test": 6})
    assert main(["train", "--config", write_yaml(tmp_path, run_config(tmp_path, root))]) == 0
    run = tmp_path / "run"
    test = json.loads((run / "test.json").read_text())
    assert test["checkpoint"] == "best.pt" and test["epoch"] == load_checkpoint(run / "best.pt")["epoch"]
    assert test["images"] == 6 and set(test["intervals"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc"}
    split = list(csv.DictReader((run / "split.csv").open()))
    assert sum(r["split"] == "test" for r in split) == 6 and sum(r["split"] == "train" for r in split) == 8
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt"), "--data", str(root / "test.csv"), "--json",
                 "--predictions", str(tmp_path / "scored.csv"), "--pictures", str(tmp_path / "pictures")]) == 0
    scored = json.loads(capsys.readouterr().out)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "qwk", "loss"):
        assert scored[name] == pytest.approx(test[name], abs=1e-6), name
    assert scored["confusion"] == test["confusion"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert scored["intervals"][name] == pytest.approx(test["intervals"][name], abs=1e-6), name
    # the predictions: one row per image, one column per class, the run's and evaluate's alike
    table = pd.read_csv(run / "test_predictions.csv")
    assert list(table.columns) == ["image", "label", "predicted", "p_benign", "p_tumour"] and len(table) == 6
    assert np.allclose(table[["p_benign", "p_tumour"]].sum(axis=1), 1, atol=1e-5)
    assert table["label"].tolist() == [CLASSES[i % 2] for i in range(6)]
    assert np.allclose(pd.read_csv(tmp_path / "scored.csv")[["p_benign", "p_tumour"]], table[["p_benign", "p_tumour"]])
    for picture in (run / "roc.png", run / "confusion.png", run / "test_roc.png", run / "test_confusion.png",
                    tmp_path / "pictures" / "roc.png", tmp_path / "pictures" / "confusion.png"):
        assert Image.open(picture).size[0] > 300, picture


def write_yaml(tmp_path, cfg) -> str:
    from patchgd.config import save_config

    save_config(cfg, tmp_path / "config.yaml")
    return str(tmp_path / "config.yaml")


def test_cross_validation_reports_every_fold_and_resumes_after_a_kill(tmp_path):
    root = csv_data(tmp_path / "data", {"train": 24}, folds=3)
    cfg = run_config(tmp_path, root)
    config = write_yaml(tmp_path, dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, group_column="case_id", fold=0)))
    out = tmp_path / "cv"
    command = [sys.executable, "-m", "patchgd", "cv", "--config", config, "--out", str(out), "--devices", "cpu"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "status").glob("*.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # after the first fold, in the middle of the second
    first.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "status").glob("*.json")}
    assert 1 <= len(done_before) < 3

    assert main(["cv", "--config", config, "--out", str(out), "--devices", "cpu"]) == 0
    for name, mtime in done_before.items():  # finished folds were not trained again
        assert (out / "status" / name).stat().st_mtime_ns == mtime, name
    report = json.loads((out / "cv.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2] and all(f["images"] == 8 for f in report["folds"])
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        values = [f[name] for f in report["folds"]]
        assert report["mean"][name] == pytest.approx(np.mean(values))
        assert report["std"][name] == pytest.approx(np.std(values, ddof=1))
    pooled = report["pooled"]
    assert pooled["images"] == 24 and pooled["intervals"]["by"] == "group"
    table = list(csv.reader((out / "cv.csv").open()))
    assert [r[0] for r in table] == ["fold", "0", "1", "2", "mean", "std", "pooled"]
    markdown = (out / "cv.md").read_text()
    assert "| mean ± std |" in markdown and "Pooled out-of-fold predictions of 24 images" in markdown
    assert Image.open(out / "cv_roc.png").size[0] > 300
    # every image held out exactly once, with its patient
    oof = pd.concat([pd.read_csv(p) for p in sorted((out / "runs").glob("*/oof_predictions.csv"))])
    assert sorted(oof["image"]) == sorted(f"train/train{i:02d}.png" for i in range(24))
    assert oof.groupby("group")["image"].count().eq(2).all()
