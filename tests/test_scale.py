"""Scale guards: fold assignment and out-of-fold tuning stay (near) linear in the number of images.

Each guard times (CPU seconds) the same table-level work (no images, no model) at ``n`` and ``8 n`` training rows of the
Happywhale-shaped plan (:func:`common.data.synth.plan_synth`) and asserts the ratio is below 24: linear code gives
about 8, quadratic code about 64. The bound is loose on purpose (a shared 2-core machine); it catches a return of
``n_images x n_individuals`` loops, not a slow machine. The faiss search, whose queries x gallery product is
inherent, is left out: neighbours are drawn at random.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from common.data.competition import make_folds
from common.data.synth import plan_synth
from common.lib import retrieval
from common.stages.retrieve_submit import hide_individuals

SMALL, FACTOR, MAX_RATIO = 3000, 8, 24.0


def _old_make_folds(individual_ids, n_folds: int, seed: int) -> np.ndarray:
    """``common.data.competition.make_folds`` before the fix (compares every id with every individual): the reference."""
    ids = np.asarray([str(i) for i in individual_ids])
    rng = np.random.default_rng(seed)
    uniques = np.unique(ids)
    order = rng.permutation(len(uniques))
    folds = np.empty(len(ids), dtype=np.int64)
    position = 0
    for u in uniques[order]:
        rows = rng.permutation(np.flatnonzero(ids == u))
        folds[rows] = (position + np.arange(len(rows))) % n_folds
        position += len(rows)
    return folds


def _train_ids(n_train: int) -> pd.Series:
    train, _ = plan_synth(int(round(n_train / 0.646)) + 2, seed=0)
    return train["individual_id"][:n_train].reset_index(drop=True)


def _best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Least CPU seconds of this process over ``repeat`` runs (wall time would count other jobs on a shared box)."""
    best = np.inf
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def _oof_tuning(ids: pd.Series, k: int = 20) -> tuple[int, float]:
    """Folds, hidden individuals, neighbours -> individual scores -> threshold sweep -> predictions for fold 0."""
    folds = make_folds(ids, 5, seed=0)
    images = pd.Series([f"{i:014x}.jpg" for i in range(len(ids))])
    valid, fit = folds == 0, folds != 0
    hidden = hide_individuals(ids[valid], ids[fit], 0.2, seed=0)
    gallery = np.flatnonzero(fit & ~ids.isin(hidden).to_numpy())
    rng = np.random.default_rng(0)
    nq = int(valid.sum())
    idx = rng.integers(0, len(gallery), size=(nq, k))
    scores = -np.sort(-rng.uniform(-1, 1, size=(nq, k)), axis=1)
    table = retrieval.individual_scores(scores, idx, ids.to_numpy()[gallery], images[valid])
    table2 = retrieval.individual_scores(scores[:, ::-1].copy(), idx, ids.to_numpy()[gallery], images[valid])
    table = retrieval.average_scores([table, table2])
    truth = retrieval.oof_truth(ids[valid], ids.to_numpy()[gallery])
    best, _ = retrieval.tune_threshold(table, dict(zip(images[valid], truth, strict=True)),
                                       np.round(np.arange(-1, 1.0001, 0.05), 6))
    return len(retrieval.predict(table, best, images=images[valid].tolist())), best


def test_make_folds_reproduces_the_old_assignment() -> None:
    for n, seed, n_folds in ((300, 0, 2), (1200, 7, 5), (50, 3, 4)):
        ids = _train_ids(n)
        np.testing.assert_array_equal(make_folds(ids, n_folds, seed), _old_make_folds(ids, n_folds, seed))
    ids = ["b", "a", "c", "a", "b", "b", 3, 3]  # non-string ids, any order
    np.testing.assert_array_equal(make_folds(ids, 2, 1), _old_make_folds(ids, 2, 1))


def _ratio(fn: Callable[[pd.Series], object]) -> tuple[float, float, float]:
    small, large = _train_ids(SMALL), _train_ids(SMALL * FACTOR)
    t_small, t_large = _best_of(lambda: fn(small)), _best_of(lambda: fn(large))
    return t_large / t_small, t_small, t_large


def test_make_folds_time_grows_linearly() -> None:
    ratio, t_small, t_large = _ratio(lambda ids: make_folds(ids, 5, seed=0))
    assert ratio < MAX_RATIO, f"make_folds: {t_small:.4f} s at {SMALL} rows, {t_large:.4f} s at {FACTOR}x"


def test_oof_tuning_time_grows_linearly() -> None:
    ratio, t_small, t_large = _ratio(_oof_tuning)
    assert ratio < MAX_RATIO, f"oof tuning: {t_small:.4f} s at {SMALL} rows, {t_large:.4f} s at {FACTOR}x"


def test_the_guard_catches_quadratic_code() -> None:
    """The old fold assignment fails the same guard at a size where its quadratic term dominates."""
    small, large = _train_ids(3000), _train_ids(3000 * FACTOR)
    ratio = _best_of(lambda: _old_make_folds(large, 5, 0), 1) / _best_of(lambda: _old_make_folds(small, 5, 0), 1)
    assert ratio > MAX_RATIO


def test_oof_tuning_reference_is_sane() -> None:
    """The timed pipeline is real work: it predicts one row per query with a threshold from the grid."""
    ids = _train_ids(400)
    rows, best = _oof_tuning(ids)
    assert rows == int((make_folds(ids, 5, 0) == 0).sum())
    assert best in np.round(np.arange(-1, 1.0001, 0.05), 6)


def test_chunked_fold_averaging_equals_the_whole_table() -> None:
    """submit.average_fold_scores in blocks of 7 queries == the old all-at-once average of per-fold tables."""
    from common.stages.retrieve_submit import average_fold_scores

    rng = np.random.default_rng(5)
    labels = np.array([f"ind{j % 12}" for j in range(40)])
    images = pd.Series([f"q{i:03d}.jpg" for i in range(50)])
    neighbours = []
    for _ in range(3):
        idx = np.stack([rng.permutation(40)[:8] for _ in range(50)])
        neighbours.append((-np.sort(-rng.uniform(-1, 1, size=(50, 8)), axis=1).astype(np.float32), idx))
    whole = retrieval.average_scores([retrieval.individual_scores(s, i, labels, images) for s, i in neighbours])
    pd.testing.assert_frame_equal(average_fold_scores(neighbours, labels, images, chunk=7), whole)
    pd.testing.assert_frame_equal(average_fold_scores(neighbours, labels, images), whole)
    assert len(whole) > 50 * 4  # several individuals per query: a real merge, not one row each
