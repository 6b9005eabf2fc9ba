"""Open-set helpers for the ``new_individual`` decision: which individuals a fold treats as new, the test's
share of new individuals estimated from its own scores, and thresholds tuned for a given share.

- :func:`choose_new_individuals` picks, for each fold, the individuals whose images in that fold are queries
  of strangers. Stage 02 writes the choice into the fold table (``new_fold``) and leaves those individuals out
  of that fold's training (:func:`common.data.artefacts.fold_split`), so the out-of-fold queries that stage 04
  calls new are strangers to the model too, as the test's new individuals are.
- :func:`estimate_new_share` fits the test's top-1 score distribution as a mixture of the out-of-fold
  distributions of known and new queries (EM on the mixing weight only, histogram densities): the share of
  new individuals in the test, estimated without its labels.
- :func:`share_sweep` re-weights an out-of-fold threshold sweep to a target share of new queries:
  ``share * map5_new + (1 - share) * map5_known``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def choose_new_individuals(ids: Sequence[str], folds: Sequence[int], share: float, seed: int) -> np.ndarray:
    """For each fold, the individuals treated as new in it, so that about ``share`` of its images are new.

    An individual is new in at most one fold. For fold ``k``, individuals with images in fold ``k`` and in
    the other folds are taken in a seeded random order until the images of new individuals (those chosen, plus
    those with no image outside fold ``k``: naturally new) reach ``share`` of fold ``k``'s images.

    Args:
        ids: individual of each image.
        folds: fold of each image.
        share: target share of each fold's images whose individual is new to that fold's model (0: none).
        seed: seed of the order.

    Returns:
        ``new_fold`` per image: the fold in which its individual is new, or -1.
    """
    ids = np.asarray([str(i) for i in ids])
    folds = np.asarray(folds, dtype=np.int64)
    if not 0.0 <= share < 1.0:
        raise ValueError(f"oof_new_share={share}: must be in [0, 1)")
    new_fold: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    for k in np.unique(folds):
        valid = pd.Series(ids[folds == k]).value_counts()
        elsewhere = set(ids[folds != k])
        unseen = int(valid[[i for i in valid.index if i not in elsewhere]].sum())
        candidates = sorted(i for i in valid.index if i in elsewhere and i not in new_fold)
        for j in rng.permutation(len(candidates)):
            if unseen >= share * int(valid.sum()):
                break
            new_fold[candidates[j]] = int(k)
            unseen += int(valid[candidates[j]])
    return np.array([new_fold.get(i, -1) for i in ids], dtype=np.int64)


def top1_scores(table: pd.DataFrame, images: Sequence[str]) -> np.ndarray:
    """Each image's best individual score (``-1`` when it has no candidate).

    Args:
        table: ``image, individual_id, score``.
        images: the images, in the order wanted.
    """
    best = table.groupby(table["image"].astype(str))["score"].max()
    return best.reindex([str(i) for i in images]).fillna(-1.0).to_numpy(np.float64)


def estimate_new_share(known: np.ndarray, new: np.ndarray, test: np.ndarray, bins: int = 20,
                       iterations: int = 200) -> float:
    """Share of new individuals among test queries, from top-1 scores alone.

    The test's top-1 scores are modelled as ``pi * f_new + (1 - pi) * f_known``, with ``f_known`` and ``f_new``
    the histograms (``bins`` bins over the pooled range, add-one smoothed) of the out-of-fold top-1 scores of
    known and new queries; ``pi`` is fitted by EM (the components are fixed). It assumes the test's scores
    behave like the out-of-fold ones (same model, comparable gallery).

    Args:
        known: out-of-fold top-1 scores of queries whose individual is in the gallery.
        new: out-of-fold top-1 scores of queries whose individual is not.
        test: top-1 scores of the test queries.
        bins: histogram bins.
        iterations: EM steps (from ``pi = 0.5``).

    Returns:
        The estimated share in [0, 1]; NaN when a component or the test is empty.
    """
    known, new, test = (np.asarray(a, dtype=np.float64) for a in (known, new, test))
    if not (known.size and new.size and test.size):
        return float("nan")
    pooled = np.concatenate([known, new, test])
    edges = np.linspace(pooled.min(), pooled.max() + 1e-9, bins + 1)

    def density(x: np.ndarray) -> np.ndarray:
        counts = np.histogram(x, edges)[0] + 1.0
        return counts / counts.sum()

    f_known, f_new = density(known), density(new)
    cell = np.clip(np.searchsorted(edges, test, side="right") - 1, 0, bins - 1)
    pk, pn = f_known[cell], f_new[cell]
    pi = 0.5
    for _ in range(iterations):
        resp = pi * pn / (pi * pn + (1 - pi) * pk)
        pi = float(resp.mean())
    return pi


MIN_OOF_QUERIES = 20  # out-of-fold known and new queries, each, for a usable estimate
MIN_TEST_QUERIES = 50  # test queries, for a usable estimate


def estimate_reliable(n_known: int, n_new: int, n_test: int) -> bool:
    """Whether :func:`estimate_new_share` has enough scores to be trusted over the out-of-fold share: at least
    :data:`MIN_OOF_QUERIES` out-of-fold queries on each side and :data:`MIN_TEST_QUERIES` test queries (its
    histograms are 20 bins; with fewer scores one query moves the estimate by several points).

    Args:
        n_known: out-of-fold queries of known individuals.
        n_new: out-of-fold queries of new individuals.
        n_test: test queries.
    """
    return n_known >= MIN_OOF_QUERIES and n_new >= MIN_OOF_QUERIES and n_test >= MIN_TEST_QUERIES


def share_sweep(sweep: pd.DataFrame, share: float) -> pd.Series:
    """MAP@5 of each threshold of a sweep if ``share`` of the queries were new: ``share * map5_new +
    (1 - share) * map5_known`` (a missing side counts 0).

    Args:
        sweep: :func:`common.lib.retrieval.tune_threshold`'s sweep (``map5_known``, ``map5_new``).
        share: the share of new queries, in [0, 1].
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"test_new_share={share}: must be in [0, 1] (or negative: not given)")
    return share * sweep["map5_new"].fillna(0.0) + (1 - share) * sweep["map5_known"].fillna(0.0)
