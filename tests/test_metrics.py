"""Tests for patchgd.metrics against hand-worked examples and a naive QWK formula."""

import numpy as np
import pytest
import torch

from patchgd.metrics import accuracy, confusion_matrix, evaluate_predictions, quadratic_weighted_kappa

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
    assert set(result) == {"accuracy", "qwk", "confusion", "non_finite"} and result["non_finite"] == 0
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["qwk"] == pytest.approx(0.25)
    np.testing.assert_array_equal(result["confusion"], [[1, 1, 0], [0, 1, 1], [1, 0, 1]])


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
