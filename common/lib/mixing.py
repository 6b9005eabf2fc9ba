"""Batch-level CutMix and Mixup: mix a batch of images with a permutation of itself, and their targets.

- Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", https://arxiv.org/abs/1710.09412):
  ``x = lam * x + (1 - lam) * x[perm]``, targets mixed with the same ``lam``.
- CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features", https://arxiv.org/abs/1905.04899): a box of area ``(1 - lam) * H * W`` is pasted from
  ``x[perm]``; ``lam`` is then recomputed from the box as clipped to the image, so the targets match the
  pixels actually pasted.

timm's ``timm.data.Mixup`` (https://github.com/huggingface/pytorch-image-models/blob/main/timm/data/mixup.py)
in its ``mode="batch"``, ``correct_lam=True`` setting is the reference behaviour. Two differences: the partner
of each image is a random permutation (timm flips the batch), and every draw comes from the mixer's own
generator, reseeded by :meth:`BatchMixer.set_epoch`, so a run resumed at an epoch boundary draws the same
boxes and ``lam`` values as an uninterrupted one. timm's class itself cannot be used: it asserts an even batch
(a batch per process can be odd here) and draws from the global NumPy RNG, which other code also draws from.

Targets here are always probabilities ``(N, C)``: build them from integer labels with :func:`one_hot`, which
also applies label smoothing the way timm does (``off = s / C``, ``on = 1 - s + s / C``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def one_hot(
    labels: torch.Tensor | Sequence[int] | np.ndarray,
    n_classes: int,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Integer class labels to (optionally smoothed) one-hot probabilities.

    Smoothing spreads ``smoothing`` evenly over all ``n_classes`` classes, the target class included (as in
    timm and ``nn.CrossEntropyLoss(label_smoothing=...)``): ``off = smoothing / C`` and
    ``on = 1 - smoothing + smoothing / C``, so every row still sums to 1.

    Args:
        labels: ``(N,)`` integer class ids in ``[0, n_classes)``.
        n_classes: number of classes ``C``.
        smoothing: label smoothing in ``[0, 1)``.

    Returns:
        A float32 tensor ``(N, C)`` on the device of ``labels``.

    Raises:
        ValueError: if ``labels`` is not 1-D integer, a label is out of range (the row is named), or
            ``n_classes``/``smoothing`` is invalid.
    """
    if n_classes < 1:
        raise ValueError(f"one_hot: n_classes must be >= 1, got {n_classes}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"one_hot: smoothing must be in [0, 1), got {smoothing}")
    labels = torch.as_tensor(labels)
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    if labels.ndim != 1 or not integer:
        raise ValueError(
            f"one_hot: labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} "
            f"dtype {labels.dtype}"
        )
    bad = torch.nonzero((labels < 0) | (labels >= n_classes)).flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"one_hot: label {int(labels[row])} at row {row} is outside [0, {n_classes})")
    off = smoothing / n_classes
    out = torch.full((labels.shape[0], n_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The CutMix box of area ``(1 - lam) * h * w`` centred at ``(cy, cx)``, clipped to the image.

    The box has the image's aspect ratio: side lengths ``round(h * sqrt(1 - lam))`` and
    ``round(w * sqrt(1 - lam))``. timm truncates with ``int``; rounding keeps e.g. ``lam = 0.91`` on a
    10-pixel side from losing a pixel to ``10 * sqrt(1 - 0.91) = 2.999...``. An odd side puts the extra pixel
    after the centre, as timm does. Near a border the box is clipped, so its area can be smaller:
    :func:`cutmix` recomputes ``lam`` from it.

    Args:
        h: image height in pixels.
        w: image width in pixels.
        lam: share of the image kept from the original, in ``[0, 1]``.
        cy: centre row, in ``[0, h)``.
        cx: centre column, in ``[0, w)``.

    Returns:
        ``(y0, y1, x0, x1)``, half-open: the box is ``rows y0:y1, columns x0:x1``.

    Raises:
        ValueError: on a non-positive size, ``lam`` outside ``[0, 1]`` or a centre outside the image.
    """
    if h < 1 or w < 1:
        raise ValueError(f"cutmix_box: image size must be positive, got h={h}, w={w}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"cutmix_box: lam must be in [0, 1], got {lam}")
    if not (0 <= cy < h and 0 <= cx < w):
        raise ValueError(f"cutmix_box: centre (cy={cy}, cx={cx}) is outside the {h}x{w} image")
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = round(h * ratio), round(w * ratio)
    y0 = min(max(cy - cut_h // 2, 0), h)
    y1 = min(max(cy + (cut_h + 1) // 2, 0), h)
    x0 = min(max(cx - cut_w // 2, 0), w)
    x1 = min(max(cx + (cut_w + 1) // 2, 0), w)
    return int(y0), int(y1), int(x0), int(x1)


def _check_batch(fn: str, x: torch.Tensor, targets: torch.Tensor, perm) -> torch.Tensor:
    """Validate a batch, its probability targets and the permutation; return ``perm`` as a long tensor."""
    n = x.shape[0] if x.ndim else 0
    if targets.ndim != 2 or not targets.dtype.is_floating_point:
        raise ValueError(
            f"{fn}: targets must be float probabilities (N, C), got shape {tuple(targets.shape)} dtype "
            f"{targets.dtype}; convert integer labels with one_hot(labels, n_classes, smoothing)"
        )
    if targets.shape[0] != n:
        raise ValueError(f"{fn}: {n} images but {targets.shape[0]} target rows")
    perm = torch.as_tensor(perm)  # checked where it lives (CPU for BatchMixer: no device sync), then moved
    if perm.ndim != 1 or perm.shape[0] != n or perm.dtype.is_floating_point:
        raise ValueError(
            f"{fn}: perm must be {n} integer indices, got shape {tuple(perm.shape)} dtype {perm.dtype}"
        )
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise ValueError(f"{fn}: perm holds an index outside [0, {n})")
    return perm.long().to(x.device)


def cutmix(
    x: torch.Tensor,
    targets: torch.Tensor,
    perm: torch.Tensor | Sequence[int],
    box: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste ``box`` of each image's partner ``x[perm[i]]`` into image ``i``; mix the targets by area.

    ``x`` is not modified. ``lam`` is recomputed from the box (``1 - box area / (H * W)``), so a box clipped
    at a border gives the targets the share of pixels that was really pasted (timm's ``correct_lam=True``).

    Args:
        x: images ``(N, ..., H, W)``, e.g. ``(N, 3, H, W)``.
        targets: probabilities ``(N, C)``.
        perm: ``(N,)`` partner index of each image.
        box: ``(y0, y1, x0, x1)`` from :func:`cutmix_box`.

    Returns:
        ``(x_mixed, targets_mixed, lam)`` with ``targets_mixed = lam * targets + (1 - lam) * targets[perm]``.

    Raises:
        ValueError: on mismatched shapes, integer targets, a bad permutation or a box outside the image.
    """
    if x.ndim < 3:
        raise ValueError(f"cutmix: images must be (N, ..., H, W), got shape {tuple(x.shape)}")
    perm = _check_batch("cutmix", x, targets, perm)
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = (int(v) for v in box)
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"cutmix: box {tuple(box)} is not inside the {h}x{w} image")
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, lam * targets + (1.0 - lam) * targets[perm], lam


def mixup(
    x: torch.Tensor,
    targets: torch.Tensor,
    perm: torch.Tensor | Sequence[int],
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend every image with its partner: ``lam * x + (1 - lam) * x[perm]``, and the targets alike.

    Args:
        x: batch ``(N, ...)`` of any shape after the first axis.
        targets: probabilities ``(N, C)``.
        perm: ``(N,)`` partner index of each image.
        lam: weight of the original image, in ``[0, 1]``.

    Returns:
        ``(x_mixed, targets_mixed)``; ``x`` is not modified.

    Raises:
        ValueError: on mismatched shapes, integer targets, a bad permutation or ``lam`` outside ``[0, 1]``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup: lam must be in [0, 1], got {lam}")
    perm = _check_batch("mixup", x, targets, perm)
    lam = float(lam)
    return lam * x + (1.0 - lam) * x[perm], lam * targets + (1.0 - lam) * targets[perm]


class BatchMixer:
    """Kept over timm.data.Mixup, which asserts an even batch and draws from the global NumPy RNG (test_mixing).

    Draws, per batch, whether to mix, CutMix or Mixup, ``lam ~ Beta(alpha, alpha)``, a partner permutation
    and (CutMix) a box centre, then applies it.

    All draws come from a NumPy generator seeded by ``(seed, epoch)``: call :meth:`set_epoch` at the start of
    each epoch and a resumed run repeats the draws of an uninterrupted one (the batches must come in the same
    order too). Before the first :meth:`set_epoch` the generator is that of epoch 0.

    Args:
        mixup_alpha: Beta parameter of Mixup; Mixup is off when 0.
        cutmix_alpha: Beta parameter of CutMix; CutMix is off when 0.
        prob: probability that a batch is mixed at all.
        switch_prob: when both are on, probability of CutMix rather than Mixup for a mixed batch.
        seed: base seed of the draws.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(
                f"BatchMixer: alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}"
            )
        for name, p in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"BatchMixer: {name} must be in [0, 1], got {p}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._rng = np.random.default_rng([self.seed, self.epoch])

    @property
    def enabled(self) -> bool:
        """Whether a batch can be mixed at all: one alpha is positive and ``prob > 0``."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the draws from ``(seed, epoch)``.

        Args:
            epoch: the epoch about to start (0-based or 1-based, as long as the caller is consistent).
        """
        self.epoch = int(epoch)
        self._rng = np.random.default_rng([self.seed, self.epoch])

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix one batch (or return it unchanged: mixer disabled, or the ``prob`` draw said no).

        Args:
            x: images ``(N, C, H, W)``.
            targets: probabilities ``(N, n_classes)``, e.g. from :func:`one_hot`.

        Returns:
            ``(x, targets)``, mixed; the inputs themselves when nothing is mixed.
        """
        if not self.enabled:
            return x, targets
        rng = self._rng
        if rng.random() >= self.prob:
            return x, targets
        if self.cutmix_alpha > 0 and self.mixup_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(x.shape[0]))
        if use_cutmix:
            h, w = x.shape[-2:]
            box = cutmix_box(h, w, lam, int(rng.integers(h)), int(rng.integers(w)))
            x, targets, _ = cutmix(x, targets, perm, box)
            return x, targets
        return mixup(x, targets, perm, lam)

    def __repr__(self) -> str:
        return (
            f"BatchMixer(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, seed={self.seed})"
        )
