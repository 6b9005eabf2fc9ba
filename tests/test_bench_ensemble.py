"""The pure helpers of bench/ensemble_fashion.py: label flipping, scores, verdicts, the MAP@5 citation.

Known answers are worked by hand in the comments; the label-flipping test on the real long-tailed training set
needs ../shared/datasets/fashion-mnist and skips without it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def _bench():
    return importlib.import_module("bench.ensemble_fashion")


bench = _bench()


def test_flip_labels_flips_exactly_the_share_never_to_the_same_class():
    y = np.repeat(np.arange(10), 100)  # 1,000 labels, 100 per class
    noisy, flipped = bench.flip_labels(y, 10, 0.2, seed=0)
    assert len(flipped) == 200  # round(0.2 * 1000)
    assert len(np.unique(flipped)) == 200 and np.all(np.diff(flipped) > 0)  # distinct, sorted
    changed = np.flatnonzero(noisy != y)
    np.testing.assert_array_equal(changed, flipped)  # every flipped label changed, no other did
    assert noisy.min() >= 0 and noisy.max() <= 9
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 100))  # the input is not modified


def test_flip_labels_is_deterministic_per_seed():
    y = np.repeat(np.arange(10), 100)
    a, fa = bench.flip_labels(y, 10, 0.2, seed=0)
    b, fb = bench.flip_labels(y, 10, 0.2, seed=0)
    c, fc = bench.flip_labels(y, 10, 0.2, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)  # another seed picks other images


def test_flip_labels_edge_shares_and_two_classes():
    y = np.array([0, 1, 0, 1])
    noisy, flipped = bench.flip_labels(y, 2, 1.0, seed=3)
    np.testing.assert_array_equal(noisy, [1, 0, 1, 0])  # two classes: the other class is the only choice
    np.testing.assert_array_equal(flipped, [0, 1, 2, 3])
    noisy, flipped = bench.flip_labels(y, 2, 0.0, seed=3)
    np.testing.assert_array_equal(noisy, y)
    assert len(flipped) == 0
    _, flipped = bench.flip_labels(np.zeros(7, int), 3, 0.5, seed=0)
    assert len(flipped) == 4  # round(0.5 * 7) = round(3.5) = 4 (half to even)


def test_flip_labels_spreads_over_the_other_classes():
    # 9,000 labels of class 0, all flipped: each of the 9 other classes expects 1,000
    noisy, _ = bench.flip_labels(np.zeros(9000, int), 10, 1.0, seed=0)
    counts = np.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 900 and counts[1:].max() < 1100  # binomial sd ~31: 3 sd is ~95


def test_flip_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="share"):
        bench.flip_labels(np.array([0, 1]), 2, 1.5, seed=0)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        bench.flip_labels(np.array([0, 2]), 2, 0.5, seed=0)


def test_label_scores_by_hand():
    classes = ["Ankle_boot", "Bag", "Coat", "Sneaker"]
    y = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 1, 0, 0, 3, 2])
    # recalls: Ankle_boot 1/2, Bag 3/3, Coat 0/2, Sneaker 1/2; hits 1+3+0+1 = 5 of 9
    s = bench.label_scores(y, pred, classes)
    assert s["accuracy"] == pytest.approx(5 / 9)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.5) / 4)
    assert s["tail_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)  # Sneaker, Bag, Ankle_boot


def test_verdict():
    assert bench.verdict(0.01, 0.02) == "within seed noise (+1.0 pts)"
    assert bench.verdict(0.05, 0.02) == "yes (+5.0 pts)"
    assert bench.verdict(-0.05, 0.02) == "NO (-5.0 pts)"


def test_map5_citation_reads_the_embedder_sections(tmp_path):
    text = (
        "\n## Embedder re-identification on unseen individuals: lion\n\n| model | MAP@5 |\n|---|---|\n"
        "| trained, seed 42: x | 0.4000 | 1 |\n| trained, seed 1: x | 0.3000 | 1 |\n"
        "| trained, mean +- sd over the 2 seeds | 0.3500 +- 0.07 | 1 |\n"
        "| ensemble of the 2 seeds (`concat_embeddings`) | 0.3800 | 1 |\n"
        "\n## Something else\n\n| trained, seed 9: x | 0.9 | 1 |\n"
    )
    results = tmp_path / "RESULTS.md"
    results.write_text(text)
    lines = bench.map5_citation(results)
    # best seed 0.4 > ensemble 0.38; mean (0.4 + 0.3) / 2 = 0.35
    assert lines == ["lion: ensemble of 2 seeds MAP@5 0.3800 vs best single seed 0.4000 (mean 0.3500): "
                     "does NOT beat the best seed"]
    assert bench.map5_citation(tmp_path / "missing.md") == []


def test_flip_labels_on_the_long_tailed_training_set():
    folder = SHARED / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip(f"real-data test: ../shared/datasets not found ({folder})")
    cf = bench.cf
    _, labels = cf.load_split(folder, "train")
    y = labels[cf.long_tail_indices(labels, cf.long_tail_counts(600))].astype(int)
    assert len(y) == 1489
    noisy, flipped = bench.flip_labels(y, 10, bench.NOISE_SHARE, bench.NOISE_SEED)
    assert len(flipped) == 298  # round(0.2 * 1489) = round(297.8)
    assert np.all(noisy[flipped] != y[flipped])
    assert (noisy != y).sum() == 298
