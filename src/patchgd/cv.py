"""Cross-validation as one command: every fold of a CSV's ``kfold`` column trained, then reported as papers do.

``patchgd cv --config CONFIG`` writes a sweep over ``data.fold`` (``OUT/cv_spec.yaml``) and runs it with the
sweep machinery (queued over devices, resumable: a killed cross-validation continues where it stopped).
Each fold's ``best.pt`` then predicts the fold it held out (``runs/NNN/oof_predictions.csv``, made once), and
``OUT/cv.csv``, ``cv.md`` and ``cv.json`` report every metric per fold, their mean ± standard deviation
across folds, and the metrics of the pooled out-of-fold predictions with 95 % bootstrap intervals (by
patient where the data has ``data.group_column``); with a test set, each fold's ``best.pt`` on it
(``test.json``) too. ``cv_roc.png`` draws each fold's ROC curve, their mean and its band.

The folds are those of the training CSV (``prepare tcga`` and ``prepare panda`` write patient-grouped
ones), less ``data.test_fold``. A fold's numbers are on the images that picked its ``best.pt``; the pooled
ones, and the test set's, are the ones to report (docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

from .config import Config, ConfigError, find_config, load_config
from .data.layouts import FOLD_COLUMN, read_csv
from .io import atomic_file
from .rundir import BEST_CHECKPOINT, CONFIG_FILE, TEST_FILE
from .sweep import run_sweep

__all__ = ["FOLD_METRICS", "fold_values", "run_cv"]

FOLD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "qwk")
OOF_FILE = "oof_predictions.csv"  # in each fold's run directory: its best.pt on the fold it held out


def fold_values(cfg: Config) -> list[int]:
    """The folds of the training CSV's ``kfold`` column, less ``data.test_fold``.

    Raises:
        ConfigError: No training CSV with a ``kfold`` column, or fewer than two folds.
    """
    csv_path = Path(cfg.data.root or ".") / cfg.data.train_csv
    if not csv_path.is_file():
        raise ConfigError(f"patchgd cv trains the folds of a CSV's {FOLD_COLUMN} column; {csv_path} does not exist")
    rows, columns = read_csv(csv_path)
    if FOLD_COLUMN not in columns:
        raise ConfigError(f"{csv_path}: no {FOLD_COLUMN} column to cross-validate over (found {columns}); "
                          "patchgd prepare tcga / panda write one")
    folds = sorted({int(float(row[FOLD_COLUMN])) for _, row in rows} - {cfg.data.test_fold})
    if len(folds) < 2:
        raise ConfigError(f"{csv_path}: {len(folds)} fold(s) {folds} to train; expected at least 2")
    return folds


def _out_of_fold(run_dir: Path, device: str, log) -> Path:
    """``run_dir/oof_predictions.csv``: its ``best.pt`` on the fold it held out (made when missing or older
    than ``best.pt``)."""
    import torch

    from .data.datasets import collate_images
    from .engine.build import resolve_device
    from .engine.data import build_datasets, class_name, image_name
    from .engine.loop import evaluate
    from .engine.report import write_predictions
    from .inference import load_model
    from .metrics import probabilities

    path = run_dir / OOF_FILE
    if path.is_file() and path.stat().st_mtime >= (run_dir / BEST_CHECKPOINT).stat().st_mtime:
        return path
    torch_device = resolve_device(device)
    model, cfg = load_model(run_dir / BEST_CHECKPOINT, torch_device)
    held_out = build_datasets(load_config(run_dir / CONFIG_FILE))[1]
    loader = torch.utils.data.DataLoader(held_out, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                         collate_fn=collate_images)
    results = evaluate(model, loader, torch_device, cfg.data.num_classes, cfg.train.amp)
    write_predictions(path, [image_name(cfg.data.root, p) for p in held_out.paths], probabilities(results["logits"]),
                      [class_name(cfg, c) for c in range(cfg.data.num_classes)], results["labels"], held_out.groups)
    log(f"{run_dir.name}: out-of-fold predictions of {len(held_out)} images ({path})")
    return path


def run_cv(config: str | Path, out: str | Path, *, overrides: list[str] = (), devices: list[str] | None = None,
           slots: int = 1, log=print) -> dict:
    """Train every fold of ``config`` (with ``overrides``) into ``out``, then write the cross-validation report.

    Args:
        config: A config file or packaged recipe whose data is a CSV with a ``kfold`` column.
        out: The folder: the sweep's ``runs/``, ``logs/``, ``status/``, and ``cv.csv``, ``cv.md``,
            ``cv.json``, ``cv_roc.png``.
        overrides: ``--set`` values for every fold.
        devices: As :func:`patchgd.sweep.run_sweep`.
        slots: As :func:`patchgd.sweep.run_sweep`.
        log: Where progress lines go.

    Returns:
        The report (``cv.json``'s content).
    """
    from .engine.data import class_name
    from .engine.report import read_predictions, rescore, scores
    from .plots import plot_folds_roc

    path = find_config(config).resolve()
    cfg = load_config(path, overrides)
    folds = fold_values(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "cv_spec.yaml"
    with atomic_file(spec) as tmp:
        tmp.write_text(yaml.safe_dump({"base": str(path), "set": list(overrides), "grid": {"data.fold": folds}}))
    rows = run_sweep(spec, out, devices=devices, slots=slots, log=log)
    per_fold, predictions, classes = [], [], []
    for fold, row in zip(folds, rows):
        run_dir = Path(row["run_dir"])
        if row["status"] != "done":
            per_fold.append({"fold": fold, "status": row["status"]})
            continue
        run_cfg = load_config(run_dir / CONFIG_FILE)
        classes = [class_name(run_cfg, c) for c in range(run_cfg.data.num_classes)]
        held_out = read_predictions(_out_of_fold(run_dir, (devices or ["auto"])[0], log), classes)
        scored = scores(rescore(held_out["logits"], held_out["labels"], classes), classes)
        entry = {"fold": fold, "status": "done", "images": scored["images"], **{m: scored[m] for m in FOLD_METRICS}}
        if (run_dir / TEST_FILE).is_file():
            test = json.loads((run_dir / TEST_FILE).read_text())
            entry.update(test_images=test["images"], **{f"test_{m}": test[m] for m in FOLD_METRICS})
        per_fold.append(entry)
        predictions.append(held_out)
    done = [f for f in per_fold if f["status"] == "done"]
    report = {"config": str(path), "overrides": list(overrides), "folds": per_fold,
              "mean": _across(done, np.mean), "std": _across(done, lambda v: np.std(v, ddof=1))}
    if predictions:
        pooled = {key: np.concatenate([p[key] for p in predictions]) for key in ("logits", "labels")}
        groups = [g for p in predictions for g in p["groups"]] if all(p["groups"] for p in predictions) else None
        report["pooled"] = scores(rescore(pooled["logits"], pooled["labels"], classes), classes,
                                  resamples=cfg.train.bootstrap, seed=cfg.train.seed, groups=groups)
        plot_folds_roc([(np.exp(p["logits"]), p["labels"]) for p in predictions], classes, out / "cv_roc.png",
                       f"{len(done)}-fold cross-validation")
    _write_report(out, report)
    log(f"wrote {out / 'cv.csv'}, {out / 'cv.md'} and {out / 'cv.json'}"
        + (f"; {len(per_fold) - len(done)} fold(s) not done" if len(done) < len(per_fold) else ""))
    return report


def _across(folds: list[dict], reduce) -> dict:
    """``reduce`` (mean, standard deviation) of each metric across the folds that define it."""
    keys = [*FOLD_METRICS, *(f"test_{m}" for m in FOLD_METRICS)]
    values = {key: [f[key] for f in folds if f.get(key) is not None] for key in keys}
    return {key: float(reduce(v)) if len(v) > 1 or reduce is np.mean else math.nan for key, v in values.items() if v}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_report(out: Path, report: dict) -> None:
    """``cv.csv`` (a row per fold, then mean, std and pooled), ``cv.md`` (the same, mean ± std in one row,
    the pooled metrics with their intervals) and ``cv.json``."""
    metrics = [*FOLD_METRICS]
    if any("test_images" in f for f in report["folds"]):
        metrics += ["test_images", *(f"test_{m}" for m in FOLD_METRICS)]
    columns = ["fold", "images", *metrics]
    rows = [[str(f["fold"]), _cell(f.get("images")) or f["status"], *(_cell(f.get(m)) for m in metrics)]
            for f in report["folds"]]
    summary = [["mean", "", *(_cell(report["mean"].get(m)) for m in metrics)],
               ["std", "", *(_cell(report["std"].get(m)) for m in metrics)]]
    pooled = report.get("pooled")
    if pooled:
        summary.append(["pooled", str(pooled["images"]), *(_cell(pooled.get(m)) for m in metrics)])
    with atomic_file(out / "cv.csv") as tmp:
        tmp.write_text("\n".join(",".join(r) for r in [columns, *rows, *summary]) + "\n")
    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns), *(
        "| " + " | ".join(r) + " |" for r in rows)]
    mean, std = summary[0], summary[1]
    lines.append("| mean ± std | | " + " | ".join(f"{m} ± {s}" if m else "" for m, s in zip(mean[2:], std[2:])) + " |")
    if pooled:
        intervals = pooled.get("intervals") or {}
        said = [f"{m.replace('_', ' ')} {_cell(pooled.get(m)) or 'undefined'}"
                + (f" [{intervals[m][0]:.4f}, {intervals[m][1]:.4f}]" if intervals.get(m) else "")
                for m in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")]
        lines += ["", f"Pooled out-of-fold predictions of {pooled['images']} images: " + ", ".join(said)
                  + (f" (95 % bootstrap intervals by {intervals['by']}, {intervals['resamples_used']['accuracy']} "
                     "resamples)." if intervals else ".")]
    with atomic_file(out / "cv.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(out / "cv.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
