"""Tests for common.lib.sampling: class-balanced weights by hand; the sampler's determinism and frequencies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lib.sampling import ClassBalancedSampler, class_balanced_weights

# ------------------------------------------------------------------------------------- class_balanced_weights
LABELS = [0, 0, 0, 0, 1]  # class 0 has 4 images, class 1 has 1


def test_class_balanced_weights_power_one():
    got = class_balanced_weights(LABELS)
    # n^-1: 1/4 for each class-0 image, 1 for the class-1 image; total 4 * 1/4 + 1 = 2 -> divide by 2
    np.testing.assert_allclose(got, [0.125, 0.125, 0.125, 0.125, 0.5])
    assert got.dtype == np.float64
    assert got[:4].sum() == pytest.approx(got[4])  # each class gets half of the mass


def test_class_balanced_weights_power_zero_is_uniform():
    np.testing.assert_allclose(class_balanced_weights(LABELS, power=0.0), [0.2] * 5)  # n^0 = 1 each, 5 images


def test_class_balanced_weights_square_root():
    got = class_balanced_weights(LABELS, power=0.5)
    # n^-0.5: 4^-0.5 = 1/2 per class-0 image, 1 for class 1; total 4 * 1/2 + 1 = 3
    np.testing.assert_allclose(got, [1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 3])
    # class shares go as sqrt(n): class 0 gets 2/3 = sqrt(4) / (sqrt(4) + sqrt(1))
    assert got[:4].sum() == pytest.approx(2 / 3)


def test_class_balanced_weights_any_label_type_and_order():
    # string ids (individual_id), interleaved: weights follow each row's own class
    got = class_balanced_weights(np.array(["b", "a", "b", "b", "b"]))
    np.testing.assert_allclose(got, [0.125, 0.5, 0.125, 0.125, 0.125])
    np.testing.assert_allclose(class_balanced_weights(torch.tensor([1, 0, 1, 1, 1])), got)


def test_class_balanced_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        class_balanced_weights([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        class_balanced_weights([[0, 1]])
    with pytest.raises(ValueError, match="power"):
        class_balanced_weights(LABELS, power=-1.0)


# --------------------------------------------------------------------------------------- ClassBalancedSampler
def test_sampler_length_and_range():
    sampler = ClassBalancedSampler(LABELS)
    assert len(sampler) == 5 and len(list(sampler)) == 5  # num_samples defaults to len(labels)
    sampler = ClassBalancedSampler(LABELS, num_samples=12)
    drawn = list(sampler)
    assert len(sampler) == 12 and len(drawn) == 12
    assert all(isinstance(i, int) and 0 <= i < 5 for i in drawn)
    with pytest.raises(ValueError, match="num_samples"):
        ClassBalancedSampler(LABELS, num_samples=0)


def test_sampler_deterministic_per_seed_and_epoch():
    labels = np.repeat(np.arange(10), np.arange(1, 11))  # 55 items, classes of 1..10 images
    a = ClassBalancedSampler(labels, num_samples=200, seed=7)
    b = ClassBalancedSampler(labels, num_samples=200, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b)  # a resumed run (fresh sampler, same seed and epoch) draws the same indices
    assert first == list(a)  # iterating again within the epoch repeats it
    a.set_epoch(4)
    assert list(a) != first  # another epoch, other draws
    c = ClassBalancedSampler(labels, num_samples=200, seed=8)
    c.set_epoch(3)
    assert list(c) != first  # another seed, other draws


def test_sampler_class_frequencies_are_balanced():
    # Classes of 1000, 100 and 10 images (a 100:1 imbalance); 30,000 draws with a fixed seed.
    # With power 1 each class has p = 1/3: a class count is Binomial(30000, 1/3), standard deviation
    # sqrt(30000 * 1/3 * 2/3) = 81.6 draws = 0.27 % of the draws. The tolerance of 1.4 % is ~5 sd: a correct
    # sampler fails it with probability ~1e-6, while unweighted sampling (p = 0.90 / 0.09 / 0.009) misses by
    # 30 %.
    labels = np.repeat([0, 1, 2], [1000, 100, 10])
    sampler = ClassBalancedSampler(labels, num_samples=30_000, seed=0)
    drawn = np.array(list(sampler))
    freq = np.bincount(labels[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(freq, [1 / 3, 1 / 3, 1 / 3], atol=0.014)
    # Within a class every image is equally likely: each of class 2's 10 images expects 1000 draws,
    # sd sqrt(30000 * (1/30) * (29/30)) = 31; 5 sd = 160.
    per_item = np.bincount(drawn[labels[drawn] == 2] - 1100, minlength=10)
    np.testing.assert_allclose(per_item, np.full(10, 1000), atol=160)


def test_sampler_square_root_frequencies():
    # power 0.5: class share ~ n * n^-0.5 = sqrt(n): sqrt(1000), sqrt(100), sqrt(10) = 31.6, 10, 3.16,
    # i.e. 0.704 / 0.223 / 0.070. sd of each share <= sqrt(0.25 / 30000) = 0.0029; atol 0.014 is ~5 sd.
    labels = np.repeat([0, 1, 2], [1000, 100, 10])
    drawn = np.array(list(ClassBalancedSampler(labels, power=0.5, num_samples=30_000, seed=1)))
    freq = np.bincount(labels[drawn], minlength=3) / len(drawn)
    root = np.sqrt([1000, 100, 10])
    np.testing.assert_allclose(freq, root / root.sum(), atol=0.014)


def test_sampler_is_torchs_weighted_sampler_with_the_earlier_draws():
    """The draws are WeightedRandomSampler's; they equal those of the hand-written sampler this replaced (the
    same torch.multinomial on the same generator), so runs made before keep their sample order."""
    sampler = ClassBalancedSampler([0, 0, 0, 1, 2, 2], power=0.5, num_samples=10, seed=3)
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and sampler.replacement
    sampler.set_epoch(2)
    assert list(sampler) == [5, 1, 3, 3, 4, 1, 3, 4, 5, 3]  # recorded from the hand-written sampler
    # weights: class sizes 3, 1, 2 -> n ** -0.5 = 0.577, 1, 0.707 per image; their sum 3 * 0.577 + 1 + 2 * 0.707
    # = 4.146
    np.testing.assert_allclose(sampler.weights.numpy(), np.array([3, 3, 3, 1, 2, 2]) ** -0.5 / 4.1463, rtol=1e-4)
