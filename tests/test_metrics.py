"""Tests for patchgd.metrics against hand-worked examples and a naive QWK formula."""

import numpy as np
import pytest
import torch

from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from patchgd.metrics import (accuracy, auroc, bootstrap_intervals, confusion_matrix, evaluate_predictions,
                             per_class_scores, probabilities, quadratic_weighted_kappa)

# A 3-class example, worked by hand (rows = true class):
#   targets 0 0 1 1 2 2
#   preds   0 1 1 2 2 0
#   O = [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
#   W[i, j] = (i - j)^2 / 4  ->  sum(W * O) = (1 + 1 + 4) / 4 = 1.5
#   histograms (2, 2, 2) and (2, 2, 2): E[i, j] = 2 * 2 / 6 = 2/3 for every cell
#   sum(W * E) = (sum of (i - j)^2 over all cells = 12) / 4 * 2/3 = 2
#   kappa = 1 - 1.5 / 2 = 0.25
TARGETS = [0, 0, 1, 1, 2, 2]
PREDS = [0, 1, 1, 2, 2, 0]


def _naive_qwk(preds, targets, num_classes):
    """Quadratic weighted kappa written out from its definition with plain loops."""
    n = len(preds)
    observed = [[0.0] * num_classes for _ in range(num_classes)]
    for t, p in zip(targets, preds):
        observed[t][p] += 1
    true_hist = [sum(row) for row in observed]
    pred_hist = [sum(observed[i][j] for i in range(num_classes)) for j in range(num_classes)]
    num = den = 0.0
    for i in range(num_classes):
        for j in range(num_classes):
            weight = (i - j) ** 2 / (num_classes - 1) ** 2
            num += weight * observed[i][j]
            den += weight * true_hist[i] * pred_hist[j] / n
    return 1 - num / den


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_accuracy_hand_example(convert):
    assert accuracy(convert(PREDS), convert(TARGETS)) == pytest.approx(3 / 6)


def test_accuracy_accepts_gpu_style_tensors_with_grad_history():
    logits = torch.randn(4, 3, requires_grad=True)
    preds = logits.argmax(dim=1)
    assert accuracy(preds, preds.clone()) == 1.0


def test_confusion_matrix_hand_example_rows_are_true_classes():
    expected = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    result = confusion_matrix(torch.tensor(PREDS), torch.tensor(TARGETS), num_classes=4)
    assert isinstance(result, np.ndarray)
    assert np.issubdtype(result.dtype, np.integer)
    np.testing.assert_array_equal(result, expected)


def test_confusion_matrix_is_not_transposed():
    # One sample of true class 0 predicted as 2 must land in row 0, column 2.
    result = confusion_matrix([2], [0], num_classes=3)
    assert result[0, 2] == 1 and result.sum() == 1


def test_qwk_hand_example():
    assert quadratic_weighted_kappa(PREDS, TARGETS, num_classes=3) == pytest.approx(0.25)


def test_qwk_absent_class_still_weighs():
    # Class 3 never occurs but widens the weight denominator from 2^2 to 3^2; kappa itself is
    # invariant to that scaling, so it must equal the 3-class value.
    assert quadratic_weighted_kappa(PREDS, TARGETS, num_classes=4) == pytest.approx(0.25)


def test_qwk_matches_naive_formula_on_random_labels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.integers(0, 5, size=40)
        preds = np.clip(targets + rng.integers(-2, 3, size=40), 0, 4)
        assert quadratic_weighted_kappa(preds, targets, 5) == pytest.approx(
            _naive_qwk(preds.tolist(), targets.tolist(), 5)
        )


@pytest.mark.parametrize(
    ("preds", "targets", "expected"),
    [
        ([0, 1, 2], [0, 1, 2], 1.0),  # perfect
        ([2, 1, 0], [0, 1, 2], -1.0),  # fully reversed: sum(W*O) = 2, sum(W*E) = 1
        ([1, 1, 1], [1, 1, 1], 1.0),  # one class only: 0/0 in the formula, identical -> 1.0
        ([2, 2, 2], [0, 0, 0], 0.0),  # one class each, different: O equals E
    ],
)
def test_qwk_edge_cases(preds, targets, expected):
    assert quadratic_weighted_kappa(preds, targets, num_classes=3) == pytest.approx(expected)


def test_evaluate_predictions_from_logits():
    logits = torch.tensor(
        [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]
    )  # argmax = PREDS
    result = evaluate_predictions(logits, torch.tensor(TARGETS), num_classes=3)
    assert set(result) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "auroc_per_class", "auroc_note", "qwk",
                           "confusion", "per_class", "non_finite"} and result["non_finite"] == 0
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["qwk"] == pytest.approx(0.25)
    np.testing.assert_array_equal(result["confusion"], [[1, 1, 0], [0, 1, 1], [1, 0, 1]])


def test_per_class_scores_by_hand():
    # class 0: 1 right of 2 predicted, 2 true; class 1: 1 of 1 predicted, 2 true; class 2: 2 of 3, 2 true;
    # class 3 never occurs: every score 0.
    result = per_class_scores([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], num_classes=4)
    assert result["precision"] == pytest.approx([1 / 2, 1, 2 / 3, 0])
    assert result["recall"] == pytest.approx([1 / 2, 1 / 2, 1, 0])
    assert result["f1"] == pytest.approx([1 / 2, 2 / 3, 0.8, 0])
    assert result["support"] == [2, 2, 2, 0]


def test_evaluate_predictions_from_class_indices():
    result = evaluate_predictions(np.array(PREDS), np.array(TARGETS), num_classes=3)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["qwk"] == pytest.approx(0.25)


def test_evaluate_predictions_rejects_wrong_logit_width():
    with pytest.raises(ValueError, match=r"num_classes=4"):
        evaluate_predictions(torch.zeros(6, 3), TARGETS, num_classes=4)


@pytest.mark.parametrize(
    ("preds", "targets", "match"),
    [
        ([0, 1, 3], [0, 1, 2], r"preds must lie in \[0, 3\).*3"),
        ([0, 1, 2], [0, -1, 2], r"targets must lie in \[0, 3\)"),
        ([0, 1], [0, 1, 2], "same length"),
        ([], [], "empty"),
        ([0.0, 1.0, 2.0], [0, 1, 2], "integer class indices"),
    ],
)
def test_bad_input_rejected_with_clear_message(preds, targets, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(preds, targets, num_classes=3)


def test_accuracy_rejects_logits():
    with pytest.raises(ValueError, match="1-D"):
        accuracy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_non_finite_logits_count_as_wrong_and_are_left_out_of_kappa_and_confusion():
    nan, inf = float("nan"), float("inf")
    # Rows 0 and 3 are non-finite; their arg-max would be class 0, their target is 0: without the rule
    # they would count as correct.
    logits = torch.tensor([[nan, nan, nan], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [inf, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    result = evaluate_predictions(logits, targets, num_classes=3)
    assert result["non_finite"] == 2
    assert result["accuracy"] == 1 / 4  # only row 1 is a correct prediction
    expected_confusion = np.zeros((3, 3), dtype=np.int64)
    expected_confusion[1, 1] = expected_confusion[1, 2] = 1  # rows 1 and 2 only
    np.testing.assert_array_equal(result["confusion"], expected_confusion)
    all_nan = evaluate_predictions(torch.full((3, 3), nan), torch.tensor([0, 0, 0]), num_classes=3)
    assert all_nan["accuracy"] == 0.0 and all_nan["non_finite"] == 3 and np.isnan(all_nan["qwk"])


# A binary set whose AUROC is known by hand: positives score 0.9 0.8 0.7 0.4, negatives 0.6 0.5 0.3 0.2 0.1 0.05;
# of the 4 x 6 = 24 (positive, negative) pairs, the positive ranks higher in all but 0.4 < 0.6 and 0.4 < 0.5:
# AUROC = 22 / 24. Predicted class: score > 0.5 (class 1's logit log(p / (1 - p)) > 0).
POSITIVE, NEGATIVE = [0.9, 0.8, 0.7, 0.4], [0.6, 0.5, 0.3, 0.2, 0.1, 0.05]


def binary_case():
    p1 = torch.tensor(POSITIVE + NEGATIVE, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p1), torch.log(p1 / (1 - p1))], dim=1)  # softmax gives p1 back
    return logits, torch.tensor([1] * 4 + [0] * 6)


def naive_auroc(pos, neg):
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def naive_balanced_accuracy(preds, targets):
    classes = sorted(set(targets))
    return sum(sum(p == t == c for p, t in zip(preds, targets)) / targets.count(c) for c in classes) / len(classes)


def test_binary_auroc_and_balanced_accuracy_match_the_hand_case_and_scikit_learn():
    logits, targets = binary_case()
    result = evaluate_predictions(logits, targets, 2)
    assert result["auroc"] == pytest.approx(22 / 24) == naive_auroc(POSITIVE, NEGATIVE)
    assert result["auroc"] == pytest.approx(roc_auc_score(targets.numpy(), probabilities(logits)[:, 1]))
    # predictions (score > 0.5): positives 1 1 1 0, negatives 1 0 0 0 0 0 (0.5 is a tie: argmax picks class 0)
    preds = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert result["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets.numpy(), preds))
    assert result["macro_f1"] == pytest.approx(f1_score(targets.numpy(), preds, average="macro"))


def test_bootstrap_intervals_equal_a_bootstrap_written_here():
    """The resampling protocol: resample r draws rng.integers(0, N, N) of numpy's default_rng(seed); metrics
    computed here by hand; the interval is the 2.5th and 97.5th percentile over the resamples that define it."""
    logits, targets = binary_case()
    ours = bootstrap_intervals(logits, targets, 2, resamples=300, seed=7)
    scores = probabilities(logits)[:, 1].tolist()
    preds = [int(s > 0.5) for s in scores]
    rng = np.random.default_rng(7)
    aurocs, balanced = [], []
    for _ in range(300):
        idx = rng.integers(0, 10, 10)
        t, s, p = [int(targets[i]) for i in idx], [scores[i] for i in idx], [preds[i] for i in idx]
        balanced.append(naive_balanced_accuracy(p, t))
        if len(set(t)) == 2:
            aurocs.append(naive_auroc([x for x, y in zip(s, t) if y == 1], [x for x, y in zip(s, t) if y == 0]))
    assert ours["auroc"] == pytest.approx(np.percentile(aurocs, [2.5, 97.5]).tolist())
    assert ours["balanced_accuracy"] == pytest.approx(np.percentile(balanced, [2.5, 97.5]).tolist())
    assert ours["resamples_used"]["auroc"] == len(aurocs) < 300 == ours["resamples_used"]["balanced_accuracy"]
    assert ours["auroc"][0] < 22 / 24 <= ours["auroc"][1]
    assert bootstrap_intervals(logits, targets, 2, resamples=300, seed=7) == ours  # seeded


def test_bootstrap_by_group_resamples_whole_groups():
    """Two patients, each with every image of one class: a resample draws whole patients, so it holds one
    class in about half the resamples (AUROC undefined there), which a resampling of images would not."""
    logits, targets = binary_case()
    groups = ["a"] * 4 + ["b"] * 6
    by_group = bootstrap_intervals(logits, targets, 2, groups=groups, resamples=400, seed=0)
    assert by_group["by"] == "group" and 150 < by_group["resamples_used"]["auroc"] < 250
    assert bootstrap_intervals(logits, targets, 2, resamples=400, seed=0)["resamples_used"]["auroc"] > 390


def test_multiclass_auroc_is_the_one_vs_rest_macro_and_an_absent_class_is_named():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(30, 3)))
    targets = torch.tensor(rng.integers(0, 3, 30))
    logits[torch.arange(30), targets] += 1.0
    result = evaluate_predictions(logits, targets, 3)
    expected = roc_auc_score(targets.numpy(), probabilities(logits), multi_class="ovr", average="macro")
    assert result["auroc"] == pytest.approx(expected) and result["auroc_note"] is None
    # class 2 absent: no ROC curve for it, said so, and the macro mean over classes 0 and 1
    kept = targets != 2
    absent = auroc(probabilities(logits[kept]), targets[kept], 3)
    assert absent["auroc_per_class"][2] is None and "class(es) [2] without images in the set" in absent["auroc_note"]
    assert absent["auroc"] == pytest.approx(np.mean(absent["auroc_per_class"][:2]))
    one = auroc(probabilities(logits[targets == 0]), targets[targets == 0], 3)
    assert one["auroc"] is None and "fewer than two classes" in one["auroc_note"]


@pytest.mark.parametrize("num_classes", [2, 4])
def test_the_resampled_metrics_equal_scikit_learns_on_the_resample(num_classes):
    """The bootstrap's vectorized metrics on a resample (counts per image) equal scikit-learn's on that
    resample written out, with tied scores and a non-finite row."""
    from patchgd.metrics import _point_metrics, _Resampler

    rng = np.random.default_rng(num_classes)
    logits = np.round(rng.normal(size=(40, num_classes)), 1)  # rounded: tied scores
    logits[3] = np.nan
    targets = rng.integers(0, num_classes, 40)
    finite = np.isfinite(logits).all(axis=1)
    scores = probabilities(np.where(finite[:, None], logits, 0.0))
    resampled = _Resampler(scores, logits.argmax(axis=1), targets, finite, num_classes)
    for _ in range(5):
        idx = rng.integers(0, 40, 40)
        ours = resampled(np.bincount(idx, minlength=40).astype(float))
        theirs = _point_metrics(scores[idx], logits.argmax(axis=1)[idx], targets[idx], finite[idx], num_classes)
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert ours[name] == pytest.approx(theirs[name], abs=1e-12), name
