"""Tests for common.lib.losses: hand-computed tiny cases, torch's own cross-entropy and KL as references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.lib.losses import (
    FocalLoss,
    LogitAdjustedLoss,
    SoftmaxEQL,
    SoftTargetCrossEntropy,
    build_criterion,
    class_prior,
    distillation_loss,
    logit_adjust,
    mix_hard_soft,
    to_soft_targets,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
# log([1, 1, 2]): softmax = [1/4, 1/4, 1/2], which keeps every hand value a multiple of ln 2.
Z112 = [0.0, 0.0, LN2]


def random_case(n: int = 8, c: int = 5, seed: int = 0):
    """Random logits, hard labels and soft targets (rows summing to 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, c, generator=g), dim=1)
    return logits, labels, soft


# ------------------------------------------------------------------------------------------ prior, targets
def test_class_prior():
    got = class_prior([1, 3, 4])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), [1 / 8, 3 / 8, 4 / 8], rtol=1e-6)  # counts / 8
    np.testing.assert_allclose(class_prior(torch.tensor([2, 2])).numpy(), [0.5, 0.5])
    with pytest.raises(ValueError, match="class 1 has 0"):
        class_prior([3, 0, 2])
    with pytest.raises(ValueError, match="non-empty"):
        class_prior([])
    with pytest.raises(ValueError, match="non-empty"):
        class_prior([[1, 2]])


def test_to_soft_targets():
    got = to_soft_targets(torch.tensor([2, 0]), 3)
    np.testing.assert_array_equal(got.numpy(), [[0, 0, 1], [1, 0, 0]])
    assert got.dtype == torch.float32
    got = to_soft_targets(torch.tensor([2, 0]), 3, label_smoothing=0.3)
    # (1 - 0.3) * one-hot + 0.3 / 3: target 0.8, others 0.1.
    np.testing.assert_allclose(got.numpy(), [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], rtol=1e-6)
    soft = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    # Soft targets are smoothed the same way: 0.7 * [0.5, 0, 0.5] + 0.1.
    got = to_soft_targets(soft, 3, label_smoothing=0.3)
    np.testing.assert_allclose(got.numpy(), [[0.45, 0.1, 0.45]], rtol=1e-6)
    assert got.dtype == torch.float32
    with pytest.raises(ValueError, match="row 1 has label 3"):
        to_soft_targets(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="row 0 has label -1"):
        to_soft_targets(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match=r"\(N, 3\) float"):
        to_soft_targets(torch.ones(2, 4), 3)
    with pytest.raises(ValueError, match="label_smoothing"):
        to_soft_targets(torch.tensor([0]), 3, label_smoothing=1.0)
    # The losses check it when built, before the first batch.
    def eql(label_smoothing):
        return SoftmaxEQL(3, 1.0, label_smoothing)

    for make in (SoftTargetCrossEntropy, FocalLoss, eql):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got -0.1"):
            make(label_smoothing=-0.1)


# ------------------------------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_soft_ce_matches_torch_cross_entropy(smoothing):
    logits, labels, soft = random_case()
    loss = SoftTargetCrossEntropy(smoothing)
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(loss(logits, labels), expected)
    # torch's cross_entropy takes probabilities too (and smooths them the same way).
    torch.testing.assert_close(loss(logits, soft), F.cross_entropy(logits, soft, label_smoothing=smoothing))


def test_soft_ce_hand_computed():
    logits = torch.tensor([Z112, [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    # Row 0: p = [1/4, 1/4, 1/2]; -(0.5 ln 1/4 + 0.5 ln 1/2) = 0.5 * 2 ln 2 + 0.5 ln 2 = 1.5 ln 2.
    # Row 1: p = 1/3 everywhere, so any target gives ln 3.
    assert SoftTargetCrossEntropy()(logits, target).item() == pytest.approx((1.5 * LN2 + LN3) / 2, rel=1e-6)
    # Smoothing 0.3 turns row 0's target into [0.45, 0.1, 0.45]: 0.55 * 2 ln 2 + 0.45 ln 2 = 1.55 ln 2.
    got = SoftTargetCrossEntropy(0.3)(logits[:1], target[:1]).item()
    assert got == pytest.approx(1.55 * LN2, rel=1e-6)


def test_soft_ce_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="3 rows of logits but 2 targets"):
        SoftTargetCrossEntropy()(torch.zeros(3, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ focal
def test_focal_gamma_zero_is_cross_entropy():
    logits, labels, soft = random_case(seed=1)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, soft), F.cross_entropy(logits, soft))
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, label_smoothing=0.2)(logits, labels),
        F.cross_entropy(logits, labels, label_smoothing=0.2),
    )


def test_focal_gamma_two_hand_computed():
    logits = torch.tensor([Z112, Z112])  # p = [1/4, 1/4, 1/2] in both rows
    labels = torch.tensor([2, 0])
    # Row 0, label 2: -(1 - 1/2)^2 ln(1/2) = 0.25 ln 2.
    # Row 1, label 0: -(1 - 1/4)^2 ln(1/4) = 0.5625 * 2 ln 2 = 1.125 ln 2.
    got = FocalLoss(gamma=2.0)(logits, labels).item()
    assert got == pytest.approx((0.25 + 1.125) / 2 * LN2, rel=1e-6)
    # Soft [0.5, 0, 0.5]: 0.5 * 1.125 ln 2 + 0.5 * 0.25 ln 2 = 0.6875 ln 2.
    got = FocalLoss(gamma=2.0)(logits[:1], torch.tensor([[0.5, 0.0, 0.5]])).item()
    assert got == pytest.approx(0.6875 * LN2, rel=1e-6)
    # The focal term shrinks the well-classified row more than plain CE does: strictly below CE.
    assert got < SoftTargetCrossEntropy()(logits[:1], torch.tensor([[0.5, 0.0, 0.5]])).item()
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)


# ------------------------------------------------------------------------------------------ logit adjustment
def test_logit_adjust_post_hoc_hand_values():
    prior = [0.5, 0.25, 0.25]
    logits = np.array([[1.0, 2.0, 3.0]])
    # logits - log(prior): 1 + ln 2, 2 + ln 4, 3 + ln 4.
    expected = [[1 + LN2, 2 + 2 * LN2, 3 + 2 * LN2]]
    got = logit_adjust(logits, prior)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # tau = 0.5 halves the shift: 1 + 0.5 ln 2, 2 + ln 2, 3 + ln 2.
    got = logit_adjust(logits, prior, tau=0.5)
    np.testing.assert_allclose(got, [[1 + LN2 / 2, 2 + LN2, 3 + LN2]], rtol=1e-6)
    assert logit_adjust(logits.astype(np.float32), np.array(prior)).dtype == np.float32
    got = logit_adjust(torch.tensor(logits, dtype=torch.float16), torch.tensor(prior))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3)  # float16 input: 1e-3
    np.testing.assert_allclose(logit_adjust(torch.tensor(logits), prior, tau=0.0).numpy(), logits)


def test_logit_adjust_rejects_bad_prior():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        logit_adjust(np.zeros((1, 3)), [0.5, 0.5])
    with pytest.raises(ValueError, match="class 1 is not"):
        logit_adjust(np.zeros((1, 3)), [0.5, 0.0, 0.5])


def test_logit_adjusted_loss_hand_computed():
    prior = torch.tensor([0.8, 0.2])
    logits, label = torch.zeros(1, 2), torch.tensor([1])
    # tau 1: adjusted logits ln 0.8, ln 0.2 -> softmax [0.8, 0.2]; label 1 -> -ln 0.2 = ln 5.
    loss = LogitAdjustedLoss(SoftTargetCrossEntropy(), prior, tau=1.0)
    assert loss(logits, label).item() == pytest.approx(math.log(5.0), rel=1e-6)
    # tau 0.5: softmax ~ [sqrt 0.8, sqrt 0.2] = [2/3, 1/3]; label 1 -> ln 3.
    loss = LogitAdjustedLoss(SoftTargetCrossEntropy(), prior, tau=0.5)
    assert loss(logits, label).item() == pytest.approx(LN3, rel=1e-6)
    assert "log_prior" in loss.state_dict()


def test_logit_adjusted_loss_is_ce_on_shifted_logits():
    logits, labels, soft = random_case(seed=2)
    prior = class_prior([1, 2, 5, 10, 40])
    shifted = logits + 0.7 * torch.log(prior)
    la = LogitAdjustedLoss(SoftTargetCrossEntropy(0.1), prior, tau=0.7)
    torch.testing.assert_close(la(logits, labels), F.cross_entropy(shifted, labels, label_smoothing=0.1))
    torch.testing.assert_close(la(logits, soft), F.cross_entropy(shifted, soft, label_smoothing=0.1))
    with pytest.raises(ValueError, match="logits have 4 classes, prior 5"):
        la(torch.zeros(2, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ Softmax-EQL
def eql_with(pos_grad: list[float], tau: float = 1.0) -> SoftmaxEQL:
    """A SoftmaxEQL whose accumulated positive gradients are set by hand."""
    eql = SoftmaxEQL(len(pos_grad), tau=tau)
    eql.pos_grad.copy_(torch.tensor(pos_grad))
    return eql


def test_eql_hand_computed_adjustment_and_loss():
    eql = eql_with([4.0, 2.0, 1.0]).eval()
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    adjusted = eql.adjust(logits, to_soft_targets(labels, 3))
    # Row 0, label 0: z_j + ln(g_j / g_0) = [0, ln 1/2, ln 1/4]; the target's own logit is unchanged.
    # Row 1, label 2: z_j + ln(g_j / g_2) = [ln 4, ln 2, 0].
    expected = [[0.0, -LN2, -2 * LN2], [2 * LN2, LN2, 0.0]]
    np.testing.assert_allclose(adjusted.numpy(), expected, atol=1e-6)
    # Both rows: exp -> [4, 2, 1] / 7 up to scale. Row 0: -ln(4/7); row 1: -ln(1/7).
    got = eql(logits, labels).item()
    assert got == pytest.approx((math.log(7 / 4) + math.log(7)) / 2, rel=1e-6)
    # tau 0.5, row 0: [0, 0.5 ln 1/2, 0.5 ln 1/4] -> loss ln(1 + 1/sqrt 2 + 1/2).
    got = eql_with([4.0, 2.0, 1.0], tau=0.5).eval()(logits[:1], labels[:1]).item()
    assert got == pytest.approx(math.log(1 + 2**-0.5 + 0.5), rel=1e-6)


def test_eql_accumulates_positive_gradients_in_train_mode():
    eql = eql_with([4.0, 2.0, 1.0]).train()
    logits = torch.zeros(2, 3, requires_grad=True)
    labels = torch.tensor([0, 2])
    loss = eql(logits, labels)
    # Both rows have p = [4, 2, 1] / 7 (above). Gradient of the mean loss at the target: (p_y - 1) / N.
    # Row 0 (class 0): |4/7 - 1| / 2 = 3/14. Row 1 (class 2): |1/7 - 1| / 2 = 3/7. Class 1 had no positive.
    np.testing.assert_allclose(eql.pos_grad.numpy(), [4 + 3 / 14, 2.0, 1 + 3 / 7], rtol=1e-6)
    # The same numbers from autograd: the positive part of d loss / d logits.
    loss.backward()
    np.testing.assert_allclose(logits.grad[[0, 1], [0, 2]].abs().numpy(), [3 / 14, 3 / 7], rtol=1e-6)
    # Eval mode: the loss is computed but nothing accumulates.
    before = eql.pos_grad.clone()
    eql.eval()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(eql.pos_grad, before)


def test_eql_label_smoothing_changes_the_ce_targets_not_the_positives():
    eql = SoftmaxEQL(3, tau=1.0, label_smoothing=0.3).train()
    eql.pos_grad.copy_(torch.tensor([4.0, 2.0, 1.0]))
    loss = eql(torch.zeros(2, 3), torch.tensor([0, 2]))
    # Adjustment from the unsmoothed labels, as before: p = [4, 2, 1] / 7 in both rows. Smoothed targets:
    # 0.7 * one-hot + 0.1 -> 0.8 on the label, 0.1 elsewhere.
    # Row 0 (label 0): -(0.8 ln 4/7 + 0.1 ln 2/7 + 0.1 ln 1/7);
    # row 1 (label 2): -(0.1 ln 4/7 + 0.1 ln 2/7 + 0.8 ln 1/7).
    row0 = -(0.8 * math.log(4 / 7) + 0.1 * math.log(2 / 7) + 0.1 * math.log(1 / 7))
    row1 = -(0.1 * math.log(4 / 7) + 0.1 * math.log(2 / 7) + 0.8 * math.log(1 / 7))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # Only the labelled classes collect: class 0 gets |4/7 - 0.8| / 2 = 4/35, class 2 |1/7 - 0.8| / 2 = 23/70,
    # class 1 (smoothing mass only) nothing.
    np.testing.assert_allclose(eql.pos_grad.numpy(), [4 + 4 / 35, 2.0, 1 + 23 / 70], rtol=1e-6)


def test_eql_starts_as_cross_entropy_and_soft_one_hot_equals_hard():
    logits, labels, _ = random_case(seed=3)
    fresh = SoftmaxEQL(5, tau=1.0, label_smoothing=0.1)
    # All g = 0 (clamped to eps): every ratio g_j / g_y is 1, so no adjustment.
    torch.testing.assert_close(fresh(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    hard, soft = eql_with([5.0, 1.0, 0.5, 3.0, 2.0]), eql_with([5.0, 1.0, 0.5, 3.0, 2.0])
    torch.testing.assert_close(hard(logits, labels), soft(logits, to_soft_targets(labels, 5)))
    torch.testing.assert_close(hard.pos_grad, soft.pos_grad)
    assert not torch.equal(hard.pos_grad, torch.tensor([5.0, 1.0, 0.5, 3.0, 2.0]))  # it did accumulate
    # tau = 0 is plain cross-entropy whatever g holds.
    torch.testing.assert_close(eql_with([5.0, 1.0, 0.5, 3.0, 2.0], tau=0.0)(logits, labels),
                               F.cross_entropy(logits, labels))


def test_eql_rare_negatives_are_lowered():
    # g = [100, 1]: class 1 is rare. For a class-0 sample its logit drops by ln 100, so the loss (and the
    # negative gradient class 1 receives) falls below plain CE.
    eql = eql_with([100.0, 1.0]).eval()
    logits, labels = torch.zeros(1, 2, requires_grad=True), torch.tensor([0])
    eql(logits, labels).backward()
    # p = softmax([0, -ln 100]) = [100, 1] / 101: negative gradient on class 1 is 1/101 instead of 1/2.
    assert logits.grad[0, 1].item() == pytest.approx(1 / 101, rel=1e-5)


# ------------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_zero_when_student_is_teacher(temperature):
    _, _, teacher = random_case(seed=4)
    got = distillation_loss(torch.log(teacher), teacher, temperature)
    assert abs(got.item()) < 1e-6


def test_distillation_hand_computed_t2():
    teacher = torch.tensor([[0.8, 0.2]])
    student = torch.zeros(1, 2)
    # T = 2: teacher_T ~ [sqrt 0.8, sqrt 0.2] = [2/3, 1/3]; student_T = [1/2, 1/2].
    # KL = 2/3 ln(4/3) + 1/3 ln(2/3); times T^2 = 4.
    expected = 4 * (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3))
    assert distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 1 agrees with torch's KL; a zero teacher probability is fine: [1, 0] vs [1/2, 1/2] -> ln 2.
    s, _, t = random_case(seed=5)
    ref = F.kl_div(F.log_softmax(s, 1), t, reduction="batchmean")
    torch.testing.assert_close(distillation_loss(s, t), ref)
    assert distillation_loss(student, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(LN2, rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="must both be"):
        distillation_loss(student, torch.ones(1, 3) / 3)


def test_mix_hard_soft():
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    got = mix_hard_soft(torch.tensor([0, 2]), soft, 3)
    # Row 0: 0.8 * [1, 0, 0] + 0.2 * [0.5, 0.5, 0] = [0.9, 0.1, 0]. Row 1: hard and soft agree -> [0, 0, 1].
    np.testing.assert_allclose(got.numpy(), [[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]], rtol=1e-6)
    # w = 0.5 with numpy soft targets: row 0 = [0.75, 0.25, 0].
    got = mix_hard_soft(torch.tensor([0]), soft[:1].numpy(), 3, soft_weight=0.5)
    np.testing.assert_allclose(got.numpy(), [[0.75, 0.25, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="soft_weight"):
        mix_hard_soft(torch.tensor([0]), soft[:1], 3, soft_weight=1.5)
    with pytest.raises(ValueError, match="2 labels but 1 soft rows"):
        mix_hard_soft(torch.tensor([0, 1]), soft[:1], 3)


# ------------------------------------------------------------------------------------------ build_criterion
def test_build_criterion():
    counts = [1, 2, 5, 10, 40]
    assert isinstance(build_criterion("ce", 5, None), SoftTargetCrossEntropy)
    assert isinstance(build_criterion("focal", 5, counts, focal_gamma=1.5), FocalLoss)
    eql = build_criterion("eql", 5, counts, eql_tau=0.5, label_smoothing=0.1)
    assert isinstance(eql, SoftmaxEQL) and eql.tau == 0.5 and eql.label_smoothing == 0.1
    la = build_criterion("focal", 5, counts, la_tau=1.0)
    assert isinstance(la, LogitAdjustedLoss) and isinstance(la.base, FocalLoss)
    torch.testing.assert_close(la.log_prior, torch.log(class_prior(counts)))
    logits, labels, _ = random_case(seed=6)
    ce = build_criterion("ce", 5, counts, la_tau=0.5, label_smoothing=0.1)
    expected = F.cross_entropy(logits + 0.5 * torch.log(class_prior(counts)), labels, label_smoothing=0.1)
    torch.testing.assert_close(ce(logits, labels), expected)


def test_build_criterion_errors():
    with pytest.raises(ValueError, match="unknown loss 'bce'; expected one of ce, focal, eql"):
        build_criterion("bce", 5, None)
    with pytest.raises(ValueError, match="la_tau must be >= 0"):
        build_criterion("ce", 5, None, la_tau=-1.0)
    with pytest.raises(ValueError, match="needs counts for 5 classes, got none"):
        build_criterion("ce", 5, None, la_tau=1.0)
    with pytest.raises(ValueError, match="needs counts for 5 classes, got 3"):
        build_criterion("ce", 5, [1, 2, 3], la_tau=1.0)


# ------------------------------------------------------------------------------------------ dtypes
LOSS_FNS = {
    "ce": lambda z, t: SoftTargetCrossEntropy(0.1)(z, t),
    "focal": lambda z, t: FocalLoss(2.0)(z, t),
    "la": lambda z, t: LogitAdjustedLoss(FocalLoss(), class_prior([1, 2, 5, 10, 40]))(z, t),
    "eql": lambda z, t: eql_with([5.0, 1.0, 0.0, 3.0, 2.0]).train()(z, t),
    "kd": lambda z, t: distillation_loss(z, to_soft_targets(t, 5, 0.1) if t.ndim == 1 else t, 2.0),
}


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_finite_float32(name, dtype):
    logits, labels, soft = random_case(seed=7)
    logits = (20 * logits).to(dtype).requires_grad_(True)  # |z| up to ~100: exp overflows in float16
    for target in (labels, soft.to(dtype)):
        loss = LOSS_FNS[name](logits, target)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (name, dtype, loss)
        # Close to the float32 computation on the same (rounded) logits.
        ref = LOSS_FNS[name](logits.detach().float(), target.float() if target.ndim == 2 else target)
        torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSS_FNS[name](logits, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
