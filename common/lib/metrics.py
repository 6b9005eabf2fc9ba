"""Scores of ranked predictions: Happywhale / Kaggle MAP@5 and a known/new break-down of it.

The competition metric is Kaggle's mean average precision at 5 with exactly one true label per image
(``apk``/``mapk`` from https://github.com/benhamner/Metrics, as used by
https://www.kaggle.com/competitions/happy-whale-and-dolphin/overview/evaluation): an image scores ``1/r`` when
its true label first appears at rank ``r <= k`` of its predictions, else 0, and the metric is the mean over
images. A repeated prediction can never score twice: only the first occurrence of the truth counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.lib import topk

NEW_LABEL = "new_individual"


def _as_labels(pred: Sequence[str] | str) -> list[str]:
    """A row of predictions as a list; a string is a space-separated submission row (``"a b new_individual"``)."""
    if isinstance(pred, str):
        return pred.split()
    return [str(p) for p in pred]


def reciprocal_ranks(
    truth: Sequence[str], predictions: Sequence[Sequence[str] | str], k: int = 5
) -> np.ndarray:
    """Per-image score: ``1/rank`` of the first correct prediction within the first ``k``, else 0.

    Args:
        truth: one true label per image.
        predictions: one ranked list of labels per image, or one space-separated string per image.
        k: how many predictions count.

    Returns:
        float64 array with one score per image.
    """
    if isinstance(truth, str):
        raise TypeError("truth must be a sequence of labels, one per image, not a single string")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    truth = list(truth)
    predictions = list(predictions)
    if len(truth) != len(predictions):
        raise ValueError(
            f"truth has {len(truth)} rows but predictions has {len(predictions)}: they must align"
        )
    out = np.zeros(len(truth), dtype=np.float64)
    for row, (t, pred) in enumerate(zip(truth, predictions, strict=True)):
        labels = _as_labels(pred)[:k]
        t = str(t)
        if t in labels:
            # list.index is the first occurrence: a duplicate of the truth further down cannot add score.
            out[row] = 1.0 / (labels.index(t) + 1)
    return out


def map_at_k(truth: Sequence[str], predictions: Sequence[Sequence[str] | str], k: int = 5) -> float:
    """Kaggle MAP@k with a single true label per image (the Happywhale metric for ``k=5``).

    Args:
        truth: one true label per image.
        predictions: one ranked list of labels per image (or one space-separated string per image).
        k: how many predictions count.

    Returns:
        The mean over images of ``1/rank`` of the first correct prediction (0 when it is not in the top ``k``).
    """
    rr = reciprocal_ranks(truth, predictions, k)
    if rr.size == 0:
        raise ValueError("map_at_k: no images to score (truth is empty)")
    return float(rr.mean())


def map5_report(
    truth: Sequence[str],
    predictions: Sequence[Sequence[str] | str],
    known: set[str],
    new_label: str = NEW_LABEL,
) -> dict:
    """MAP@5 overall and split into images of known individuals and of new ones.

    Args:
        truth: one true label per image. Labels not in ``known`` are replaced by ``new_label`` first, so raw
            validation labels can be passed as they are.
        predictions: one ranked list (or space-separated string) per image.
        known: the individuals the predictor could have named (its gallery's labels).
        new_label: the label that stands for "not in the gallery".

    Returns:
        ``{"map5", "map5_known", "map5_new", "n", "n_known", "n_new", "top1"}``. ``map5_known``/``map5_new`` are
        ``None`` (not NaN, so the dict stays valid JSON) when there are no such images.
    """
    if isinstance(truth, str):
        raise TypeError("truth must be a sequence of labels, one per image, not a single string")
    known = {str(x) for x in known}
    mapped = [str(t) if str(t) in known else new_label for t in truth]
    rr = reciprocal_ranks(mapped, predictions, k=5)
    if rr.size == 0:
        raise ValueError("map5_report: no images to score (truth is empty)")
    is_new = np.array([t == new_label for t in mapped], dtype=bool)
    n_new = int(is_new.sum())
    n_known = int((~is_new).sum())
    return {
        "map5": float(rr.mean()),
        "map5_known": float(rr[~is_new].mean()) if n_known else None,
        "map5_new": float(rr[is_new].mean()) if n_new else None,
        "n": int(rr.size),
        "n_known": n_known,
        "n_new": n_new,
        # rank 1 is the only rank with reciprocal rank exactly 1.
        "top1": float((rr == 1.0).mean()),
    }


def classification_report(truth: Sequence[int] | np.ndarray, scores: np.ndarray,
                          n_classes: int | None = None) -> dict:
    """Accuracy, balanced accuracy, top-5 accuracy and per-class recall of class scores.

    Args:
        truth: one true class index per row.
        scores: ``(N, C)`` probabilities or logits (only their order within a row matters), dense or a
            :class:`common.lib.topk.TopK`.
        n_classes: number of classes (default ``scores.shape[1]``).

    Returns:
        ``{"accuracy", "balanced_accuracy", "top5", "n", "per_class_recall"}``. Balanced accuracy is the mean
        recall over the classes that occur in ``truth`` (as scikit-learn's ``balanced_accuracy_score``);
        ``per_class_recall`` lists every class, ``None`` where the class has no rows.
    """
    y = np.asarray(truth, dtype=np.int64).ravel()
    s = scores if isinstance(scores, topk.TopK) else np.asarray(scores)
    if len(s.shape) != 2 or len(s) != len(y):
        raise ValueError(f"classification_report: scores must be (N, C) with N = {len(y)}, got {s.shape}")
    if len(y) == 0:
        raise ValueError("classification_report: no rows to score")
    n_classes = s.shape[1] if n_classes is None else n_classes
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"classification_report: labels must be in 0..{n_classes - 1}")
    pred = topk.argmax(s)
    hit = pred == y
    k = min(5, s.shape[1])
    if isinstance(s, topk.TopK):  # the kept columns are sorted: the first five are the top five
        top = s.index[:, :k]
    else:
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    recall: list[float | None] = []
    for c in range(n_classes):
        rows = y == c
        recall.append(float(hit[rows].mean()) if rows.any() else None)
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(hit.mean()),
        "balanced_accuracy": float(np.mean(present)),
        "top5": float((top == y[:, None]).any(1).mean()),
        "n": int(len(y)),
        "per_class_recall": recall,
    }


def rounded_report(y: np.ndarray, scores: np.ndarray, n_classes: int, digits: int = 4) -> dict[str, Any]:
    """:func:`classification_report` with the per-class recalls rounded, as stages 05 and 06 write it.

    Args:
        y: true class indices, shape ``(n,)``.
        scores: class scores, shape ``(n, n_classes)``.
        n_classes: number of classes.
        digits: decimals kept of each per-class recall.
    """
    rep = classification_report(y, scores, n_classes)
    rep["per_class_recall"] = [None if r is None else round(r, digits) for r in rep["per_class_recall"]]
    return rep
