"""Tests for common.lib.heads: ArcFace maths against hand-computed 2-D cases and pytorch-metric-learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.lib.heads import ArcMarginProduct, class_columns, dynamic_margins, sample_classes

S, M = 30.0, 0.5


def unit(angle: float) -> list[float]:
    """The 2-D unit vector at ``angle`` radians."""
    return [math.cos(angle), math.sin(angle)]


def head_2d(angles: list[float], **kwargs) -> ArcMarginProduct:
    """A 2-D head whose weight rows are unit vectors at the given angles."""
    head = ArcMarginProduct(2, len(angles) // kwargs.get("k", 1), s=S, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a) for a in angles]))
    return head


# ------------------------------------------------------------------------------------------ dynamic margins
def test_dynamic_margins_formula():
    got = dynamic_margins([1, 16, 10_000])
    assert got.dtype == torch.float32
    expected = [
        0.5 * 1 + 0.05,  # n = 1: 1 ** -0.25 = 1
        0.5 * 0.5 + 0.05,  # n = 16: 16 ** -0.25 = 1/2
        0.5 * 0.1 + 0.05,  # n = 10,000: 10,000 ** -0.25 = 1/10
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got[0] > got[1] > got[2]  # rarer classes get larger margins


def test_dynamic_margins_rejects_bad_counts():
    with pytest.raises(ValueError, match="class 1"):
        dynamic_margins([3, 0, 2])
    with pytest.raises(ValueError, match="non-empty"):
        dynamic_margins([])


# ------------------------------------------------------------------------------------------ hand-computed 2-D
def test_logits_hand_computed():
    # Class weights at 0, pi/2 and pi; one embedding at pi/6 (scaled: the head normalises it).
    head = head_2d([0.0, math.pi / 2, math.pi], m=M)
    x = torch.tensor([[2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]])
    cos = [
        math.cos(math.pi / 6),  # angle to class 0: pi/6
        math.cos(math.pi / 3),  # angle to class 1: pi/2 - pi/6 = pi/3
        math.cos(5 * math.pi / 6),  # angle to class 2: pi - pi/6 = 5pi/6
    ]
    # Inference: s * cos for every class.
    np.testing.assert_allclose(head(x)[0].detach().numpy(), [S * c for c in cos], rtol=1e-5)
    # Label 0: the target gets s * cos(pi/6 + m), the others keep s * cos.
    expected = [S * math.cos(math.pi / 6 + M), S * cos[1], S * cos[2]]
    np.testing.assert_allclose(head(x, torch.tensor([0]))[0].detach().numpy(), expected, rtol=1e-5)
    # Label 1: angle pi/3 -> s * cos(pi/3 + m).
    expected = [S * cos[0], S * math.cos(math.pi / 3 + M), S * cos[2]]
    np.testing.assert_allclose(head(x, torch.tensor([1]))[0].detach().numpy(), expected, rtol=1e-5)


def test_fallback_beyond_pi_minus_m():
    head = head_2d([0.0, math.pi], m=M)
    # Embedding at 0.05 rad, label 1 (weight at pi): theta = pi - 0.05 > pi - m = 2.64, so the target logit
    # is s * (cos(theta) - m * sin(m)) (sin(pi - m) = sin(m)), not s * cos(theta + m).
    x = torch.tensor([unit(0.05)])
    theta = math.pi - 0.05
    expected_target = S * (math.cos(theta) - M * math.sin(M))
    got = head(x, torch.tensor([1]))[0].detach().numpy()
    np.testing.assert_allclose(got, [S * math.cos(0.05), expected_target], rtol=1e-5)
    assert abs(expected_target - S * math.cos(theta + M)) > 1.0  # the branch is distinguishable
    # Just inside the boundary (theta = pi - m - 0.05), the ordinary cos(theta + m) applies.
    x = torch.tensor([unit(M + 0.05)])
    got = head(x, torch.tensor([1]))[0, 1].item()
    assert got == pytest.approx(S * math.cos(math.pi - M - 0.05 + M), rel=1e-5)


def test_easy_margin():
    head = head_2d([0.0, math.pi], m=M, easy_margin=True)
    x = torch.tensor([unit(0.05)])
    # Label 0: cos > 0, so the margin applies: s * cos(0.05 + m).
    assert head(x, torch.tensor([0]))[0, 0].item() == pytest.approx(S * math.cos(0.05 + M), rel=1e-5)
    # Label 1: cos(pi - 0.05) < 0, so easy margin leaves it unchanged: s * cos(pi - 0.05).
    assert head(x, torch.tensor([1]))[0, 1].item() == pytest.approx(S * math.cos(math.pi - 0.05), rel=1e-5)


def test_sub_centres_take_the_max():
    # k = 2: class 0 owns rows 0-1 (angles 0 and pi/2), class 1 owns rows 2-3 (angles pi and -pi/2).
    head = head_2d([0.0, math.pi / 2, math.pi, -math.pi / 2], m=M, k=2)
    assert head.weight.shape == (4, 2)
    x = torch.tensor([unit(math.pi / 3)])  # embedding at pi/3
    cos0 = max(math.cos(math.pi / 3), math.cos(math.pi / 6))  # class 0: nearer sub-centre at pi/2
    cos1 = max(math.cos(2 * math.pi / 3), math.cos(5 * math.pi / 6))  # class 1: nearer sub-centre at pi
    np.testing.assert_allclose(head(x)[0].detach().numpy(), [S * cos0, S * cos1], rtol=1e-5)
    # The margin applies to the max: target logit s * cos(pi/6 + m).
    got = head(x, torch.tensor([0]))[0].detach().numpy()
    np.testing.assert_allclose(got, [S * math.cos(math.pi / 6 + M), S * cos1], rtol=1e-5)


def test_per_class_margins_gather_by_label():
    margins = torch.tensor([0.1, 0.3, 0.5])
    head = head_2d([0.0, math.pi / 2, math.pi], margins=margins)
    x = torch.tensor([unit(0.2), unit(0.2), unit(math.pi / 2 + 0.4)])
    labels = torch.tensor([0, 1, 1])
    got = head(x, labels).detach().numpy()
    # Row 0: label 0, theta 0.2 -> cos(0.2 + 0.1); row 1: label 1, theta pi/2 - 0.2 -> cos(pi/2 - 0.2 + 0.3);
    # row 2: label 1, theta 0.4 -> cos(0.4 + 0.3).
    assert got[0, 0] == pytest.approx(S * math.cos(0.2 + 0.1), rel=1e-5)
    assert got[1, 1] == pytest.approx(S * math.cos(math.pi / 2 - 0.2 + 0.3), rel=1e-5)
    assert got[2, 1] == pytest.approx(S * math.cos(0.4 + 0.3), rel=1e-5)
    # Non-target entries are untouched: row 0, class 1 is s * cos(pi/2 - 0.2).
    assert got[0, 1] == pytest.approx(S * math.cos(math.pi / 2 - 0.2), rel=1e-5)
    # Margins are buffers: they are in the state dict and follow .to().
    assert {"margin", "cos_m", "sin_m", "th", "mm"} <= set(head.state_dict())
    assert head.to(torch.float64).margin.dtype == torch.float64


def test_per_class_margins_equal_fixed_margin_when_constant():
    torch.manual_seed(0)
    fixed = ArcMarginProduct(8, 5, s=S, m=0.4)
    per_class = ArcMarginProduct(8, 5, s=S, margins=torch.full((5,), 0.4))
    per_class.weight.data.copy_(fixed.weight.data)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    torch.testing.assert_close(per_class(x, y), fixed(x, y))
    with pytest.raises(ValueError, match="one per class"):
        ArcMarginProduct(8, 5, margins=torch.ones(4))


def test_label_smoothing_mixes_margin_and_plain_cosine():
    head = head_2d([0.0, math.pi / 2], m=M, ls_eps=0.2)
    x = torch.tensor([unit(0.3)])
    got = head(x, torch.tensor([0]))[0].detach().numpy()
    # Smoothed one-hot: target 0.8 + 0.2/2 = 0.9, other 0.1; logit = s * (w * phi + (1 - w) * cos).
    phi0, cos0 = math.cos(0.3 + M), math.cos(0.3)
    phi1, cos1 = math.cos(math.pi / 2 - 0.3 + M), math.cos(math.pi / 2 - 0.3)
    expected = [S * (0.9 * phi0 + 0.1 * cos0), S * (0.1 * phi1 + 0.9 * cos1)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------ numerics
def test_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = ArcMarginProduct(32, 10, s=S, m=M)
    x = torch.randn(6, 32).bfloat16()
    y = torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, y)
        plain = head(x)
    assert got.dtype == torch.float32 and plain.dtype == torch.float32
    # Same numbers as the float32 computation: a bf16 matmul would be off by ~1e-2 * s.
    torch.testing.assert_close(got, head(x.float(), y), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(plain, head(x.float()), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("easy_margin", [False, True])
def test_gradients_finite_at_cos_plus_minus_one(easy_margin):
    head = head_2d([0.0, math.pi / 2], m=M, easy_margin=easy_margin)
    # Row 0 lies exactly on its class weight (cos = 1), row 1 exactly opposite it (cos = -1).
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = F.cross_entropy(head(x, torch.tensor([0, 0])), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    # Embeddings equal (or opposite) to their class weight in 16-D: rounding puts cos a few ulps above,
    # at and below +-1, where an unclamped sqrt(1 - cos^2) gives NaN.
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 32, s=S, m=M, easy_margin=easy_margin)
    y = torch.arange(32)
    x = torch.cat([head.weight.detach(), -head.weight.detach()]).requires_grad_(True)
    cos = head.cosine(x)[torch.arange(64), y.repeat(2)]
    assert (cos.abs() > 1).any() and (cos.abs() == 1).any()
    loss = F.cross_entropy(head(x, y.repeat(2)), y.repeat(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_rejects_bad_shapes():
    head = ArcMarginProduct(4, 3)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match="2 embeddings but 3 labels"):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ reference: pml
def _inputs_in_both_branches(head: ArcMarginProduct, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings, plus some placed near the negated target weight (the pi - m fallback branch)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, head.out_features, (n,), generator=g)
    x = torch.randn(n, head.in_features, generator=g)
    centre = head.weight.detach().view(head.out_features, head.k, -1).mean(1)  # mean of the sub-centres
    x[: n // 3] = -centre[y[: n // 3]] + 0.05 * torch.randn(n // 3, head.in_features, generator=g)
    cos = head.cosine(x)[torch.arange(n), y]
    assert (cos < head.th).sum() >= 3 and (cos > head.th).sum() >= 3, "both branches must be exercised"
    return x, y


def test_matches_pytorch_metric_learning_arcface():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 7, s=S, m=M)
    x, y = _inputs_in_both_branches(head, 30, seed=1)
    ref = pml.ArcFaceLoss(num_classes=7, embedding_size=16, margin=math.degrees(M), scale=S)  # degrees!
    ref.W.data.copy_(head.weight.detach().t())  # pml stores W as (embedding_size, num_classes)
    torch.testing.assert_close(F.cross_entropy(head(x, y), y), ref(x, y), rtol=1e-5, atol=1e-5)


def test_matches_pytorch_metric_learning_subcenter_arcface():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 5, s=S, m=M, k=3)
    with torch.no_grad():  # sub-centres clustered per class, so that -centre lies beyond pi - m of all three
        head.weight.copy_(torch.randn(5, 16).repeat_interleave(3, 0) + 0.3 * torch.randn(15, 16))
    x, y = _inputs_in_both_branches(head, 30, seed=2)
    ref = pml.SubCenterArcFaceLoss(
        num_classes=5, embedding_size=16, margin=math.degrees(M), scale=S, sub_centers=3
    )
    # pml's column c * k + j is sub-centre j of class c: the same order as our rows.
    ref.W.data.copy_(head.weight.detach().t())
    torch.testing.assert_close(F.cross_entropy(head(x, y), y), ref(x, y), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Partial FC
def test_sample_classes_keeps_the_positives_and_fills_up_with_others():
    g = torch.Generator().manual_seed(0)
    got = sample_classes(torch.tensor([7, 3, 7]), 20, 6, g)
    assert got.dtype == torch.int64 and got.numel() == 6
    assert got.tolist() == sorted(set(got.tolist()))  # sorted and distinct
    assert {3, 7} <= set(got.tolist()) and all(0 <= c < 20 for c in got.tolist())
    assert sample_classes(torch.tensor([1]), 5, 0).tolist() == [0, 1, 2, 3, 4]  # 0: every class
    assert sample_classes(torch.tensor([1]), 5, 9).tolist() == [0, 1, 2, 3, 4]  # more than there are
    assert sample_classes(torch.tensor([4, 0, 2]), 9, 2).tolist() == [0, 2, 4]  # more positives than n_sample
    draws = {tuple(sample_classes(torch.tensor([0]), 50, 5, torch.Generator().manual_seed(s)).tolist())
             for s in range(5)}
    assert len(draws) > 1  # the negatives are random...
    again = sample_classes(torch.tensor([7, 3, 7]), 20, 6, torch.Generator().manual_seed(0))
    assert torch.equal(got, again)  # ...and reproducible from the generator's seed
    with pytest.raises(ValueError, match="n_sample must be >= 0"):
        sample_classes(torch.tensor([0]), 5, -1)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        sample_classes(torch.tensor([5]), 5, 2)


def test_class_columns_and_missing_label():
    classes = torch.tensor([1, 4, 6])
    assert class_columns(classes, torch.tensor([6, 1, 4, 4])).tolist() == [2, 0, 1, 1]
    with pytest.raises(ValueError, match="label 5 is not among the sampled classes"):
        class_columns(classes, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="label 9 is not among"):
        class_columns(classes, torch.tensor([9]))  # beyond the last class


@pytest.mark.parametrize("kwargs", [dict(m=M), dict(m=M, k=3), dict(margins=torch.linspace(0.1, 0.6, 7))])
def test_sampled_classes_give_the_full_logits_columns(kwargs):
    """Partial FC's logits are the full head's columns of the sampled classes, margin included; only the sampled
    classes' weight rows get a gradient."""
    torch.manual_seed(0)
    head = ArcMarginProduct(8, 7, s=S, **kwargs)
    x, labels, classes = torch.randn(4, 8), torch.tensor([5, 1, 5, 3]), torch.tensor([1, 3, 5, 6])
    full = head(x, labels)
    part = head(x, labels, classes)
    np.testing.assert_allclose(part.detach().numpy(), full[:, classes].detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head(x, classes=classes).detach().numpy(),
                               head(x)[:, classes].detach().numpy(), rtol=1e-6, atol=1e-6)
    part.sum().backward()
    rows = head.weight.grad.view(7, head.k, 8).abs().sum((1, 2))
    assert (rows[classes] > 0).all() and (rows[[0, 2, 4]] == 0).all()
    with pytest.raises(ValueError, match="label 2 is not among"):
        head(x, torch.tensor([2, 1, 5, 3]), classes)
