"""Classification metrics: accuracy, quadratic weighted kappa and the confusion matrix.

The paper reports accuracy on UltraMNIST and quadratic weighted kappa (QWK) on PANDA, whose ISUP grades
are ordinal. Kappa and the confusion matrix come from scikit-learn, always with the full label set
``range(num_classes)``, so that classes absent from a small evaluation set still get their row and column
and still weigh in the kappa.

Example:
    >>> metrics = evaluate_predictions(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), num_classes=3)
    >>> metrics["accuracy"], round(metrics["qwk"], 4)
    (0.75, 0.8)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

__all__ = ["accuracy", "confusion_matrix", "evaluate_predictions", "quadratic_weighted_kappa"]


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
        ``{"accuracy": float, "qwk": float, "confusion": np.ndarray, "non_finite": int}`` as computed by
        :func:`accuracy`, :func:`quadratic_weighted_kappa` and :func:`confusion_matrix`; ``qwk`` is nan
        when no row is finite.

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
        preds = values.argmax(axis=1)
    else:
        preds, finite = values, np.ones(values.shape, dtype=bool)
    preds, targets = _labels(preds, targets)
    kept_preds, kept_targets = preds[finite], targets[finite]
    return {
        "accuracy": float(np.mean((preds == targets) & finite)),
        "qwk": quadratic_weighted_kappa(kept_preds, kept_targets, num_classes) if finite.any() else math.nan,
        "confusion": confusion_matrix(kept_preds, kept_targets, num_classes) if finite.any()
        else np.zeros((num_classes, num_classes), dtype=np.int64),
        "non_finite": int((~finite).sum()),
    }
