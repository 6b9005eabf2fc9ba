"""Classification losses for the classifier track: soft-target CE, focal, logit adjustment, Softmax-EQL, KD.

Every loss takes logits ``(N, C)`` of any float dtype and either hard labels ``(N,)`` (integers) or soft
targets ``(N, C)`` (probabilities, rows summing to 1: CutMix/Mixup and distillation produce them), and
returns a float32 scalar, the mean over the batch. The maths runs in float32 (``logits.float()``), also
under autocast. :func:`build_criterion` turns the classifier config's knobs into one of these modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.lib.heads import class_counts

LOSSES = ("ce", "focal", "eql")


def class_prior(counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class prior from training counts: ``counts / counts.sum()`` as float32 ``(C,)``.

    Args:
        counts: number of training images per class, indexed by class id; every count must be >= 1.

    Raises:
        ValueError: if ``counts`` is empty, not 1-D, or holds a count below 1 (the class is named).
    """
    n = class_counts(counts, "class_prior")
    return torch.from_numpy(n / n.sum()).float()


def _check_prior(prior, n_classes: int | None, who: str) -> torch.Tensor:
    """``prior`` as a float32 1-D tensor of positive values (and length ``n_classes`` when given)."""
    p = torch.as_tensor(np.asarray(prior.cpu() if isinstance(prior, torch.Tensor) else prior)).float()
    if p.ndim != 1 or p.numel() == 0 or (n_classes is not None and p.numel() != n_classes):
        raise ValueError(f"{who}: prior must have shape ({n_classes or 'C'},), got {tuple(p.shape)}")
    if not bool((p > 0).all()):
        raise ValueError(f"{who}: prior must be > 0 everywhere; class {int((~(p > 0)).nonzero()[0])} is not")
    return p


def logit_adjust(logits: torch.Tensor | np.ndarray, prior, tau: float = 1.0) -> torch.Tensor | np.ndarray:
    """Post-hoc logit adjustment: ``logits - tau * log(prior)``.

    Menon et al., https://arxiv.org/abs/2007.07314. Subtracting the log prior removes the training label
    frequencies from the scores, so rare classes are no longer out-ranked just for being rare; ``tau = 0``
    returns the logits unchanged.

    Args:
        logits: ``(..., C)`` scores, a torch tensor (float32 comes back) or a numpy array (its float dtype,
            or float32 for integer input, comes back).
        prior: ``(C,)`` positive class prior, e.g. :func:`class_prior` of the training counts.
        tau: strength of the adjustment.
    """
    n_classes = logits.shape[-1]
    p = _check_prior(prior, n_classes, "logit_adjust")
    if isinstance(logits, np.ndarray):
        dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float32
        out = logits.astype(np.float64) - tau * np.log(p.numpy().astype(np.float64))
        return out.astype(dtype)
    return logits.float() - tau * torch.log(p.to(logits.device))


def to_soft_targets(target: torch.Tensor, n_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hard labels or soft targets as float32 ``(N, C)`` probabilities, smoothed as ``(1 - e) * t + e / C``.

    Args:
        target: ``(N,)`` integer labels in ``[0, n_classes)`` or ``(N, n_classes)`` float probabilities.
        n_classes: number of classes ``C``.
        label_smoothing: ``e`` in ``[0, 1)``; applied to hard and soft targets alike (as ``F.cross_entropy``).

    Raises:
        ValueError: on a label out of range (the row is named), a wrong shape, or a bad smoothing value.
    """
    _smoothing(label_smoothing, "to_soft_targets")
    if target.ndim == 1 and not torch.is_floating_point(target):
        bad = ((target < 0) | (target >= n_classes)).nonzero()
        if bad.numel():
            row = int(bad[0])
            label = int(target[row])
            raise ValueError(f"to_soft_targets: row {row} has label {label}, not in [0, {n_classes})")
        soft = F.one_hot(target.long(), n_classes).float()
    elif target.ndim == 2 and target.shape[1] == n_classes and torch.is_floating_point(target):
        soft = target.float()
    else:
        raise ValueError(
            f"to_soft_targets: target must be (N,) integer labels or (N, {n_classes}) float probabilities, "
            f"got {tuple(target.shape)} {target.dtype}"
        )
    if label_smoothing > 0:
        soft = (1.0 - label_smoothing) * soft + label_smoothing / n_classes
    return soft


def _smoothing(value: float, who: str) -> float:
    """``value`` as a float in ``[0, 1)``, checked when a loss is built rather than at its first batch."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{who}: label_smoothing must be in [0, 1), got {value}")
    return float(value)


def _prepare(logits: torch.Tensor, target: torch.Tensor, smoothing: float, who: str):
    """Float32 logits and matching float32 soft targets; clear error on mismatched batch sizes."""
    if logits.ndim != 2:
        raise ValueError(f"{who}: logits must be (N, C), got {tuple(logits.shape)}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"{who}: {logits.shape[0]} rows of logits but {target.shape[0]} targets")
    return logits.float(), to_soft_targets(target, logits.shape[1], smoothing).to(logits.device)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy ``-sum_c t_c log softmax(z)_c`` averaged over the batch, for hard or soft targets.

    With hard labels it equals ``F.cross_entropy(logits, labels, label_smoothing=e)``.

    Args:
        label_smoothing: ``e``: targets become ``(1 - e) * t + e / C``.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _smoothing(label_smoothing, "SoftTargetCrossEntropy")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, t = _prepare(logits, target, self.label_smoothing, type(self).__name__)
        return -(t * F.log_softmax(logits, dim=1)).sum(1).mean()


class FocalLoss(nn.Module):
    """Softmax focal loss ``-sum_c t_c (1 - p_c)^g log p_c`` (Lin et al., https://arxiv.org/abs/1708.02002).

    Well-classified samples (``p_c`` near 1) are down-weighted by ``(1 - p_c)^g``; ``g = 0`` is the plain
    cross-entropy. Soft targets weight every class's term by its probability.

    Args:
        gamma: focusing exponent ``g`` >= 0.
        label_smoothing: as in :class:`SoftTargetCrossEntropy`.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.label_smoothing = _smoothing(label_smoothing, "FocalLoss")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, t = _prepare(logits, target, self.label_smoothing, type(self).__name__)
        log_p = F.log_softmax(logits, dim=1)
        weight = (1.0 - log_p.exp()).clamp(min=0.0) ** self.gamma  # clamp: rounding can give p a hair above 1
        return -(t * weight * log_p).sum(1).mean()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted training loss (Menon et al., https://arxiv.org/abs/2007.07314).

    Computes ``base(logits + tau * log(prior), target)``: during training the frequent classes get a head
    start, so the network's raw logits must learn a larger margin for the rare ones. Predict with the raw
    logits (no post-hoc adjustment on top).

    Args:
        base: the loss to wrap, e.g. :class:`SoftTargetCrossEntropy` or :class:`FocalLoss`.
        prior: ``(C,)`` positive class prior (:func:`class_prior`); stored as the buffer ``log_prior``.
        tau: strength of the adjustment.
    """

    def __init__(self, base: nn.Module, prior, tau: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.tau = float(tau)
        self.register_buffer("log_prior", torch.log(_check_prior(prior, None, "LogitAdjustedLoss")))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.log_prior.numel():
            raise ValueError(
                f"LogitAdjustedLoss: logits have {logits.shape[-1]} classes, prior {self.log_prior.numel()}"
            )
        return self.base(logits.float() + self.tau * self.log_prior, target)


class SoftmaxEQL(nn.Module):
    """Softmax equalization loss (Tan et al., "The Equalization Losses", https://arxiv.org/abs/2210.05566).

    For a sample of class ``y`` every other class's logit is raised by ``tau * log(g_j / g_y)``, ``g`` being
    the positive gradients each class has accumulated so far: a rare class (small ``g_j``) is lowered where it
    is a negative, so it gets less discouraging gradient from the frequent ones. ``g`` starts at 0 (clamped
    to ``eps``: plain cross-entropy at first) and each training-mode forward adds ``sum_i t_ic |p_ic - s_ic|
    / N`` (``p`` the adjusted softmax, ``t`` the targets, ``s`` the smoothed targets): the positive part of
    the gradient of the batch-mean loss, what the backward hook of the ``SoftmaxEQLLoss`` used by
    https://github.com/Ezra-Yu/ACCV2022_FGIA_1st collects. Eval mode adds nothing.

    Soft targets use ``sum_c t_c log g_c`` for ``log g_y`` (a per-row constant, to which the softmax is
    blind); for hard labels this is the paper's loss. Label smoothing changes the cross-entropy's targets,
    not which classes count as positives. Single-process: ``g`` is not all-reduced across ranks.

    Args:
        n_classes: number of classes ``C``.
        tau: strength of the adjustment (``tau = 0`` is plain cross-entropy).
        label_smoothing: as in :class:`SoftTargetCrossEntropy`.
        eps: floor of ``g`` before the log (classes not yet seen as positives).
    """

    def __init__(
        self, n_classes: int, tau: float = 1.0, label_smoothing: float = 0.0, eps: float = 1e-4
    ) -> None:
        super().__init__()
        if n_classes < 1 or eps <= 0:
            raise ValueError(f"SoftmaxEQL: need n_classes >= 1 and eps > 0, got {n_classes}, {eps}")
        self.n_classes = int(n_classes)
        self.tau = float(tau)
        self.label_smoothing = _smoothing(label_smoothing, "SoftmaxEQL")
        self.eps = float(eps)
        self.register_buffer("pos_grad", torch.zeros(n_classes, dtype=torch.float32))

    def adjust(self, logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
        """Adjusted float32 logits ``z_j + tau * (log g_j - sum_c t_c log g_c)`` for the current ``g``.

        Args:
            logits: ``(N, C)`` logits.
            soft_target: ``(N, C)`` float targets (see :func:`to_soft_targets`).
        """
        log_g = torch.log(self.pos_grad.clamp(min=self.eps))
        return logits.float() + self.tau * (log_g[None, :] - (soft_target * log_g).sum(1, keepdim=True))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.n_classes:
            raise ValueError(f"SoftmaxEQL: logits have {logits.shape[-1]} classes, expected {self.n_classes}")
        # The unsmoothed targets say which classes are positives; the smoothed ones enter the cross-entropy.
        logits, t0 = _prepare(logits, target, 0.0, type(self).__name__)
        t = (1.0 - self.label_smoothing) * t0 + self.label_smoothing / self.n_classes
        log_p = F.log_softmax(self.adjust(logits, t0), dim=1)
        if self.training:
            with torch.no_grad():  # d(mean loss)/d logits = (p - t) / N; keep its positive part
                grad = (log_p.exp() - t).abs() / logits.shape[0]
                self.pos_grad += (grad * t0).sum(0)
        return -(t * log_p).sum(1).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Knowledge distillation loss ``T^2 KL(teacher_T || student_T)``.

    Hinton et al., https://arxiv.org/abs/1503.02531. ``student_T = softmax(z / T)`` and
    ``teacher_T = softmax(log(p) / T)`` (the teacher's probabilities softened at the same temperature); the
    ``T^2`` keeps the gradient scale independent of ``T``. Averaged over the batch.

    Args:
        student_logits: ``(N, C)`` logits of the student.
        teacher_probs: ``(N, C)`` teacher probabilities (zeros allowed).
        temperature: ``T`` > 0.
    """
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    if student_logits.ndim != 2 or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must both be (N, C)"
        )
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.softmax(torch.log(teacher_probs.float().to(log_s.device)) / temperature, dim=1)
    kl = (torch.special.xlogy(t, t) - t * log_s).sum(1)  # xlogy: 0 * log 0 = 0 for zero teacher probabilities
    return kl.mean() * temperature**2


def mix_hard_soft(
    labels: torch.Tensor, soft: torch.Tensor, n_classes: int, soft_weight: float = 0.2
) -> torch.Tensor:
    """Self-distillation targets ``(1 - w) * onehot(labels) + w * soft`` as float32 ``(N, C)``.

    Args:
        labels: ``(N,)`` integer labels (or ``(N, C)`` probabilities, mixed the same way).
        soft: ``(N, C)`` soft targets, e.g. an earlier model's out-of-fold probabilities.
        n_classes: number of classes ``C``.
        soft_weight: ``w`` in ``[0, 1]``; the default 0.2 is a 8:2 hard:soft mix.
    """
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"mix_hard_soft: soft_weight must be in [0, 1], got {soft_weight}")
    hard = to_soft_targets(labels, n_classes)
    soft = to_soft_targets(torch.as_tensor(soft, dtype=torch.float32), n_classes).to(hard.device)
    if soft.shape[0] != hard.shape[0]:
        raise ValueError(f"mix_hard_soft: {hard.shape[0]} labels but {soft.shape[0]} soft rows")
    return (1.0 - soft_weight) * hard + soft_weight * soft


def build_criterion(
    loss: str,
    n_classes: int,
    counts: Sequence[int] | np.ndarray | None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    eql_tau: float = 1.0,
    la_tau: float = 0.0,
) -> nn.Module:
    """The training criterion named by the classifier config.

    Args:
        loss: ``"ce"`` (:class:`SoftTargetCrossEntropy`), ``"focal"`` (:class:`FocalLoss`) or ``"eql"``
            (:class:`SoftmaxEQL`).
        n_classes: number of classes ``C``.
        counts: training images per class (length ``C``); needed only when ``la_tau > 0``.
        label_smoothing: passed to the loss.
        focal_gamma: focusing exponent of ``"focal"``.
        eql_tau: adjustment strength of ``"eql"``.
        la_tau: when > 0, wrap the loss in :class:`LogitAdjustedLoss` with the prior of ``counts``.

    Raises:
        ValueError: on an unknown ``loss``, a negative ``la_tau``, or missing or wrong-length ``counts``.
    """
    if loss not in LOSSES:
        raise ValueError(f"build_criterion: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if la_tau < 0:
        raise ValueError(f"build_criterion: la_tau must be >= 0, got {la_tau}")
    if loss == "ce":
        criterion: nn.Module = SoftTargetCrossEntropy(label_smoothing)
    elif loss == "focal":
        criterion = FocalLoss(focal_gamma, label_smoothing)
    else:
        criterion = SoftmaxEQL(n_classes, eql_tau, label_smoothing)
    if la_tau > 0:
        if counts is None or len(counts) != n_classes:
            got = "none" if counts is None else len(counts)
            raise ValueError(f"build_criterion: la_tau > 0 needs counts for {n_classes} classes, got {got}")
        criterion = LogitAdjustedLoss(criterion, class_prior(counts), la_tau)
    return criterion
