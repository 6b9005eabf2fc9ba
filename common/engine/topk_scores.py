"""Stage 05's bounded-memory predictions: the top-k classes of every image, kept batch by batch
(:mod:`common.lib.topk` is the format and its reader), for :mod:`common.stages.train_classifier` when ``prob_topk``
(or the number of classes) asks for it."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.engine.classifier import predict_logits
from common.lib import topk
from common.lib.losses import class_prior, logit_adjust


def posthoc(logits: np.ndarray, counts: list[int], tau: float) -> np.ndarray:
    """``logits - tau * log prior`` (``la_posthoc_tau``), float32; ``logits`` itself when ``tau == 0``.

    Args:
        logits: ``(n, C)`` logits.
        counts: training images per class.
        tau: the adjustment's strength.
    """
    if not tau:
        return logits
    return logit_adjust(logits, class_prior(np.maximum(counts, 1)).numpy(), tau).astype(np.float32)


def topk_reducer(k: int, counts: list[int], tau: float):
    """The ``reduce`` of :func:`common.engine.classifier.predict_logits`: per batch of logits, the top-k of the
    (post-hoc adjusted) softmax, the logits there, and without the adjustment the raw top-k (``tau > 0``).

    Args:
        k: columns kept.
        counts: training images per class.
        tau: ``la_posthoc_tau``.
    """
    def reduce(logits: np.ndarray) -> dict[str, Any]:
        probs, at = topk.from_logits(posthoc(logits, counts, tau), k)
        return {"probs": probs, "logits": at, "raw": topk.from_logits(logits, k)[0] if tau else probs}
    return reduce


def predict_topk(model, files: list[str], n_classes: int, k: int, counts: list[int], tau: float, desc: str,
                 **args: Any) -> tuple[topk.TopK, np.ndarray, topk.TopK]:
    """One model's top-k predictions of ``files``, batch by batch (bounded memory).

    Args:
        model: the fold's classifier.
        files: image paths in row order.
        n_classes: number of classes.
        k: columns kept per row.
        counts: training images per class (post-hoc adjustment).
        tau: ``la_posthoc_tau``.
        desc: progress-bar label.
        **args: :func:`common.engine.classifier.predict_logits` arguments.

    Returns:
        ``(probs, logits at probs.index, raw probs)`` (the raw ones are ``probs`` when ``tau == 0``).
    """
    parts = predict_logits(model, files, desc=desc, reduce=topk_reducer(k, counts, tau), **args) if files else []
    k = min(k, n_classes)
    logits = np.concatenate([p["logits"] for p in parts]) if parts else np.zeros((0, k), np.float32)
    return (topk.concat([p["probs"] for p in parts], n_classes, k), logits,
            topk.concat([p["raw"] for p in parts], n_classes, k))


def fold_mean(per_fold: list[tuple[topk.TopK, np.ndarray, topk.TopK]]) -> tuple[topk.TopK, np.ndarray, topk.TopK]:
    """The folds' mean top-k probabilities, the mean logits at its classes (a fold's smallest kept logit where it
    does not keep the class) and the raw mean (:func:`common.lib.topk.weighted_mean`, equal weights).

    Args:
        per_fold: one :func:`predict_topk` result per fold, rows in the same order.
    """
    w = [1.0 / len(per_fold)] * len(per_fold)
    probs = topk.weighted_mean([p for p, _, _ in per_fold], w)
    raw = topk.weighted_mean([r for _, _, r in per_fold], w)
    rows = np.repeat(np.arange(len(probs)), probs.k)
    logits = np.zeros(len(rows))
    for p, lg, _ in per_fold:
        logits += topk.gather(topk.TopK(p.index, lg, lg.min(1) if lg.size else p.floor, p.n_classes), rows,
                              probs.index.ravel()) / len(per_fold)
    return probs, logits.reshape(probs.index.shape).astype(np.float32), raw


