"""common.lib.probe: the linear probe against a hand-solved case and against scikit-learn's logistic regression
(a reference used only here), the rows of classes without training images, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import softmax

from common.lib.probe import fit_linear_probe


def test_two_symmetric_points_solve_the_scalar_optimality_condition():
    # x = -1 (class 0) and x = +1 (class 1): already standardised. By symmetry w1 = -w0 = a and b0 = b1, so the
    # objective is log(1 + exp(-2a)) + l2 * a^2, whose minimum solves sigmoid(-2a) = l2 * a.
    l2 = 0.1
    a = brentq(lambda t: 1.0 / (1.0 + np.exp(2 * t)) - l2 * t, 0.0, 100.0)
    probe = fit_linear_probe(np.array([[-1.0], [1.0]]), np.array([0, 1]), 2, l2=l2)
    np.testing.assert_allclose(probe.weight[:, 0], [-a, a], atol=1e-5)
    np.testing.assert_allclose(probe.bias, [0.0, 0.0], atol=1e-6)
    assert probe.train_accuracy == 1.0 and probe.converged


def test_matches_scikit_learn_logistic_regression_in_raw_feature_units():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    n, l2 = 240, 0.05
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 12)) * rng.uniform(0.5, 4.0, 12) + rng.normal(size=12) * 5
    x[:, :4] += 1.5 * np.eye(4)[y]  # some signal, scales and offsets differ per feature
    probe = fit_linear_probe(x, y, 4, l2=l2)
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10_000).fit(scaler.transform(x), y)
    x_new = rng.normal(size=(50, 12)) * 3  # the folded standardisation must hold off the training rows too
    np.testing.assert_allclose(softmax(x_new @ probe.weight.T + probe.bias, axis=1),
                               ref.predict_proba(scaler.transform(x_new)), atol=1e-4)
    assert probe.train_accuracy == pytest.approx(ref.score(scaler.transform(x), y))


def test_a_class_without_rows_gets_a_zero_row_below_every_training_rows_best():
    rng = np.random.default_rng(1)
    y = np.array([0, 0, 0, 2, 2, 2, 3, 3, 3])
    x = rng.normal(size=(9, 3)) + np.eye(4)[y][:, [0, 2, 3]] * 3
    probe = fit_linear_probe(x, y, 5, l2=0.01)
    assert not probe.weight[[1, 4]].any()
    logits = x @ probe.weight.T + probe.bias
    assert (logits[:, [1, 4]].max(1) < logits[:, [0, 2, 3]].max(1)).all()
    assert probe.weight.dtype == np.float32 and probe.weight.shape == (5, 3) and probe.bias.shape == (5,)


def test_one_class_leaves_the_zero_head_and_a_constant_feature_is_harmless():
    x = np.c_[np.arange(4.0), np.ones(4)]
    probe = fit_linear_probe(x, np.array([1, 1, 1, 1]), 3, l2=0.1)
    assert not probe.weight.any() and probe.train_accuracy == 1.0
    two = fit_linear_probe(x, np.array([0, 0, 1, 1]), 2, l2=0.1)
    assert np.isfinite(two.weight).all() and two.weight[:, 1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("features, labels, kwargs, match", [
    (np.zeros((3, 2)), np.array([0, 1]), {}, "do not match"),
    (np.zeros((0, 2)), np.zeros(0, dtype=int), {}, "no training rows"),
    (np.zeros((2, 2)), np.array([0, 1]), {"l2": 0.0}, "l2=0.0 must be > 0"),
    (np.zeros((2, 2)), np.array([0, 2]), {}, r"labels must be in \[0, 2\)"),
])
def test_bad_input_is_refused(features, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_linear_probe(features, labels, 2, **kwargs)
