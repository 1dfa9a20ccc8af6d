"""Classification metrics: accuracy, balanced accuracy, macro-F1, AUROC, quadratic weighted kappa, the
confusion matrix and per-class scores, and bootstrap confidence intervals.

The paper reports accuracy on UltraMNIST and quadratic weighted kappa (QWK) on PANDA, whose ISUP grades
are ordinal; pathology reports AUROC (binary; macro one-vs-rest for several classes), balanced accuracy
and macro-F1, each with a 95 % interval. Every metric comes from scikit-learn; kappa and the confusion
matrix always with the full label set ``range(num_classes)``, so that classes absent from a small
evaluation set still get their row and column and still weigh in the kappa. An AUROC that is undefined (a
class with no image in the set, or no image outside it) is reported as such (``None`` and a note), never
as 0.5.

Example:
    >>> metrics = evaluate_predictions(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), num_classes=3)
    >>> metrics["accuracy"], round(metrics["qwk"], 4)
    (0.75, 0.8)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

__all__ = ["INTERVAL_METRICS", "accuracy", "auroc", "bootstrap_intervals", "confusion_matrix",
           "evaluate_predictions", "per_class_scores", "probabilities", "quadratic_weighted_kappa"]

# The metrics that get bootstrap intervals.
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _labels(preds: Any, targets: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of class-index sequences and return them as 1-D integer arrays."""
    preds, targets = _as_numpy(preds), _as_numpy(targets)
    if preds.ndim != 1 or targets.ndim != 1 or preds.shape != targets.shape:
        raise ValueError(
            f"preds and targets must be 1-D sequences of the same length, "
            f"got shapes {preds.shape} and {targets.shape}"
        )
    if preds.size == 0:
        raise ValueError("preds and targets are empty: metrics need at least one sample")
    for name, values in (("preds", preds), ("targets", targets)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {values.dtype}")
        # scikit-learn silently drops labels outside `labels=`, which would hide a bug.
        if num_classes is not None and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for num_classes={num_classes}, "
                f"got values from {values.min()} to {values.max()}"
            )
    return preds, targets


def accuracy(preds: Any, targets: Any) -> float:
    """Fraction of predictions equal to their target.

    Args:
        preds: Predicted class indices, shape ``(N,)``; a tensor, array or sequence.
        targets: True class indices, shape ``(N,)``.

    Returns:
        Accuracy in ``[0, 1]``.

    Example:
        >>> accuracy([0, 1, 2, 2], [0, 1, 1, 2])
        0.75
    """
    preds, targets = _labels(preds, targets)
    return float(np.mean(preds == targets))


def quadratic_weighted_kappa(preds: Any, targets: Any, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights, the agreement measure for ordinal grades.

    ``1 - sum(W * O) / sum(W * E)`` with ``W[i, j] = (i - j)^2 / (K - 1)^2``, ``O`` the confusion matrix and
    ``E`` the outer product of the true and predicted class histograms divided by ``N``: 1 is perfect
    agreement, 0 chance level, negative worse than chance.

    Kappa is undefined (0 / 0) when predictions and targets all fall in one and the same class; then they
    agree perfectly and this returns 1.0 rather than scikit-learn's nan, so that a tiny evaluation batch
    cannot poison an average. All predictions in one class and all targets in another gives 0.0.

    Args:
        preds: Predicted class indices in ``[0, num_classes)``, shape ``(N,)``.
        targets: True class indices in ``[0, num_classes)``, shape ``(N,)``.
        num_classes: Number of classes ``K``; absent classes still count in the weights.

    Returns:
        The kappa, in ``[-1, 1]``.

    Example:
        >>> round(quadratic_weighted_kappa([0, 1, 2, 2], [0, 1, 1, 2], num_classes=3), 4)
        0.8
    """
    preds, targets = _labels(preds, targets, num_classes)
    if np.unique(np.concatenate([preds, targets])).size == 1:
        return 1.0
    return float(cohen_kappa_score(targets, preds, weights="quadratic", labels=list(range(num_classes))))


def confusion_matrix(preds: Any, targets: Any, num_classes: int) -> np.ndarray:
    """Count matrix of (true, predicted) class pairs.

    Args:
        preds: Predicted class indices in ``[0, num_classes)``, shape ``(N,)``.
        targets: True class indices in ``[0, num_classes)``, shape ``(N,)``.
        num_classes: Number of classes; every class gets a row and a column.

    Returns:
        Integer array of shape ``(num_classes, num_classes)``; entry ``[t, p]`` counts samples of true
        class ``t`` predicted as ``p`` (rows are true classes).

    Example:
        >>> confusion_matrix([0, 1, 2, 2], [0, 1, 1, 2], num_classes=3)
        array([[1, 0, 0],
               [0, 1, 1],
               [0, 0, 1]])
    """
    preds, targets = _labels(preds, targets, num_classes)
    return sklearn_confusion_matrix(targets, preds, labels=list(range(num_classes))).astype(np.int64)


def per_class_scores(preds: Any, targets: Any, num_classes: int) -> dict[str, list]:
    """Precision, recall, F1 and support of every class (scikit-learn's; 0 where a score is undefined).

    Args:
        preds: Predicted class indices, shape ``(N,)``.
        targets: True class indices, shape ``(N,)``.
        num_classes: Number of classes; every class gets an entry, present or not.

    Returns:
        ``{"precision": [...], "recall": [...], "f1": [...], "support": [...]}``, one value per class.

    Example:
        >>> per_class_scores([0, 1, 1], [0, 1, 0], num_classes=2)["recall"]
        [0.5, 1.0]
    """
    preds, targets = _labels(preds, targets, num_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=list(range(num_classes)), zero_division=0)
    return {"precision": [float(v) for v in precision], "recall": [float(v) for v in recall],
            "f1": [float(v) for v in f1], "support": [int(v) for v in support]}


def probabilities(logits: Any) -> np.ndarray:
    """Softmax of ``(N, K)`` logits, in float64 (rows with a non-finite logit stay non-finite)."""
    values = _as_numpy(logits).astype(np.float64)
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def auroc(scores: Any, targets: Any, num_classes: int) -> dict[str, Any]:
    """The area under the ROC curve: of class 1's score for two classes; else each class one-vs-rest and
    their unweighted mean (macro), as scikit-learn's ``roc_auc_score(multi_class="ovr")`` when every class
    is present.

    A class with no image in the set (or, for two classes, a set of one class) has no ROC curve: its AUROC
    is None and ``auroc_note`` says why; the macro mean is over the classes that have one (None when none
    does).

    Args:
        scores: ``(N, K)`` class probabilities (or any scores increasing with the class's likelihood).
        targets: True class indices, shape ``(N,)``.
        num_classes: ``K``.

    Returns:
        ``{"auroc": float | None, "auroc_per_class": [float | None] * K, "auroc_note": str | None}``.

    Example:
        >>> auroc([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], [0, 1, 1], 2)["auroc"]
        1.0
        >>> auroc([[0.9, 0.1], [0.4, 0.6]], [0, 0], 2)["auroc_note"]
        'only class 0 in the set: AUROC undefined'
    """
    scores, targets = _as_numpy(scores), _as_numpy(targets)
    present = [k for k in range(num_classes) if (targets == k).any()]
    per_class: list[float | None] = [None] * num_classes
    for k in present:
        if len(present) > 1:
            per_class[k] = float(roc_auc_score(targets == k, scores[:, k]))
    if num_classes == 2:
        value = per_class[1]
        note = None if value is not None else f"only class {present[0] if present else '-'} in the set: AUROC undefined"
        return {"auroc": value, "auroc_per_class": per_class, "auroc_note": note}
    defined = [v for v in per_class if v is not None]
    absent = [k for k in range(num_classes) if per_class[k] is None]
    note = None
    if absent:
        note = (f"class(es) {absent} without images in the set: no ROC curve; macro AUROC over the other "
                f"{len(defined)}" if defined else "fewer than two classes in the set: AUROC undefined")
    return {"auroc": float(np.mean(defined)) if defined else None, "auroc_per_class": per_class, "auroc_note": note}


def _point_metrics(scores: np.ndarray, preds: np.ndarray, targets: np.ndarray, finite: np.ndarray,
                   num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and AUROC of one set; a non-finite row counts as wrong (its
    prediction is no class) and is left out of the AUROC."""
    said = np.where(finite, preds, -1)
    present = sorted(set(targets.tolist()) | set(said[finite].tolist()))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": the -1 of a non-finite row
        balanced = float(balanced_accuracy_score(targets, said))
    return {"accuracy": float(np.mean(said == targets)), "balanced_accuracy": balanced,
            "macro_f1": float(f1_score(targets, said, labels=present, average="macro", zero_division=0)),
            **(auroc(scores[finite], targets[finite], num_classes) if scores is not None and finite.any()
               else {"auroc": None, "auroc_per_class": [None] * num_classes,
                     "auroc_note": "no class scores" if scores is None else "no finite scores"})}


class _Resampler:
    """The metrics of :data:`INTERVAL_METRICS` on a resample given as a count per image (how often it was
    drawn), from the formulas scikit-learn uses, vectorized: scikit-learn's own checks cost about a
    millisecond per call, seconds for a thousand resamples. The tests hold them to scikit-learn's."""

    def __init__(self, scores: np.ndarray, preds: np.ndarray, targets: np.ndarray, finite: np.ndarray,
                 num_classes: int):
        self.said = np.where(finite, preds, -1)  # a non-finite row predicts no class
        self.targets, self.finite, self.num_classes = targets, finite, num_classes
        self.correct = self.said == targets
        self.curves = []  # per class with a curve: (positive, negative, each row's rank among tied scores)
        for k in ([1] if num_classes == 2 else range(num_classes)):
            _, rank = np.unique(scores[:, k], return_inverse=True)
            self.curves.append((k, finite & (targets == k), finite & (targets != k), rank))

    def __call__(self, w: np.ndarray) -> dict[str, float | None]:
        total = w.sum()
        true = np.bincount(self.targets, weights=w, minlength=self.num_classes)
        hits = np.bincount(self.targets, weights=w * self.correct, minlength=self.num_classes)
        said = np.bincount(self.said[self.finite], weights=w[self.finite], minlength=self.num_classes)
        present = (true > 0) | (said > 0)  # f1_score's labels: the classes in the targets or the predictions
        f1 = 2 * hits[present] / (true[present] + said[present])
        aurocs = []
        for _, pos, neg, rank in self.curves:
            w_pos, w_neg = w[pos].sum(), w[neg].sum()
            if w_pos == 0 or w_neg == 0:
                continue  # no curve in this resample
            per_score = np.bincount(rank[neg], weights=w[neg], minlength=rank.max() + 1)
            below = np.cumsum(per_score) - per_score  # negative weight strictly below each score
            aurocs.append(float((w[pos] * (below[rank[pos]] + 0.5 * per_score[rank[pos]])).sum() / (w_pos * w_neg)))
        return {"accuracy": float((w * self.correct).sum() / total),
                "balanced_accuracy": float(np.mean(hits[true > 0] / true[true > 0])),
                "macro_f1": float(np.mean(f1)),
                "auroc": (aurocs[0] if self.num_classes == 2 else float(np.mean(aurocs))) if aurocs else None}


def bootstrap_intervals(logits: Any, targets: Any, num_classes: int, *, groups: Sequence | None = None,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap intervals of :data:`INTERVAL_METRICS`: the set resampled with replacement,
    ``resamples`` times, by image or, with ``groups`` (patients), by group with all its images.

    Resample ``r`` draws ``rng.integers(0, n, n)`` of ``numpy.random.default_rng(seed)`` (``n`` images, or
    groups in their order of first appearance). A resample in which a metric is undefined (an AUROC over one
    class) is left out of that metric's interval; ``resamples_used`` counts the others. The multi-class
    AUROC of a resample is the mean over the classes it has curves for, as :func:`auroc`.

    Args:
        logits: ``(N, K)`` logits.
        targets: True class indices, shape ``(N,)``.
        num_classes: ``K``.
        groups: One group id per image, or None.
        resamples: How many resamples.
        seed: Seed of the resampling.
        level: The interval's coverage.

    Returns:
        ``{metric: [low, high] or None, "resamples_used": {metric: n}, "level": level, "by": "image" | "group"}``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
        >>> bootstrap_intervals(logits, torch.tensor([0, 1, 0, 1]), 2, resamples=200)["accuracy"]
        [1.0, 1.0]
    """
    values, targets = _as_numpy(logits), _as_numpy(targets).astype(np.int64)
    finite = np.isfinite(values).all(axis=1)
    metrics = _Resampler(probabilities(np.where(finite[:, None], values, 0.0)), values.argmax(axis=1), targets,
                         finite, num_classes)
    rng = np.random.default_rng(seed)
    if groups is None:
        owner, count = np.arange(len(targets)), len(targets)
    else:
        _, first, owner = np.unique(np.asarray(groups, dtype=object).astype(str), return_index=True,
                                    return_inverse=True)
        order = np.argsort(np.argsort(first))  # groups numbered by first appearance
        owner, count = order[owner], len(first)
    samples: dict[str, list[float]] = {m: [] for m in INTERVAL_METRICS}
    for _ in range(resamples):
        drawn = np.bincount(rng.integers(0, count, count), minlength=count)[owner].astype(np.float64)
        for m, value in metrics(drawn).items():
            if value is not None:
                samples[m].append(value)
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {m: [float(v) for v in np.percentile(samples[m], [tail, 100 - tail])] if samples[m] else None
                           for m in INTERVAL_METRICS}
    out.update(resamples_used={m: len(samples[m]) for m in INTERVAL_METRICS}, level=level,
               by="image" if groups is None else "group")
    return out


def evaluate_predictions(logits_or_preds: Any, targets: Any, num_classes: int) -> dict[str, Any]:
    """All classification metrics for one evaluation set.

    A row of logits with a non-finite value (a diverged model) is no prediction: it counts as wrong in
    the accuracy and is left out of the kappa and the confusion matrix (whose counts then sum to the
    finite rows); ``non_finite`` says how many there were. Without this, the arg-max of an all-NaN row is
    class 0, and a diverged model would score as a classifier that always says 0.

    Args:
        logits_or_preds: Logits or scores of shape ``(N, num_classes)`` (the arg-max is the prediction),
            or predicted class indices of shape ``(N,)``.
        targets: True class indices, shape ``(N,)``.
        num_classes: Number of classes.

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1": float, "auroc": float | None, "auroc_per_class",
        "auroc_note", "qwk": float, "confusion": np.ndarray, "per_class": dict, "non_finite": int}``: the
        AUROC (:func:`auroc`) from the softmax of logits (None for class indices), kappa, confusion and
        per-class scores on the finite rows; ``qwk`` is nan when no row is finite.

    Example:
        >>> logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0]])
        >>> evaluate_predictions(logits, torch.tensor([0, 1, 1]), num_classes=3)["accuracy"]
        0.6666666666666666
        >>> evaluate_predictions(torch.full((2, 3), float("nan")), torch.tensor([0, 0]), 3)["accuracy"]
        0.0
    """
    values, targets = _as_numpy(logits_or_preds), _as_numpy(targets)
    if values.ndim == 2:
        if values.shape[1] != num_classes:
            raise ValueError(
                f"logits must have shape (N, num_classes={num_classes}), got {values.shape}"
            )
        finite = np.isfinite(values).all(axis=1)
        preds, scores = values.argmax(axis=1), probabilities(np.where(finite[:, None], values, 0.0))
    else:
        preds, finite, scores = values, np.ones(values.shape, dtype=bool), None
    preds, targets = _labels(preds, targets)
    kept_preds, kept_targets = preds[finite], targets[finite]
    return {
        **_point_metrics(scores, preds, targets, finite, num_classes),
        "qwk": quadratic_weighted_kappa(kept_preds, kept_targets, num_classes) if finite.any() else math.nan,
        "confusion": confusion_matrix(kept_preds, kept_targets, num_classes) if finite.any()
        else np.zeros((num_classes, num_classes), dtype=np.int64),
        "per_class": per_class_scores(kept_preds, kept_targets, num_classes) if finite.any()
        else {"precision": [0.0] * num_classes, "recall": [0.0] * num_classes, "f1": [0.0] * num_classes,
              "support": [0] * num_classes},
        "non_finite": int((~finite).sum()),
    }
