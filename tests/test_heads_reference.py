"""common.lib.heads.ArcMarginProduct against pytorch-metric-learning (test-only) and hand-computed margins.

pytorch-metric-learning (https://github.com/KevinMusgrave/pytorch-metric-learning) is the reference: its
``ArcFaceLoss`` / ``SubCenterArcFaceLoss`` take the margin in degrees and store ``W`` as
``(embedding_size, num_classes * sub_centers)``, column ``c * k + j`` being sub-centre ``j`` of class ``c``;
our weight is the transpose, rows in the same order. The comparisons are per sample, not only the mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.lib.heads import ArcMarginProduct, dynamic_margins

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

S = 30.0


def reference(head: ArcMarginProduct, margin: float):
    """The pml loss with ``head``'s weight copied in (margin in radians here, degrees for pml)."""
    kwargs = dict(num_classes=head.out_features, embedding_size=head.in_features, margin=math.degrees(margin),
                  scale=head.s)
    ref = pml_losses.SubCenterArcFaceLoss(sub_centers=head.k, **kwargs) if head.k > 1 else \
        pml_losses.ArcFaceLoss(**kwargs)
    with torch.no_grad():
        ref.W.copy_(head.weight.detach().t())  # pml: (embedding_size, num_classes * k)
    return ref


def pml_margin_logits(ref, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pml's scaled logits with the margin on the target, built the way its ``compute_loss`` builds them."""
    mask = ref.get_target_mask(x, y)
    cos = ref.get_cosine(x)
    target_cos = cos[mask == 1]
    diff = (ref.modify_cosine_of_target_classes(target_cos) - target_cos).unsqueeze(1)
    return ref.scale_logits(cos + mask * diff, x)


def pml_per_sample(ref, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pml's per-sample losses (before its mean reducer)."""
    return ref.compute_loss(x, y, None, x, y)["loss"]["losses"]


def inputs(head: ArcMarginProduct, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings and labels; a third near minus their class centre (the ``theta > pi - m`` branch)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, head.out_features, (n,), generator=g)
    x = 3 * torch.randn(n, head.in_features, generator=g)  # not unit length: both sides must normalise
    centre = head.weight.detach().view(head.out_features, head.k, -1).mean(1)
    x[: n // 3] = -centre[y[: n // 3]] + 0.02 * torch.randn(n // 3, head.in_features, generator=g)
    return x, y


def make_head(k: int, m: float, seed: int, **kwargs) -> ArcMarginProduct:
    torch.manual_seed(seed)
    head = ArcMarginProduct(16, 6, s=S, m=m, k=k, **kwargs)
    if k > 1:  # sub-centres clustered per class, so that -centre lies beyond pi - m of all of them
        with torch.no_grad():
            head.weight.copy_(torch.randn(6, 16).repeat_interleave(k, 0) + 0.1 * torch.randn(6 * k, 16))
    return head


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("m", [0.2, 0.5])
def test_logits_and_losses_match_pml(k, m):
    head = make_head(k, m, seed=k)
    ref = reference(head, m)
    x, y = inputs(head, 36, seed=10 + k)
    cos_y = head.cosine(x)[torch.arange(36), y]
    assert (cos_y < head.th).sum() >= 5 and (cos_y > head.th).sum() >= 5, "both margin branches exercised"
    # Without labels: s * cos, pml's get_logits.
    torch.testing.assert_close(head(x), ref.get_logits(x), rtol=1e-5, atol=1e-4)
    # With labels: the margin logits, per sample losses, and the mean.
    ours = head(x, y)
    torch.testing.assert_close(ours, pml_margin_logits(ref, x, y), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(F.cross_entropy(ours, y, reduction="none"), pml_per_sample(ref, x, y),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(F.cross_entropy(ours, y), ref(x, y), rtol=1e-5, atol=1e-5)


def test_sub_centre_order_matters():
    # The k = 3 comparison above is not blind to the layout: sub-centre-major columns give other losses.
    head = make_head(3, 0.5, seed=3)
    x, y = inputs(head, 36, seed=13)
    wrong = reference(head, 0.5)
    with torch.no_grad():
        wrong.W.copy_(head.weight.detach().view(6, 3, 16).transpose(0, 1).reshape(18, 16).t())
    gap = (F.cross_entropy(head(x, y), y, reduction="none") - pml_per_sample(wrong, x, y)).abs().max()
    assert gap > 1.0


def test_easy_margin_matches_pml_only_where_cos_positive():
    # pml has no easy margin. Where the target cosine is > 0 both apply cos(theta + m); elsewhere ours keeps
    # cos(theta) while pml applies the margin (or its pi - m fallback), so the losses must differ there.
    head = make_head(1, 0.5, seed=4, easy_margin=True)
    ref = reference(head, 0.5)
    x, y = inputs(head, 36, seed=14)
    positive = head.cosine(x)[torch.arange(36), y] > 0
    assert positive.sum() >= 5 and (~positive).sum() >= 5
    ours = F.cross_entropy(head(x, y), y, reduction="none")
    theirs = pml_per_sample(ref, x, y)
    torch.testing.assert_close(ours[positive], theirs[positive], rtol=1e-5, atol=1e-4)
    assert (ours[~positive] < theirs[~positive] - 1e-3).all()  # no margin: an easier target


@pytest.mark.parametrize("k", [1, 3])
def test_dynamic_margins_match_pml_class_by_class(k):
    # pml has one margin per loss: a pml ArcFace with margin m_c must agree with ours on the class-c samples.
    counts = [1, 3, 16, 50, 400, 10_000]
    margins = dynamic_margins(counts)
    head = make_head(k, 0.0, seed=5, margins=margins)
    x, y = inputs(head, 48, seed=15)
    ours = F.cross_entropy(head(x, y), y, reduction="none")
    for c, m_c in enumerate(margins.tolist()):
        rows = y == c
        assert rows.any()
        theirs = pml_per_sample(reference(head, m_c), x, y)[rows]
        torch.testing.assert_close(ours[rows], theirs, rtol=1e-5, atol=1e-4)
    # A single fixed margin would not do: class 0 (m = 0.55) and class 5 (m = 0.1) disagree with it.
    fixed = pml_per_sample(reference(head, 0.3), x, y)
    assert (ours - fixed).abs().max() > 1e-2


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def ce(logits: list[float], label: int) -> float:
    """Cross-entropy of one row, by hand: log-sum-exp minus the target logit."""
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[label]


def test_dynamic_margins_hand_computed_three_classes():
    # counts 1, 16, 10,000 -> m = 0.5 * n^-0.25 + 0.05 = 0.55, 0.30, 0.10.
    margins = dynamic_margins([1, 16, 10_000])
    np.testing.assert_allclose(margins.numpy(), [0.55, 0.30, 0.10], rtol=1e-6)
    a0, a1, a2 = 0.0, 2 * math.pi / 3, 4 * math.pi / 3  # class weights, 120 degrees apart in 2-D
    s = 4.0  # a small scale keeps every row's cross-entropy well above 0
    head = ArcMarginProduct(2, 3, s=s, margins=margins)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a0), unit(a1), unit(a2)]))
    x = torch.tensor([unit(0.2), unit(a1 + 0.1), unit(math.pi - 0.3), unit(a2 + 0.2)])
    y = torch.tensor([0, 1, 0, 2])
    c = math.cos
    expected = [
        # Row 0: theta to class 0 is 0.2 -> s cos(0.2 + 0.55); classes 1, 2 at 2pi/3 - 0.2 and 4pi/3 - 0.2
        # (= 2pi/3 + 0.2 the short way) keep s cos(theta).
        [s * c(0.2 + 0.55), s * c(a1 - 0.2), s * c(a1 + 0.2)],
        # Row 1: theta 0.1 to class 1 -> s cos(0.1 + 0.30); class 0 at 2pi/3 + 0.1, class 2 at 2pi/3 - 0.1.
        [s * c(a1 + 0.1), s * c(0.1 + 0.30), s * c(a1 - 0.1)],
        # Row 2: theta to class 0 is pi - 0.3 > pi - 0.55: fallback s (cos(theta) - m sin m) with m = 0.55;
        # class 1 at pi/3 - 0.3, class 2 at pi/3 + 0.3.
        [s * (c(math.pi - 0.3) - 0.55 * math.sin(0.55)), s * c(math.pi / 3 - 0.3), s * c(math.pi / 3 + 0.3)],
        # Row 3: theta 0.2 to class 2 -> s cos(0.2 + 0.10); class 0 at 2pi/3 - 0.2, class 1 at 2pi/3 + 0.2.
        [s * c(a1 - 0.2), s * c(a1 + 0.2), s * c(0.2 + 0.10)],
    ]
    got = head(x, y)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-4)
    losses = [ce(row, label) for row, label in zip(expected, y.tolist(), strict=True)]
    np.testing.assert_allclose(F.cross_entropy(got, y, reduction="none").detach().numpy(), losses, rtol=1e-5)
    # The larger margin really is the one used for class 0: with m = 0.1 row 0's target would be s cos(0.3).
    assert abs(got[0, 0].item() - s * c(0.3)) > 0.5


def test_dynamic_margins_rescaled_form_by_hand():
    # counts 1, 16, 81 -> t = n^-1/4 = 1, 1/2, 1/3; rescaled: (t - 1/3) / (2/3) = 1, 1/4, 0 -> [0.05, 0.5]:
    # 0.05 + 0.45 * (1, 0.25, 0) = 0.5, 0.1625, 0.05.
    margins = dynamic_margins([1, 16, 81], form="rescaled", m_min=0.05, m_max=0.5)
    np.testing.assert_allclose(margins.numpy(), [0.5, 0.1625, 0.05], rtol=1e-6)
    # the psinger/kaggle-landmark-recognition-2020-solution formula, written out: sqrt(1 / sqrt(n)) min-max
    # scaled times arcface_m_x plus arcface_m_y
    n = np.array([2.0, 7.0, 30.0, 1000.0])
    tmp = np.sqrt(1 / np.sqrt(n))
    theirs = (tmp - tmp.min()) / (tmp.max() - tmp.min()) * 0.45 + 0.05
    np.testing.assert_allclose(dynamic_margins(n, form="rescaled").numpy(), theirs, rtol=1e-6)
    # equal counts: every class gets m_max; power form unchanged: 0.5 * 1000^-0.25 + 0.05 = 0.1389
    np.testing.assert_allclose(dynamic_margins([5, 5], form="rescaled", m_max=0.4).numpy(), [0.4, 0.4])
    assert dynamic_margins([1000]).item() == pytest.approx(0.5 * 1000**-0.25 + 0.05, rel=1e-6)
    with pytest.raises(ValueError, match="margin_form='cube'"):
        dynamic_margins([1, 2], form="cube")
    with pytest.raises(ValueError, match="margin_min=0.6 > margin_max=0.5"):
        dynamic_margins([1, 2], form="rescaled", m_min=0.6, m_max=0.5)


def test_margins_from_config_reads_the_form():
    from common.config import EmbedderConfig
    from common.lib.heads import margins_from_config

    cfg = EmbedderConfig(dynamic_margin=True, margin_form="rescaled", margin_min=0.1, margin_max=0.3).to_dict()
    np.testing.assert_allclose(margins_from_config([1, 16, 81], cfg).numpy(), [0.3, 0.15, 0.1], rtol=1e-6)
    old = {k: v for k, v in cfg.items() if k not in ("margin_form", "margin_min", "margin_max")}
    np.testing.assert_allclose(margins_from_config([1, 16], old).numpy(), [0.55, 0.30], rtol=1e-6)
