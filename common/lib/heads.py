"""Margin-based classification heads: the ArcFace family that trains the embedder.

One class, :class:`ArcMarginProduct`, covers the variants used in re-identification competitions:

- ArcFace, an additive angular margin on the target class (Deng et al., https://arxiv.org/abs/1801.07698);
- sub-center ArcFace, ``k`` learnable centres per class with the cosine taken as their maximum
  (Deng et al., ECCV 2020,
  https://www.ecva.net/papers/eccv_2020/papers_ECCV/papers/123560715.pdf);
- dynamic (per-class) margins that grow as a class gets rarer, as in the 3rd place solution of the Google
  Landmark Recognition 2020 competition (Henkel & Singer, "Supporting large-scale image recognition with
  out-of-domain samples", https://arxiv.org/abs/2010.05350; code: https://github.com/psinger/kaggle-landmark-recognition-2020-solution);
  see :func:`dynamic_margins`.

The head returns logits; the loss is a plain ``nn.CrossEntropyLoss`` over them. The margin maths always runs
in float32, also under autocast, as mmpretrain's ArcFace head does: ``cos(theta + m)`` near ``cos = 1`` is
too coarse in float16/bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Floor of ``1 - cos^2`` before the square root: keeps the forward free of NaN when rounding pushes |cos|
# past 1, and keeps the backward finite at cos = +-1 (the exact derivative of sqrt is infinite at 0).
_SINE_SQ_FLOOR = 1e-6


def dynamic_margins(
    counts: Sequence[int] | np.ndarray,
    a: float = 0.5,
    p: float = -0.25,
    b: float = 0.05,
    form: str = "power",
    m_min: float = 0.05,
    m_max: float = 0.5,
) -> torch.Tensor:
    """Per-class ArcFace margins from class frequencies; rare classes get larger margins.

    Two forms:

    - ``"power"``: ``m_c = a * n_c ** p + b``. With ``p < 0`` the margin shrinks as a class gets more images:
      rare classes (few images, the usual case for individuals in re-identification) get larger margins, which
      pushes their few embeddings further from the other classes and acts as a regulariser where the data
      cannot. The defaults ``a = 0.5, p = -0.25, b = 0.05`` give ``m = 0.55`` for a class with one image and
      ``m ~ 0.139`` for one with 1,000; they are this project's choice, not the cited solution's.
    - ``"rescaled"``: what the 3rd place Google Landmark Recognition 2020 solution does (Henkel & Singer,
      https://arxiv.org/abs/2010.05350; its code computes ``t = sqrt(1 / sqrt(n))`` and
      ``(t - t.min()) / (t.max() - t.min()) * arcface_m_x + arcface_m_y``, with ``m_x = 0.45, m_y = 0.05``):
      ``t_c = n_c ** -1/4`` min-max rescaled into ``[m_min, m_max]``, so the rarest class gets ``m_max`` and the
      most frequent ``m_min`` whatever the counts. When every class has the same count, all get ``m_max``.

    Args:
        counts: number of training images per class, indexed by class id; every count must be >= 1.
        a: ``power``: scale of the frequency term.
        p: ``power``: exponent of the frequency term (negative: rarer classes get larger margins).
        b: ``power``: floor added to every margin.
        form: ``"power"`` or ``"rescaled"``.
        m_min: ``rescaled``: margin of the most frequent class.
        m_max: ``rescaled``: margin of the rarest class.

    Returns:
        A float32 tensor of shape ``(len(counts),)``, ready to pass as ``ArcMarginProduct(margins=...)``.

    Raises:
        ValueError: if ``counts`` is empty, not one-dimensional, or holds a count below 1; an unknown ``form``;
            ``m_min > m_max``.
    """
    n = class_counts(counts, "dynamic_margins")
    if form == "power":
        return torch.from_numpy(a * n**p + b).float()
    if form != "rescaled":
        raise ValueError(f"margin_form={form!r}: use 'power' or 'rescaled'")
    if m_min > m_max:
        raise ValueError(f"margin_min={m_min} > margin_max={m_max}")
    t = n**-0.25
    span = t.max() - t.min()
    scaled = (t - t.min()) / span if span > 0 else np.ones_like(t)
    return torch.from_numpy(m_min + scaled * (m_max - m_min)).float()


def margins_from_config(counts: Sequence[int] | np.ndarray, cfg: dict) -> torch.Tensor:
    """:func:`dynamic_margins` with a stage config's fields (``margin_a/p/b``, ``margin_form``,
    ``margin_min/max``; the last three default to the ``power`` form when a stored config predates them).

    Args:
        counts: images per class.
        cfg: a config as a dict (``dataclasses.asdict`` or a fold's stored ``config.json``).
    """
    return dynamic_margins(counts, cfg["margin_a"], cfg["margin_p"], cfg["margin_b"],
                           form=cfg.get("margin_form", "power"), m_min=cfg.get("margin_min", 0.05),
                           m_max=cfg.get("margin_max", 0.5))


def class_counts(counts: Sequence[int] | np.ndarray | torch.Tensor, who: str) -> np.ndarray:
    """Training images per class as a float64 array, checked: non-empty, 1-D, every count >= 1.

    Args:
        counts: one count per class id (a sequence, array or tensor).
        who: the caller's name, for the error message.

    Raises:
        ValueError: naming the first bad class and how many there are.
    """
    n = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"{who}: counts must be a non-empty 1-D sequence, got shape {n.shape}")
    bad = np.flatnonzero(~(n >= 1))
    if bad.size:
        raise ValueError(f"{who}: every class needs a count >= 1; class {int(bad[0])} has {n[bad[0]]:g} "
                         f"({bad.size} bad classes in all)")
    return n


def sample_classes(positives: torch.Tensor, n_classes: int, n_sample: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Partial FC's class sampling: the classes whose logits one training batch computes.

    The batch's own classes (``positives``) are always kept; random other classes fill the set up to ``n_sample``.
    Scoring only these bounds the head's cost per image by ``n_sample`` instead of the number of classes, which
    grows with the data when the classes are individuals (Happywhale: 15,587). The softmax is taken over the
    sampled classes, so the loss sees ``n_sample - positives`` negatives per batch instead of all of them; An et
    al. report accuracy comparable to the full softmax at 10 % of the classes (Partial FC, CVPR 2022,
    https://arxiv.org/abs/2203.15565; first version https://arxiv.org/abs/2010.05222).

    Args:
        positives: class ids that must be sampled (a batch's labels; repeats allowed), any device.
        n_classes: number of classes ``C``.
        n_sample: classes to return; ``0`` or ``>= C`` returns all of them. When the batch holds more distinct
            classes than ``n_sample``, all of them are returned.
        generator: a CPU generator, for reproducible draws.

    Returns:
        Sorted int64 class ids on ``positives``' device.

    Raises:
        ValueError: on a negative ``n_sample`` or a positive outside ``[0, C)``.
    """
    if n_sample < 0:
        raise ValueError(f"sample_classes: n_sample must be >= 0, got {n_sample}")
    positives = positives.long().view(-1)
    if positives.numel() and (int(positives.min()) < 0 or int(positives.max()) >= n_classes):
        raise ValueError(f"sample_classes: class ids must be in [0, {n_classes}), got {positives.min()}.."
                         f"{positives.max()}")
    if n_sample == 0 or n_sample >= n_classes:
        return torch.arange(n_classes, device=positives.device)
    key = torch.rand(n_classes, generator=generator)
    key[positives.cpu()] = 2.0  # above every uniform draw: the positives always rank first
    n = max(n_sample, int(torch.unique(positives).numel()))
    return torch.topk(key, n).indices.sort().values.to(positives.device)


def class_columns(classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The column of each label among sorted ``classes`` (Partial FC's logits).

    Raises:
        ValueError: if a label is not among ``classes``.
    """
    labels = labels.long().view(-1)
    pos = torch.searchsorted(classes, labels).clamp(max=max(classes.numel() - 1, 0))
    if classes.numel() == 0 or not bool((classes[pos] == labels).all()):
        missing = labels[classes[pos] != labels] if classes.numel() else labels
        raise ValueError(f"class_columns: label {int(missing[0])} is not among the sampled classes")
    return pos


class ArcMarginProduct(nn.Module):
    """ArcFace / sub-center ArcFace logits with a fixed or per-class additive angular margin.

    Without labels ``forward`` returns ``s * cos(theta)`` (the logits to rank or score with). With labels the
    target class gets ``s * cos(theta + m)`` instead, and the other classes keep ``s * cos(theta)``; train
    with ``nn.CrossEntropyLoss`` over the result.

    Credit: ArcFace (https://arxiv.org/abs/1801.07698), sub-center ArcFace (ECCV 2020,
    https://www.ecva.net/papers/eccv_2020/papers_ECCV/papers/123560715.pdf), dynamic margins
    (https://arxiv.org/abs/2010.05350); the layout follows the insightface / Kaggle ``ArcMarginProduct``.

    Args:
        in_features: embedding size.
        out_features: number of classes.
        s: scale applied to the cosines (the logit temperature).
        m: fixed additive angular margin in radians; ignored when ``margins`` is given.
        margins: optional per-class margins in radians, shape ``(out_features,)`` (see
            :func:`dynamic_margins`). Stored as a buffer, so ``.to(device)`` moves it and ``state_dict``
            keeps it.
        easy_margin: apply the margin only where ``cos > 0`` and leave the rest unchanged, instead of the
            standard fallback beyond ``pi - m``.
        k: sub-centres per class. The weight has shape ``(out_features * k, in_features)``, rows
            ``c * k .. c * k + k - 1`` belonging to class ``c``, and a class's cosine is the max over them.
        ls_eps: label smoothing of the one-hot that chooses where the margin goes (0 disables it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 30.0,
        m: float = 0.5,
        margins: torch.Tensor | None = None,
        easy_margin: bool = False,
        k: int = 1,
        ls_eps: float = 0.0,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or k < 1:
            raise ValueError(
                f"ArcMarginProduct: in_features, out_features and k must be >= 1, "
                f"got {in_features}, {out_features}, {k}"
            )
        if not 0.0 <= ls_eps < 1.0:
            raise ValueError(f"ArcMarginProduct: ls_eps must be in [0, 1), got {ls_eps}")
        self.in_features = in_features
        self.out_features = out_features
        self.s = float(s)
        self.k = int(k)
        self.easy_margin = bool(easy_margin)
        self.ls_eps = float(ls_eps)
        self.weight = nn.Parameter(torch.empty(out_features * k, in_features))
        nn.init.xavier_uniform_(self.weight)

        if margins is None:
            margin = torch.tensor([float(m)], dtype=torch.float32)  # broadcasts over the batch
        else:
            margin = torch.as_tensor(margins, dtype=torch.float32).detach().clone().flatten()
            if margin.numel() != out_features:
                raise ValueError(
                    f"ArcMarginProduct: margins has {margin.numel()} values, expected one per class "
                    f"({out_features})"
                )
        self.per_class = margins is not None
        self.m = None if self.per_class else float(m)
        # Buffers, not attributes: .to(device) moves them and the margin maths never needs .cuda().
        self.register_buffer("margin", margin)
        self.register_buffer("cos_m", torch.cos(margin))
        self.register_buffer("sin_m", torch.sin(margin))
        self.register_buffer("th", torch.cos(math.pi - margin))
        self.register_buffer("mm", torch.sin(math.pi - margin) * margin)

    def extra_repr(self) -> str:
        m = "per-class" if self.per_class else f"{self.m}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, m={m}, "
            f"easy_margin={self.easy_margin}, k={self.k}, ls_eps={self.ls_eps}"
        )

    def cosine(self, embeddings: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine between each embedding and each class (max over sub-centres): float32 ``(N, out_features)``,
        or ``(N, len(classes))`` over the given classes only (Partial FC, :func:`sample_classes`).

        Args:
            embeddings: ``(N, in_features)``, any float dtype; need not be normalised.
            classes: optional sorted class ids whose columns are computed, in that order.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.in_features:
            raise ValueError(
                f"ArcMarginProduct: embeddings must have shape (N, {self.in_features}), "
                f"got {tuple(embeddings.shape)}"
            )
        weight, n_out = self.weight, self.out_features
        if classes is not None:  # only these classes' rows (each class's k sub-centres stay together)
            weight = weight.view(self.out_features, self.k, self.in_features)[classes].reshape(-1, self.in_features)
            n_out = int(classes.numel())
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(weight.float()))
            if self.k > 1:
                cos = cos.view(-1, n_out, self.k).amax(dim=2)
        return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                classes: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosine logits, with the margin on each row's target class when ``labels`` is given.

        Args:
            embeddings: ``(N, in_features)``.
            labels: optional ``(N,)`` integer class ids in ``[0, out_features)``.
            classes: optional sorted class ids (Partial FC, :func:`sample_classes`): the logits are computed for
                these classes only, column ``j`` being class ``classes[j]``; every label must be among them.

        Returns:
            float32 logits of shape ``(N, out_features)`` (``(N, len(classes))`` with ``classes``), also under
            autocast.
        """
        cos = self.cosine(embeddings, classes)
        if labels is None:
            return cos * self.s
        labels = labels.long().view(-1)
        if labels.shape[0] != cos.shape[0]:
            raise ValueError(f"ArcMarginProduct: {cos.shape[0]} embeddings but {labels.shape[0]} labels")
        columns = labels if classes is None else class_columns(classes, labels)
        with torch.autocast(device_type=cos.device.type, enabled=False):
            if self.per_class:  # gather each row's own margin terms by its label
                cos_m, sin_m = self.cos_m[labels, None], self.sin_m[labels, None]
                th, mm = self.th[labels, None], self.mm[labels, None]
            else:
                cos_m, sin_m, th, mm = self.cos_m, self.sin_m, self.th, self.mm
            sine = torch.sqrt((1.0 - cos * cos).clamp(min=_SINE_SQ_FLOOR))
            phi = cos * cos_m - sine * sin_m  # cos(theta + m)
            if self.easy_margin:
                phi = torch.where(cos > 0, phi, cos)
            else:
                # Beyond theta = pi - m, cos(theta + m) would increase again; use the linear
                # cos(theta) - m * sin(m) so the target logit keeps falling as theta grows.
                phi = torch.where(cos > th, phi, cos - mm)
            one_hot = F.one_hot(columns, cos.shape[1]).to(cos.dtype)
            if self.ls_eps > 0:
                one_hot = (1.0 - self.ls_eps) * one_hot + self.ls_eps / cos.shape[1]
            logits = one_hot * phi + (1.0 - one_hot) * cos
        return logits * self.s
