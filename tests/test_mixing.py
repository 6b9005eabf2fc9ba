"""Tests for common.lib.mixing: one-hot targets, the CutMix box, CutMix/Mixup on hand-built batches, the mixer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lib.mixing import BatchMixer, cutmix, cutmix_box, mixup, one_hot


def const_batch(n: int, h: int = 4, w: int = 5) -> torch.Tensor:
    """``(n, 2, h, w)`` float64 images; image i, channel c is filled with ``10 * i + c``."""
    vals = torch.tensor([[10.0 * i + c for c in range(2)] for i in range(n)], dtype=torch.float64)
    return vals[:, :, None, None].expand(n, 2, h, w).clone()


# ------------------------------------------------------------------------------------------------ one_hot
def test_one_hot_plain_and_smoothed():
    np.testing.assert_array_equal(one_hot([0, 2], 3).numpy(), [[1, 0, 0], [0, 0, 1]])
    got = one_hot(torch.tensor([0, 2]), 3, smoothing=0.3)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    expected = [
        [0.8, 0.1, 0.1],  # off = 0.3 / 3 = 0.1; on = 1 - 0.3 + 0.1 = 0.8
        [0.1, 0.1, 0.8],
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), [1.0, 1.0], rtol=1e-6)


def test_one_hot_rejects_bad_labels():
    with pytest.raises(ValueError, match="label 3 at row 1"):
        one_hot([0, 3], 3)
    with pytest.raises(ValueError, match="integer"):
        one_hot(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="smoothing"):
        one_hot([0], 3, smoothing=1.0)


# --------------------------------------------------------------------------------------------- cutmix_box
def test_cutmix_box_inside():
    # lam 0.75: side ratio sqrt(0.25) = 0.5 -> a 5x5 box; odd side: 2 pixels before the centre, 3 from it on
    assert cutmix_box(10, 10, 0.75, 5, 5) == (3, 8, 3, 8)  # area 25 = (1 - 0.75) * 100
    # non-square 8x12: box 4x6 (same aspect) centred at (4, 6): rows 2:6, columns 3:9, area 24 = 0.25 * 96
    assert cutmix_box(8, 12, 0.75, 4, 6) == (2, 6, 3, 9)
    # lam 0.91: 10 * sqrt(1 - 0.91) is 2.999... in floats; the side must still be round(3.0) = 3, not 2
    y0, y1, x0, x1 = cutmix_box(10, 10, 0.91, 5, 5)
    assert (y1 - y0, x1 - x0) == (3, 3)
    # lam 0: the whole image; lam 1: an empty box
    assert cutmix_box(10, 10, 0.0, 5, 5) == (0, 10, 0, 10)
    y0, y1, x0, x1 = cutmix_box(10, 10, 1.0, 5, 5)
    assert (y1 - y0) * (x1 - x0) == 0


def test_cutmix_box_clipped_at_corner_and_lam_recomputed():
    # 5x5 box centred at (0, 9): rows -2:3 -> 0:3, columns 7:12 -> 7:10; 3x3 = 9 pixels are left
    box = cutmix_box(10, 10, 0.75, 0, 9)
    assert box == (0, 3, 7, 10)
    x, t = const_batch(2, 10, 10), one_hot([0, 1], 2)
    _, _, lam = cutmix(x, t, [1, 0], box)
    assert lam == pytest.approx(1 - 9 / 100)  # 0.91, not the 0.75 asked for


def test_cutmix_box_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        cutmix_box(10, 10, 0.5, 10, 0)
    with pytest.raises(ValueError, match="lam"):
        cutmix_box(10, 10, 1.5, 5, 5)


# ------------------------------------------------------------------------------------------ cutmix, mixup
def test_cutmix_pastes_exactly_the_box_and_mixes_targets_by_area():
    x = const_batch(3)  # 3 images, 4x5
    before = x.clone()
    targets = one_hot([0, 1, 2], 3)
    perm = torch.tensor([2, 0, 1])  # image 0 takes from 2, 1 from 0, 2 from 1
    box = (1, 3, 2, 5)  # rows 1:3, columns 2:5 -> 2 * 3 = 6 of 20 pixels
    out, mixed, lam = cutmix(x, targets, perm, box)
    assert lam == pytest.approx(1 - 6 / 20)  # 0.7
    inside = torch.zeros(4, 5, dtype=torch.bool)
    inside[1:3, 2:5] = True
    for i, j in enumerate(perm.tolist()):
        for c in range(2):
            assert torch.all(out[i, c][inside] == 10 * j + c)  # pasted from the partner
            assert torch.all(out[i, c][~inside] == 10 * i + c)  # untouched
    expected = [
        [0.7, 0.0, 0.3],  # image 0: 0.7 of class 0, 0.3 of its partner's class 2
        [0.3, 0.7, 0.0],  # image 1: partner 0
        [0.0, 0.3, 0.7],  # image 2: partner 1
    ]
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6)
    assert torch.equal(x, before)  # the input batch is not modified


def test_mixup_matches_manual_blend():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2, generator=gen)
    targets = one_hot([0, 1, 2, 1], 3, smoothing=0.1)
    perm = torch.tensor([3, 2, 1, 0])
    lam = 0.3
    out, mixed = mixup(x, targets, perm, lam)
    torch.testing.assert_close(out, 0.3 * x + 0.7 * x[perm])
    torch.testing.assert_close(mixed, 0.3 * targets + 0.7 * targets[perm])
    # row 0 by hand: 0.3 * [0.9333, 0.0333, 0.0333] + 0.7 * [0.0333, 0.9333, 0.0333] (partner 3 is class 1)
    row0 = [0.3 * 0.9 + 0.1 / 3, 0.7 * 0.9 + 0.1 / 3, 0.1 / 3]  # on = 0.9 + 0.1/3 is split 0.3 / 0.7
    np.testing.assert_allclose(mixed[0].numpy(), row0, rtol=1e-6)


def test_mix_rejects_integer_targets_and_bad_perm():
    x = const_batch(2)
    with pytest.raises(ValueError, match="one_hot"):
        mixup(x, torch.tensor([0, 1]), [1, 0], 0.5)
    with pytest.raises(ValueError, match="perm"):
        mixup(x, one_hot([0, 1], 2), [1, 0, 2], 0.5)
    with pytest.raises(ValueError, match="outside"):
        cutmix(x, one_hot([0, 1], 2), [1, 2], (0, 1, 0, 1))


# ------------------------------------------------------------------------------------------------ BatchMixer
def test_batch_mixer_disabled_returns_inputs_unchanged():
    mixer = BatchMixer()  # both alphas 0
    assert not mixer.enabled
    x, t = const_batch(4), one_hot([0, 1, 2, 3], 4)
    out_x, out_t = mixer(x, t)
    assert out_x is x and out_t is t


def test_batch_mixer_prob_zero_never_mixes():
    mixer = BatchMixer(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)
    assert not mixer.enabled
    x, t = const_batch(4), one_hot([0, 1, 2, 3], 4)
    for _ in range(20):
        out_x, out_t = mixer(x, t)
        assert out_x is x and out_t is t


def class_values(n: int) -> torch.Tensor:
    """Mean pixel value of image i in ``const_batch``: channels 10i and 10i + 1 -> 10i + 0.5."""
    return torch.arange(n, dtype=torch.float64) * 10 + 0.5


@pytest.mark.parametrize(
    ("mixup_alpha", "cutmix_alpha", "switch_prob"),
    [(1.0, 0.0, 0.5), (0.0, 1.0, 0.5), (0.4, 1.0, 0.5)],
)
def test_batch_mixer_targets_match_pixels(mixup_alpha, cutmix_alpha, switch_prob):
    # With image i filled with 10i (+ channel), both Mixup and CutMix make the mean pixel of mixed image i
    # equal to sum_c target[i, c] * (10c + 0.5): the targets must say how much of each image the pixels hold.
    n = 6
    mixer = BatchMixer(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, seed=1)
    x, t = const_batch(n, 8, 8), one_hot(list(range(n)), n).double()
    mixed_any = False
    for epoch in range(5):
        mixer.set_epoch(epoch)
        out_x, out_t = mixer(x, t)
        np.testing.assert_allclose(out_t.sum(1).numpy(), np.ones(n), rtol=1e-12)  # still probabilities
        assert torch.all(out_t >= 0)
        pixel_mean = out_x.mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(pixel_mean, (out_t @ class_values(n)).numpy(), rtol=1e-9)
        mixed_any |= not torch.equal(out_x, x)
    assert mixed_any  # prob = 1: mixing did happen


def test_batch_mixer_switch_prob_picks_the_method():
    x, t = const_batch(6, 8, 8), one_hot(list(range(6)), 6)
    cut = BatchMixer(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, seed=0)
    out_x, _ = cut(x, t)
    assert set(out_x[:, 0].unique().tolist()) <= {10.0 * i for i in range(6)}  # CutMix: only original pixels
    blend = BatchMixer(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0, seed=0)
    out_x, out_t = blend(x, t)
    torch.testing.assert_close(out_x[:, 0, 0, 0], out_x[:, 0].amax(dim=(1, 2)))  # Mixup: images stay uniform
    assert not set(out_x[:, 0].unique().tolist()) <= {10.0 * i for i in range(6)}  # of blended values


def test_batch_mixer_same_seed_and_epoch_draw_the_same():
    x, t = const_batch(6, 8, 8), one_hot(list(range(6)), 6)
    a = BatchMixer(mixup_alpha=0.4, cutmix_alpha=1.0, seed=3)
    b = BatchMixer(mixup_alpha=0.4, cutmix_alpha=1.0, seed=3)
    a.set_epoch(2)
    b.set_epoch(7)
    b(x, t)  # b drew once in another epoch: set_epoch must reset its stream
    b.set_epoch(2)
    for _ in range(3):  # a resumed run (b) repeats the draws of the epoch, batch after batch
        xa, ta = a(x, t)
        xb, tb = b(x, t)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    a.set_epoch(2)
    b.set_epoch(3)
    assert not torch.equal(a(x, t)[1], b(x, t)[1])  # another epoch, other draws


def test_why_batch_mixer_is_kept_rather_than_timm_mixup():
    """timm.data.Mixup asserts an even batch (a per-process batch here can be odd) and draws from the global
    NumPy RNG (anything else drawing from it changes its lam); BatchMixer does neither."""
    from timm.data import Mixup

    x, y = const_batch(3, 8, 8).float(), torch.tensor([0, 1, 2])
    theirs = Mixup(mixup_alpha=1.0, num_classes=3)
    with pytest.raises(AssertionError, match="even"):
        theirs(x.clone(), y)
    ours = BatchMixer(mixup_alpha=1.0, seed=0)
    mixed, t = ours(x, one_hot(y, 3))  # an odd batch is fine
    assert mixed.shape == x.shape and torch.allclose(t.sum(1), torch.ones(3))

    np.random.seed(0)
    a = theirs(x[:2].clone(), y[:2])[1]
    np.random.seed(0)
    np.random.rand()  # e.g. an augmentation drawing from the global RNG first
    b = theirs(x[:2].clone(), y[:2])[1]
    assert not torch.equal(a, b)  # timm: other draws
    ours.set_epoch(1)
    a = ours(x, one_hot(y, 3))[1]
    ours.set_epoch(1)
    np.random.rand()
    assert torch.equal(ours(x, one_hot(y, 3))[1], a)  # ours: the same draws for the same (seed, epoch)
