"""Tests for common.lib.ensemble: accuracy weights, aligned ensembles, retrieval/classifier blends, soups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.lib import ensemble
from common.lib.averaging import average_state_dicts
from common.lib.ensemble import (
    accuracy_weights,
    align,
    blend_scores,
    ensemble_probs,
    greedy_soup,
    uniform_soup,
)


# ------------------------------------------------------------------------------------------ accuracy weights
def test_accuracy_weights_known_scores():
    # raw: (0.8 / 0.8) ** 25 = 1 and (0.9 / 0.8) ** 25 = 1.125 ** 25 = 19.0026
    raw = accuracy_weights([0.8, 0.9], 25, normalize=False)
    np.testing.assert_allclose(raw, [1.0, 19.0026015107], rtol=1e-10)
    # normalised: 1 / 20.0026 = 0.0499935, 19.0026 / 20.0026 = 0.9500065
    np.testing.assert_allclose(accuracy_weights([0.8, 0.9], 25), [0.0499934971, 0.9500065029], rtol=1e-9)


def test_accuracy_weights_factor_zero_is_plain_mean():
    # (s / min) ** 0 = 1 for every model -> 1/3 each
    np.testing.assert_allclose(accuracy_weights([0.7, 0.8, 0.9], factor=0), [1 / 3, 1 / 3, 1 / 3])


def test_accuracy_weights_reproduce_reference_log():
    # The 17 accuracies in the reference's pkl names (Reproduce.md, "testb-pkls") and the factors its
    # `tools/emsemble.py --factor 25 --scale` printed ("Adjusted factor is: [...]"), as sets (listdir order).
    accs = [7471, 7550, 7400, 7473, 7620, 7405, 7410, 7460, 7418, 7450, 7460, 7510, 7520, 7500, 7510, 7560,
            7570]
    printed = [2.080085996252569, 1.3987451430721878, 1.2237077021500773, 1.0626193781723274,
               1.1833516629706529, 1.0, 1.764428216037884, 1.0343373472253807, 1.446123660572264,
               1.7070722173927184, 1.2781492311812328, 1.269624858196828, 1.017029565305733,
               1.6515084398827093, 1.2237077021500773, 1.446123660572264, 1.495040719791741]
    got = accuracy_weights(accs, 25, normalize=False)
    np.testing.assert_allclose(np.sort(got), np.sort(printed), rtol=1e-12)
    assert got[accs.index(7620)] == pytest.approx(2.080085996252569)  # (7620 / 7400) ** 25


@pytest.mark.parametrize("scores, factor", [([0.8, 0.0], 25), ([0.8, -0.1], 25), ([0.8, np.nan], 25),
                                            ([], 25), ([0.8, 0.9], -1)])
def test_accuracy_weights_rejects_bad_input(scores, factor):
    with pytest.raises(ValueError, match="accuracy_weights"):
        accuracy_weights(scores, factor)


# ------------------------------------------------------------------------------------------ ensemble_probs
A = np.array([[0.6, 0.4],   # image a: x, y
              [0.2, 0.8]])  # image b
B = np.array([[0.7, 0.3],   # image b: y, x   (rows and columns in another order)
              [0.1, 0.9]])  # image a: y, x


def test_ensemble_probs_aligns_rows_and_columns():
    out, images, classes = ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x"]],
                                          weights=[1, 3])
    assert images == ["a", "b"] and classes == ["x", "y"]
    # weights [1, 3] -> [0.25, 0.75]; B aligned: a = [x 0.9, y 0.1], b = [x 0.3, y 0.7]
    expected = [[0.25 * 0.6 + 0.75 * 0.9, 0.25 * 0.4 + 0.75 * 0.1],   # a: 0.825, 0.175
                [0.25 * 0.2 + 0.75 * 0.3, 0.25 * 0.8 + 0.75 * 0.7]]   # b: 0.275, 0.725
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(out.sum(axis=1), [1.0, 1.0])
    assert out.dtype == np.float64
    out32, _, _ = ensemble_probs([A.astype(np.float32), B.astype(np.float32)], [["a", "b"], ["b", "a"]],
                                 [["x", "y"], ["y", "x"]], weights=[1, 3])
    assert out32.dtype == np.float32  # float32 inputs (stage 05's) stay float32
    np.testing.assert_allclose(out32, expected, rtol=1e-6)


def test_ensemble_probs_equal_weights_and_reference_rescale():
    plain, _, _ = ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x"]])
    np.testing.assert_allclose(plain, [[(0.6 + 0.9) / 2, (0.4 + 0.1) / 2],
                                       [(0.2 + 0.3) / 2, (0.8 + 0.7) / 2]])
    # rescale=True: sum_i w_i * p_i / n with raw w = [1, 3] -> 0.5 * A + 1.5 * B = 2 x the normalised mean
    scaled, _, _ = ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x"]],
                                  weights=[1, 3], rescale=True)
    np.testing.assert_allclose(scaled, [[0.5 * 0.6 + 1.5 * 0.9, 0.5 * 0.4 + 1.5 * 0.1],
                                        [0.5 * 0.2 + 1.5 * 0.3, 0.5 * 0.8 + 1.5 * 0.7]])
    normal, _, _ = ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x"]], weights=[1, 3])
    np.testing.assert_allclose(scaled, 2 * normal)
    assert (scaled.argmax(1) == normal.argmax(1)).all()


def test_ensemble_probs_errors_name_both_sources():
    names = ["run1/test.npz", "run0/test.npz"]
    # model 1 (run1) has image 'c' where model 0 (run0) has 'b'
    with pytest.raises(ValueError, match=r"run1/test.npz and run0/test.npz have different images: 1 only in "
                                         r"run1/test.npz, 1 only in run0/test.npz; e.g. 'c' is only in "
                                         r"run1/test.npz, 'b' is only in run0/test.npz"):
        ensemble_probs([A, B], [["a", "b"], ["c", "a"]], [["x", "y"], ["y", "x"]], names=names[::-1])
    with pytest.raises(ValueError, match=r"run1/test.npz and run0/test.npz have different classes.*'z'"):
        ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["z", "x"]], names=names[::-1])
    with pytest.raises(ValueError, match="image 'a' repeated"):
        ensemble_probs([A, B], [["a", "b"], ["a", "a"]], [["x", "y"], ["y", "x"]])
    with pytest.raises(ValueError, match=r"model 1: array of shape \(2, 2\) for 2 images x 3 classes"):
        ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x", "z"]])
    with pytest.raises(ValueError, match="weights"):
        ensemble_probs([A, B], [["a", "b"], ["b", "a"]], [["x", "y"], ["y", "x"]], weights=[1])
    with pytest.raises(ValueError, match="not finite"):
        ensemble_probs([A, np.array([[np.nan, 0.3], [0.1, 0.9]])], [["a", "b"], ["b", "a"]],
                       [["x", "y"], ["y", "x"]])


def test_align_is_a_pure_reorder():
    got = align(B, ["b", "a"], ["y", "x"], ["a", "b"], ["x", "y"])
    np.testing.assert_array_equal(got, [[0.9, 0.1], [0.3, 0.7]])


# ------------------------------------------------------------------------------------------ blend_scores
RETRIEVAL = pd.DataFrame([("q1", "A", 0.8), ("q1", "B", 0.6), ("q1", "D", 0.3), ("q2", "B", 0.5)],
                         columns=["image", "individual_id", "score"])
CLF_IMAGES, CLF_CLASSES = ["q2", "q1"], ["A", "B", "C"]
CLF = np.array([[0.1, 0.2, 0.7],   # q2
                [0.7, 0.2, 0.1]])  # q1


def rows(df: pd.DataFrame) -> list[tuple[str, str, float]]:
    return [(i, c, round(float(s), 10)) for i, c, s in df.itertuples(index=False)]


def test_blend_scores_hand_computed():
    out = blend_scores(RETRIEVAL, CLF, CLF_IMAGES, CLF_CLASSES, ratio=0.25, class_top_k=1)
    assert rows(out) == [
        ("q1", "A", 0.775),  # 0.75 * 0.8 + 0.25 * 0.7
        ("q1", "B", 0.5),    # 0.75 * 0.6 + 0.25 * 0.2
        ("q1", "D", 0.25),   # D is no classifier class: q1's lowest classifier score 0.1 -> 0.225 + 0.025
        ("q2", "C", 0.55),   # classifier top-1 added; retrieval fill = q2's lowest score 0.5 -> 0.375 + 0.175
        ("q2", "B", 0.425),  # 0.75 * 0.5 + 0.25 * 0.2
    ]


def test_blend_scores_ratio_zero_is_retrieval_alone():
    out = blend_scores(RETRIEVAL, CLF, CLF_IMAGES, CLF_CLASSES, ratio=0.0)
    expected = RETRIEVAL.sort_values(["image", "score"], ascending=[True, False], ignore_index=True)
    assert rows(out) == rows(expected)


def test_blend_scores_logits_divided_by_arcface_scale():
    logits = 30.0 * np.array([[0.1, 0.2, 0.7], [0.8, 0.2, 0.1]])  # s * cos with s = 30
    out = blend_scores(RETRIEVAL, logits, CLF_IMAGES, CLF_CLASSES, ratio=0.5, kind="logit", logit_scale=30.0,
                       class_top_k=0)
    got = {(i, c): s for i, c, s in rows(out)}
    assert got[("q1", "A")] == pytest.approx(0.5 * 0.8 + 0.5 * 0.8)  # cos to A's centre = 24 / 30 = 0.8
    assert got[("q2", "B")] == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)  # 6 / 30 = 0.2


def test_blend_scores_errors():
    with pytest.raises(ValueError, match="pass logits with kind='logit'"):
        blend_scores(RETRIEVAL, CLF * 10, CLF_IMAGES, CLF_CLASSES, ratio=0.5)
    with pytest.raises(ValueError, match="retrieval table and classifier have different images.*"
                                         "'q3' is only in classifier"):
        blend_scores(RETRIEVAL, CLF, ["q3", "q1"], CLF_CLASSES, ratio=0.5)
    with pytest.raises(ValueError, match="no retrieval individual is a classifier class"):
        blend_scores(RETRIEVAL, CLF, CLF_IMAGES, ["humpback", "beluga", "orca"], ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        blend_scores(RETRIEVAL, CLF, CLF_IMAGES, CLF_CLASSES, ratio=1.5)


# ------------------------------------------------------------------------------------------------ soups
def sd(w: float, n: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([w, 2 * w], dtype=torch.float32), "n": torch.tensor(n)}


def test_uniform_soup_is_the_mean_and_reuses_average_state_dicts(monkeypatch):
    got = uniform_soup([sd(1.0, 3), sd(3.0, 5)])
    torch.testing.assert_close(got["w"], torch.tensor([2.0, 4.0]))  # ([1, 2] + [3, 6]) / 2
    assert int(got["n"]) == 5  # integer tensors come from the last state (average_state_dicts' rule)
    three = [sd(1.0, 1), sd(2.0, 2), sd(6.0, 3)]
    torch.testing.assert_close(uniform_soup(three), average_state_dicts(three))  # w = (1 + 2 + 6) / 3 = 3
    calls = []
    monkeypatch.setattr(ensemble, "average_state_dicts", lambda s, w=None: calls.append(len(s)) or {})
    uniform_soup([sd(1.0), sd(2.0), sd(3.0)])
    assert calls == [3]


# scripted validation scores, looked up by the soup's first weight w (the soup of w_i's has w = mean w_i)
SCRIPT = {1.0: 0.70, 3.0: 0.80, 5.0: 0.75, 11.0: 0.60, 2.0: 0.78, 4.0: 0.82, round(19 / 3, 4): 0.82}


def scripted(calls: list[float]):
    def evaluate(state: dict) -> float:
        w = round(float(state["w"][0]), 4)
        calls.append(w)
        return SCRIPT[w]
    return evaluate


def test_greedy_soup_keeps_what_does_not_hurt():
    calls: list[float] = []
    states = [sd(1.0), sd(3.0), sd(5.0), sd(11.0)]
    soup, kept, steps = greedy_soup(states, scripted(calls), names=["A", "B", "C", "D"])
    # own scores A .70, B .80, C .75, D .60 -> order B, C, A, D
    # B alone .80; B+C: w = 4 -> .82 >= .80 kept; B+C+A: w = 3 -> .80 < .82 dropped;
    # B+C+D: w = (3 + 5 + 11) / 3 = 6.333 -> .82 >= .82 kept (a tie does not drop)
    assert kept == ["B", "C", "D"]
    assert steps["candidate"].tolist() == ["B", "C", "A", "D"]
    assert steps["kept"].tolist() == [True, True, False, True]
    np.testing.assert_allclose(steps["soup_score"], [0.80, 0.82, 0.80, 0.82])
    np.testing.assert_allclose(steps["best_score"], [0.80, 0.82, 0.82, 0.82])
    torch.testing.assert_close(soup["w"], torch.tensor([19 / 3, 38 / 3]))
    assert len(calls) == 4 + 3  # each candidate once, then one soup per later candidate


def test_greedy_soup_with_known_scores_and_ties():
    calls: list[float] = []
    # A and C tie at .7: input order decides, so the order is B, A, C
    _, kept, steps = greedy_soup([sd(1.0), sd(3.0), sd(5.0)], scripted(calls), names=["A", "B", "C"],
                                 scores=[0.7, 0.9, 0.7])
    assert steps["candidate"].tolist() == ["B", "A", "C"]
    assert calls == [2.0, 4.0]  # no individual evaluations; B+A: w = 2 -> .78 < .9 dropped
    # B+C: w = 4 -> .82 < .9 dropped too: the soup stays B alone
    assert kept == ["B"]
    assert steps["kept"].tolist() == [True, False, False]


def test_greedy_soup_rejects_nan_scores_and_bad_names():
    with pytest.raises(ValueError, match="evaluate returned nan"):
        greedy_soup([sd(1.0), sd(3.0)], lambda s: float("nan"))
    with pytest.raises(ValueError, match="distinct names"):
        greedy_soup([sd(1.0), sd(3.0)], lambda s: 1.0, names=["a", "a"])
