"""What an evaluation leaves for people: its scores as JSON-ready values (with bootstrap intervals), one row
per image in a CSV, and its ROC curves and confusion matrix as pictures.

Example:
    >>> import torch
    >>> results = evaluate_predictions(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), 2)
    >>> results |= {"logits": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "labels": torch.tensor([0, 1]), "loss": 0.2}
    >>> scores(results, ["benign", "tumour"])["auroc"]
    1.0
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_file
from ..metrics import bootstrap_intervals, evaluate_predictions, probabilities
from ..plots import plot_confusion, plot_roc
from ..rundir import CONFUSION_FILE, ROC_FILE

__all__ = ["describe_scores", "read_predictions", "rescore", "scores", "write_pictures", "write_predictions"]

_TENSORS = ("logits", "labels")  # in an evaluation's results, for the files below; not JSON


def scores(results: dict, classes: Sequence[str], *, resamples: int = 0, seed: int = 0,
           groups: Sequence | None = None) -> dict:
    """The JSON-ready scores of an evaluation (:func:`patchgd.engine.loop.evaluate`'s results): every metric,
    the confusion matrix as lists, the class names, the number of images and, with ``resamples``, the 95 %
    bootstrap intervals (:func:`patchgd.metrics.bootstrap_intervals`; by group with ``groups``).
    """
    out = {key: value for key, value in results.items() if key not in _TENSORS}
    out.update(confusion=np.asarray(results["confusion"]).tolist(), classes=list(classes),
               images=len(results["labels"]))
    if resamples:
        out["intervals"] = bootstrap_intervals(results["logits"], results["labels"], len(classes), groups=groups,
                                               resamples=resamples, seed=seed)
    return out


def write_predictions(path: str | Path, images: Sequence, probs, classes: Sequence[str],
                      labels: Sequence[int] | None = None, groups: Sequence[str] | None = None) -> None:
    """One row per image (atomically): ``image``, ``label`` (its class name; empty where unknown), ``group``
    (its patient, where the data has groups), ``predicted`` and ``p_CLASS``, the probability of each class
    (``probs``, ``(N, K)``), one column per class."""
    probs = np.asarray(probs, dtype=np.float64)
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", *(["group"] if groups else []), "predicted",
                         *(f"p_{name}" for name in classes)])
        for i, (image, row) in enumerate(zip(images, probs)):
            label = "" if labels is None else classes[int(labels[i])]
            predicted = classes[int(row.argmax())] if np.isfinite(row).all() else ""
            writer.writerow([str(image), label, *([groups[i]] if groups else []), predicted,
                             *(f"{p:.6f}" for p in row)])


def read_predictions(path: str | Path, classes: Sequence[str]) -> dict:
    """A predictions CSV of :func:`write_predictions` with labels: ``images``, ``logits`` (the
    log-probabilities: their softmax gives the probabilities back), ``labels`` and ``groups`` (None without)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    index = {name: i for i, name in enumerate(classes)}
    probs = np.array([[float(r[f"p_{name}"]) for name in classes] for r in rows], dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    return {"images": [r["image"] for r in rows], "logits": logits, "labels": np.array([index[r["label"]] for r in rows]),
            "groups": [r["group"] for r in rows] if rows and "group" in rows[0] else None}


def describe_scores(scored: dict) -> str:
    """One line of :func:`scores`: images, then each metric with its interval where there is one."""
    intervals = scored.get("intervals") or {}
    parts = [f"{scored['images']} images"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "qwk"):
        value = scored.get(name)
        if value is None:
            parts.append(f"{name.replace('_', ' ')} undefined ({scored.get('auroc_note')})")
            continue
        low_high = intervals.get(name)
        parts.append(f"{name.replace('_', ' ')} {value:.4f}" + (f" [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""))
    return ", ".join(parts)


def rescore(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """The results of an evaluation made from stored logits (pooled out-of-fold predictions)."""
    return {**evaluate_predictions(logits, labels, len(classes)), "logits": logits, "labels": labels}


def write_pictures(folder: str | Path, prefix: str, results: dict, classes: Sequence[str], title: str) -> list[Path]:
    """``PREFIXroc.png`` (the ROC curves) and ``PREFIXconfusion.png`` of an evaluation; returns them."""
    folder = Path(folder)
    roc, confusion = folder / f"{prefix}{ROC_FILE}", folder / f"{prefix}{CONFUSION_FILE}"
    finite = np.isfinite(np.asarray(results["logits"])).all(axis=1)
    plot_roc(probabilities(np.asarray(results["logits"])[finite]), np.asarray(results["labels"])[finite],
             list(classes), roc, title)
    plot_confusion(np.asarray(results["confusion"]), list(classes), confusion, title)
    return [roc, confusion]
