"""Open-set helpers for the ``new_individual`` decision: which individuals a fold treats as new, the test's
share of new individuals estimated from its own scores, and thresholds tuned for a given share.

- :func:`choose_new_individuals` picks, for each fold, the individuals whose images in that fold are queries
  of strangers. Stage 02 writes the choice into the fold table (``new_fold``) and leaves those individuals out
  of that fold's training (:func:`common.data.artefacts.fold_split`), so the out-of-fold queries that stage 04
  calls new are strangers to the model too, as the test's new individuals are.
- :func:`estimate_new_share` fits the test's top-1 score distribution as a mixture of the out-of-fold
  distributions of known and new queries (EM on the mixing weight only, kernel densities): the share of
  new individuals in the test, estimated without its labels; :func:`separation` says whether the two
  distributions differ enough for that.
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


def estimate_new_share(known: np.ndarray, new: np.ndarray, test: np.ndarray, iterations: int = 300) -> float:
    """Share of new individuals among test queries, from top-1 scores alone.

    The test's top-1 scores are modelled as ``pi * f_new + (1 - pi) * f_known``, with ``f_known`` and ``f_new``
    Gaussian kernel density estimates (Silverman's bandwidth) of the out-of-fold top-1 scores of known and new
    queries; ``pi`` is fitted by EM (the components are fixed). Kernel densities, unlike histograms, stay smooth
    with the few dozen new queries of a small fold. It assumes the test's scores behave like the out-of-fold ones
    (same model, comparable gallery), and it can only be right when the two components differ:
    :func:`separation` says how much.

    Args:
        known: out-of-fold top-1 scores of queries whose individual is in the gallery.
        new: out-of-fold top-1 scores of queries whose individual is not.
        test: top-1 scores of the test queries.
        iterations: EM steps (from ``pi = 0.5``).

    Returns:
        The estimated share in [0, 1]; NaN when a component or the test is empty.
    """
    known, new, test = (np.asarray(a, dtype=np.float64) for a in (known, new, test))
    if not (known.size and new.size and test.size):
        return float("nan")
    p_known, p_new = kernel_density(known, test), kernel_density(new, test)
    pi = 0.5
    for _ in range(iterations):
        resp = pi * p_new / (pi * p_new + (1 - pi) * p_known)
        pi = float(resp.mean())
    return pi


GRID_POINTS = 4096  # kernel_density: above this many evaluation points, an even grid of this size is used


def kernel_density(sample: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of ``sample`` evaluated ``at`` each point, Silverman's rule-of-thumb bandwidth
    ``0.9 * min(sd, IQR / 1.34) * n^(-1/5)`` (floored at 1e-3, for samples of equal scores), plus 1e-12 so that
    no density is exactly 0.

    Exact up to :data:`GRID_POINTS` points. Beyond (the test's queries at Happywhale's size: 28k points against
    tens of thousands of out-of-fold scores), the density is computed on an even grid of that many points over
    ``at``'s range and interpolated linearly, when the grid step is at most an eighth of the bandwidth (error
    under 0.2 % of a kernel's peak): the cost grows with ``len(sample)``, not ``len(at) x len(sample)``."""
    sample = np.asarray(sample, dtype=np.float64)
    at = np.asarray(at, dtype=np.float64)
    spread = np.std(sample)
    iqr = np.subtract(*np.percentile(sample, [75, 25])) / 1.34
    if iqr > 0:
        spread = min(spread, iqr)
    h = max(0.9 * spread * len(sample) ** -0.2, 1e-3)
    if len(at) > GRID_POINTS:
        lo, hi = float(at.min()), float(at.max())
        if (hi - lo) / (GRID_POINTS - 1) <= h / 8:
            grid = np.linspace(lo, hi, GRID_POINTS)
            return np.interp(at, grid, _gaussian_density(sample, grid, h)) + 1e-12
    return _gaussian_density(sample, at, h) + 1e-12


def _gaussian_density(sample: np.ndarray, at: np.ndarray, h: float) -> np.ndarray:
    out = np.empty(len(at))
    for a in range(0, len(at), 4096):  # bounded memory: 4096 x len(sample) at a time
        z = (at[a : a + 4096, None] - sample[None, :]) / h
        out[a : a + 4096] = np.exp(-0.5 * z * z).mean(axis=1) / (h * np.sqrt(2 * np.pi))
    return out


def separation(known: np.ndarray, new: np.ndarray) -> float:
    """How well top-1 scores tell known from new queries: the probability that a random known query scores
    above a random new one (ROC AUC; ties count half). 0.5: not at all; 1: perfectly. NaN if a side is empty."""
    known, new = np.asarray(known, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if not (known.size and new.size):
        return float("nan")
    ranks = pd.Series(np.concatenate([known, new])).rank().to_numpy()  # average ranks for ties
    return float((ranks[: known.size].sum() - known.size * (known.size + 1) / 2) / (known.size * new.size))


MIN_OOF_QUERIES = 20  # out-of-fold known and new queries, each, for a usable estimate
MIN_TEST_QUERIES = 50  # test queries, for a usable estimate
MIN_SEPARATION = 0.65  # separation (AUC) of known and new out-of-fold top-1 scores, for a usable estimate


def estimate_reliable(n_known: int, n_new: int, n_test: int, auc: float = 1.0) -> bool:
    """Whether :func:`estimate_new_share` can be trusted over the out-of-fold share: at least
    :data:`MIN_OOF_QUERIES` out-of-fold queries on each side, :data:`MIN_TEST_QUERIES` test queries, and known
    and new scores that differ (:func:`separation` at least :data:`MIN_SEPARATION`; when they overlap, as for a
    model that cannot yet tell the individuals apart, any share fits the test's scores about as well).

    Args:
        n_known: out-of-fold queries of known individuals.
        n_new: out-of-fold queries of new individuals.
        n_test: test queries.
        auc: :func:`separation` of the out-of-fold scores.
    """
    return (n_known >= MIN_OOF_QUERIES and n_new >= MIN_OOF_QUERIES and n_test >= MIN_TEST_QUERIES
            and bool(auc >= MIN_SEPARATION))


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


MINIMAX_SHARES = (0.1, 0.9)  # the test shares of new individuals the minimax threshold guards against


def max_regret(sweep: pd.DataFrame, shares: tuple[float, float] = MINIMAX_SHARES) -> pd.Series:
    """Each threshold's worst loss against the best threshold, over test shares of new individuals in
    ``shares`` (an interval): ``max over s of [max_t' obj(t', s) - obj(t, s)]`` with ``obj`` :func:`share_sweep`.
    The threshold that minimises it is the safe choice when the test's share is unknown. ``obj`` is linear in
    ``s``, so the regret is convex in ``s`` and its maximum is at one end of the interval: two sweeps suffice.

    Args:
        sweep: :func:`common.lib.retrieval.tune_threshold`'s sweep (``map5_known``, ``map5_new``).
        shares: the lowest and highest share considered.
    """
    lo, hi = shares
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"minimax shares {shares}: need 0 <= low <= high <= 1")
    regrets = [share_sweep(sweep, s).max() - share_sweep(sweep, s) for s in (lo, hi)]
    return np.maximum(regrets[0], regrets[1])

