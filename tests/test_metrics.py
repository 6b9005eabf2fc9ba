"""MAP@k against Kaggle's reference ``apk``/``mapk`` and hand-computed cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from common.lib.metrics import map5_report, map_at_k, reciprocal_ranks


# Reference: Kaggle's average precision at k, copied in spirit from
# https://github.com/benhamner/Metrics/blob/master/Python/ml_metrics/average_precision.py (used by the
# Happywhale evaluation page). Test-only: the project's code must agree with it.
def apk(actual: list[str], predicted: list[str], k: int = 10) -> float:
    if len(predicted) > k:
        predicted = predicted[:k]
    score, num_hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            num_hits += 1.0
            score += num_hits / (i + 1.0)
    if not actual:
        return 0.0
    return score / min(len(actual), k)


def mapk(actual: list[list[str]], predicted: list[list[str]], k: int = 10) -> float:
    return float(np.mean([apk(a, p, k) for a, p in zip(actual, predicted, strict=True)]))


def test_hand_cases():
    truth = ["a", "b", "c", "d", "e", "f", "g"]
    preds = [
        ["a", "x", "y", "z", "w"],  # right at rank 1 -> 1
        ["x", "y", "b", "z", "w"],  # rank 3 -> 1/3
        ["x", "y", "z", "w", "v", "c"],  # rank 6, beyond k=5 -> 0
        ["x", "y"],  # short row, truth absent -> 0
        [],  # empty row -> 0
        ["x", "f", "f"],  # rank 2; the duplicate cannot score again -> 1/2
        ["x", "x", "g"],  # duplicates before the truth still take ranks -> 1/3
    ]
    expected = [1, 1 / 3, 0, 0, 0, 1 / 2, 1 / 3]
    np.testing.assert_allclose(reciprocal_ranks(truth, preds, k=5), expected)
    assert map_at_k(truth, preds, k=5) == pytest.approx(np.mean(expected))
    assert map_at_k(truth, preds, k=5) == pytest.approx(mapk([[t] for t in truth], preds, k=5))
    # k=1 is top-1 accuracy: only row 0 is right at rank 1.
    assert map_at_k(truth, preds, k=1) == pytest.approx(1 / 7)


def test_space_separated_strings_are_rows():
    # Submission rows are strings: "b a" has "a" at rank 2, "new_individual c" has it at rank 1.
    assert map_at_k(["a", "new_individual"], ["b a", "new_individual c"]) == pytest.approx((0.5 + 1) / 2)


def test_random_cases_agree_with_reference():
    rng = random.Random(0)
    alphabet = list("abcdefgh")
    for _ in range(50):
        n = rng.randint(1, 30)
        truth = [rng.choice(alphabet) for _ in range(n)]
        # rows of 0..8 labels drawn with replacement: short rows, duplicates, truth beyond k all occur
        preds = [[rng.choice(alphabet) for _ in range(rng.randint(0, 8))] for _ in range(n)]
        for k in (1, 3, 5):
            assert map_at_k(truth, preds, k) == pytest.approx(mapk([[t] for t in truth], preds, k))


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="truth has 2 rows but predictions has 1"):
        map_at_k(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="k must be >= 1"):
        map_at_k(["a"], [["a"]], k=0)
    with pytest.raises(ValueError, match="no images"):
        map_at_k([], [])
    with pytest.raises(TypeError, match="not a single string"):
        map_at_k("ab", [["a"], ["b"]])


def test_map5_report_splits_known_and_new():
    known = {"a", "b"}
    truth = ["a", "b", "c", "new_individual"]
    preds = [
        ["a", "new_individual"],  # known a at rank 1 -> 1
        ["new_individual", "a", "b"],  # known b at rank 3 -> 1/3
        ["new_individual", "a"],  # c is unseen -> truth becomes new_individual, rank 1 -> 1
        ["a", "b", "new_individual"],  # new at rank 3 -> 1/3
    ]
    rep = map5_report(truth, preds, known)
    assert rep["n"] == 4 and rep["n_known"] == 2 and rep["n_new"] == 2
    assert rep["map5"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 3) / 4)
    assert rep["map5_known"] == pytest.approx((1 + 1 / 3) / 2)
    assert rep["map5_new"] == pytest.approx((1 + 1 / 3) / 2)
    assert rep["top1"] == pytest.approx(2 / 4)  # rows 0 and 2


def test_map5_report_none_when_a_group_is_empty():
    rep = map5_report(["a", "b"], [["a"], ["x", "b"]], known={"a", "b"})
    assert rep["map5_new"] is None and rep["n_new"] == 0
    assert rep["map5_known"] == pytest.approx(0.75)
    rep = map5_report(["z"], [["new_individual"]], known={"a"})
    assert rep["map5_known"] is None and rep["map5_new"] == 1.0


def test_classification_report_by_hand_and_against_scikit_learn():
    from common.lib.metrics import classification_report

    # 3 classes; rows: truth, argmax -> hit?  (0,0) y, (0,1) n, (1,1) y, (2,2) y, (2,0) n
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    truth = np.array([0, 0, 1, 2, 2])
    rep = classification_report(truth, scores, n_classes=4)  # class 3 never occurs
    assert rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["per_class_recall"] == [0.5, 1.0, 0.5, None]
    assert rep["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)  # classes present only
    assert rep["top5"] == 1.0  # with 4 classes, every truth is in the top 4
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=300)
    s = rng.random((300, 7))
    rep = classification_report(y, s)
    assert rep["accuracy"] == pytest.approx(sk.accuracy_score(y, s.argmax(1)))
    assert rep["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, s.argmax(1)))
    assert rep["top5"] == pytest.approx(sk.top_k_accuracy_score(y, s, k=5, labels=np.arange(7)))
    with pytest.raises(ValueError, match="labels must be in 0..6"):
        classification_report(np.array([7]), s[:1])
