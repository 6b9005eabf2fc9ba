"""Bounded-memory class scores: the ``k`` best classes of every row instead of a dense ``(N, C)`` matrix.

With classes that are individuals (Happywhale: ~15,500 of them, 51k training and 28k test images) a dense
float32 probability matrix is GBs per array. Stage 05 then keeps, per image, the ``k`` most probable classes
(:func:`resolve_k`: automatic above :data:`DENSE_MAX_CLASSES` classes, else dense as before) and stage 06 reads
either form through :func:`read_scores`, the one reader, and works on it with the functions below, which take a
dense ``np.ndarray`` or a :class:`TopK` alike.

File layout (``05_classifier/oof.npz``, ``test.npz``, ``06_ensemble/oof.npz``, ``test.npz``; written by
:func:`to_arrays` through :func:`common.core.store.save_arrays`, so with their ``image`` ids):

* ``topk_index`` int32 ``(N, k)``: class indices (``classes.json`` order), best first (ties: lower index first);
* ``topk_prob`` float32 ``(N, k)``: their probabilities, descending;
* ``rest_mass`` float32 ``(N,)``: the probability of all other classes, ``1 - sum(topk_prob)`` (clipped at 0);
* ``topk_logit`` float32 ``(N, k)``: the logits at ``topk_index`` (stage 05 only);
* per fold of the test file ``topk_index_fold{k}``, ``topk_prob_fold{k}``, ``rest_mass_fold{k}``.

The rule for a class outside a row's kept columns: its score is taken to be the row's **floor**, for
probabilities ``min(smallest kept prob, rest_mass)`` (an upper bound: it can exceed neither), for logits the
smallest kept logit. That is the label probability of label cleaning, the classifier score of an
``(image, individual)`` pair in a retrieval blend and the fill of an individual that is not a class at all.
In a weighted mean of members (:func:`weighted_mean`) a member that lacks a class contributes 0 to its
probability (a lower bound: union of the members' classes, then the ``k`` best kept) and its floor to its logit.
Re-distribution moves an image to a class only when that class is among the image's kept columns. With
``k >= C`` nothing is outside and every result equals the dense one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

DENSE_MAX_CLASSES = 1000  # prob_topk=0 writes dense arrays up to this many classes (every demo and benchmark)
AUTO_K = 100  # columns kept per row by prob_topk=0 above DENSE_MAX_CLASSES
MIN_K = 5  # top-5 predictions need five columns


def resolve_k(prob_topk: int, n_classes: int) -> int:
    """Columns to keep per row for a stage-05 run; 0 means dense arrays.

    Args:
        prob_topk: the parameter: 0 automatic (dense up to :data:`DENSE_MAX_CLASSES` classes, else
            :data:`AUTO_K`), -1 always dense, ``k >= 5`` always top-k (capped at ``n_classes``).
        n_classes: number of classes.
    """
    if prob_topk < 0:
        return 0
    if prob_topk == 0:
        return 0 if n_classes <= DENSE_MAX_CLASSES else min(AUTO_K, n_classes)
    return min(int(prob_topk), n_classes)


@dataclasses.dataclass(frozen=True)
class TopK:
    """The ``k`` best scores of every row of an ``(N, n_classes)`` matrix.

    Args:
        index: int32 ``(N, k)`` class indices, best first.
        value: float32 ``(N, k)`` their scores, descending.
        floor: ``(N,)`` the score of any class outside the row's kept columns (see the module docstring).
        n_classes: columns of the dense matrix.
        rest: ``(N,)`` probability mass outside the kept columns (probabilities only, else ``None``).
    """

    index: np.ndarray
    value: np.ndarray
    floor: np.ndarray
    n_classes: int
    rest: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, n_classes)``, as the dense matrix's."""
        return (len(self.index), int(self.n_classes))

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows) -> TopK:
        """The rows ``rows`` (indices, a boolean mask or a slice), as a :class:`TopK`."""
        return TopK(self.index[rows], self.value[rows], self.floor[rows], self.n_classes,
                    None if self.rest is None else self.rest[rows])


Scores = np.ndarray | TopK


def _order(index: np.ndarray, value: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best ``(index, value)`` pairs: descending value, ties by lower index."""
    if k < index.shape[1]:
        part = np.argpartition(-value, k - 1, axis=1)[:, :k]
        index, value = np.take_along_axis(index, part, 1), np.take_along_axis(value, part, 1)
    order = np.lexsort((index, -value), axis=-1)
    return np.take_along_axis(index, order, 1), np.take_along_axis(value, order, 1)


def _prob_topk(index: np.ndarray, prob: np.ndarray, rest: np.ndarray, n_classes: int) -> TopK:
    rest = np.maximum(rest, 0).astype(np.float32)
    last = prob[:, -1] if prob.shape[1] else np.zeros(len(prob), np.float32)
    floor = last if prob.shape[1] >= n_classes else np.minimum(last, rest)
    return TopK(index.astype(np.int32), prob.astype(np.float32), floor.astype(np.float32), n_classes, rest)


def from_dense(values: np.ndarray, k: int, kind: str = "prob") -> TopK:
    """The ``k`` best columns of a dense ``(N, C)`` array (one chunk of rows at a time: see :func:`from_logits`).

    Args:
        values: probabilities (``kind="prob"``, rows summing to 1) or logits (``kind="logit"``).
        k: columns kept (capped at ``C``).
        kind: ``prob`` or ``logit``.
    """
    values = np.asarray(values, dtype=np.float32)
    n, c = values.shape
    k = min(k, c)
    index, value = _order(np.broadcast_to(np.arange(c, dtype=np.int32), (n, c)), values, k)
    if kind == "logit":
        return TopK(index, value, value.min(1) if k else np.zeros(n, np.float32), c)
    return _prob_topk(index, value, values.sum(1, dtype=np.float64) - value.sum(1, dtype=np.float64), c)


def from_logits(logits: np.ndarray, k: int) -> tuple[TopK, np.ndarray]:
    """``softmax(logits)``'s ``k`` best classes and the logits at them, from one chunk of rows.

    Args:
        logits: float ``(n, C)`` logits of a batch (the only dense block that ever exists: one batch).
        k: columns kept.

    Returns:
        ``(probs, logits_at_index)``: a :class:`TopK` of probabilities and float32 ``(n, k)`` logits.
    """
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    top = from_dense(probs, k)
    return top, np.take_along_axis(x, top.index.astype(np.int64), 1)


def concat(parts: Sequence[TopK], n_classes: int, k: int = MIN_K) -> TopK:
    """Stack row chunks (an empty list: zero rows of ``k`` columns)."""
    if not parts:
        return TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                    n_classes, np.zeros(0, np.float32))
    rest = None if any(p.rest is None for p in parts) else np.concatenate([p.rest for p in parts])
    return TopK(np.concatenate([p.index for p in parts]), np.concatenate([p.value for p in parts]),
                np.concatenate([p.floor for p in parts]), n_classes, rest)


# ------------------------------------------------------------------------------------------------ files
def is_topk(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether loaded ``.npz`` arrays are in the top-k layout."""
    return "topk_index" in arrays


def to_arrays(probs: TopK, logits: np.ndarray | None = None, suffix: str = "") -> dict[str, np.ndarray]:
    """The arrays that store ``probs`` (and the logits at its classes), names ending in ``suffix`` (``_fold0``)."""
    out = {f"topk_index{suffix}": probs.index.astype(np.int32), f"topk_prob{suffix}": probs.value.astype(np.float32),
           f"rest_mass{suffix}": (np.zeros(len(probs), np.float32) if probs.rest is None
                                  else probs.rest.astype(np.float32))}
    if logits is not None:
        out[f"topk_logit{suffix}"] = np.asarray(logits, np.float32)
    return out


def read_scores(arrays: Mapping[str, np.ndarray], n_classes: int, what: str = "probs", fold: int | None = None,
                source: str = "arrays") -> Scores:
    """The one reader of stored class scores: a dense array, or a :class:`TopK`, whichever the file holds.

    Args:
        arrays: :func:`common.core.store.load_arrays` output.
        n_classes: number of classes (``classes.json``).
        what: ``probs`` or ``logits``.
        fold: a test file's per-fold probabilities (``probs_fold{k}`` / ``topk_*_fold{k}``).
        source: the file, for errors.

    Raises:
        KeyError / ValueError: naming ``source`` and the array that is missing or malformed.
    """
    suffix = "" if fold is None else f"_fold{fold}"
    if not is_topk(arrays):
        name = f"{what}{suffix}"
        if name not in arrays:
            raise KeyError(f"{source}: no array {name!r} (arrays: {sorted(arrays)})")
        values = arrays[name]
        if values.ndim != 2 or values.shape[1] != n_classes:
            raise ValueError(f"{source}: {name!r} has shape {values.shape}, not (N, {n_classes})")
        return values
    names = [f"topk_index{suffix}", "topk_logit" if what == "logits" else f"topk_prob{suffix}",
             f"rest_mass{suffix}"]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise KeyError(f"{source}: top-k layout without {missing} (arrays: {sorted(arrays)})")
    index, value, rest = (np.asarray(arrays[n]) for n in names)
    if index.shape != value.shape or index.ndim != 2 or rest.shape != (len(index),):
        raise ValueError(f"{source}: {names} have shapes {index.shape}, {value.shape}, {rest.shape}")
    bad = (index < 0) | (index >= n_classes)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{source}: {names[0]!r} row {row} holds a class index outside 0..{n_classes - 1}")
    if what == "logits":
        return TopK(index, value, value.min(1) if index.shape[1] else rest, n_classes)
    return _prob_topk(index, value, rest, n_classes)


# ------------------------------------------------------------------------------------------- operations
def argmax(scores: Scores) -> np.ndarray:
    """Each row's best class (ties: the lower index)."""
    if isinstance(scores, TopK):
        return scores.index[:, 0].astype(np.int64)
    return np.asarray(scores).argmax(1)


def row_max(scores: Scores) -> np.ndarray:
    """Each row's best score (the top-1 probability of pseudo-labels)."""
    if isinstance(scores, TopK):
        return scores.value[:, 0]
    s = np.asarray(scores)
    return s[np.arange(len(s)), s.argmax(1)]


def row_min(scores: Scores) -> np.ndarray:
    """Each row's lowest score: the dense minimum, or the :class:`TopK` floor."""
    return scores.floor if isinstance(scores, TopK) else np.asarray(scores).min(1)


def top_n(scores: Scores, n: int) -> np.ndarray:
    """``(N, min(n, C))`` class indices, best first, ties by lower index (a :class:`TopK` gives at most ``k``)."""
    if isinstance(scores, TopK):
        return scores.index[:, :n].astype(np.int64)
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :n]


def gather(scores: Scores, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``scores[rows[i], cols[i]]`` for pairs (a class outside a :class:`TopK` row's columns: its floor)."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if not isinstance(scores, TopK):
        return np.asarray(scores)[rows, cols]
    hit = scores.index[rows] == cols[:, None]
    found = hit.any(1)
    out = scores.floor[rows].astype(scores.value.dtype)
    out[found] = scores.value[rows[found], hit[found].argmax(1)]
    return out


def scale(scores: Scores, factor: float) -> Scores:
    """``scores * factor`` (a rescaled ensemble, logits divided by ``arc_s``), float32 kept."""
    f = np.float32(factor)
    if not isinstance(scores, TopK):
        return scores * f
    return TopK(scores.index, scores.value * f, scores.floor * f, scores.n_classes,
                None if scores.rest is None else scores.rest * f)


def divide(scores: Scores, divisor: float) -> Scores:
    """``scores / divisor`` in float32 (ArcFace logits over ``arc_s``: cosines)."""
    d = np.float32(divisor)
    if not isinstance(scores, TopK):
        return (scores / d).astype(np.float32)
    return TopK(scores.index, (scores.value / d).astype(np.float32), (scores.floor / d).astype(np.float32),
                scores.n_classes, None if scores.rest is None else scores.rest / d)


def remap(scores: TopK, rows: np.ndarray, col_map: np.ndarray, n_classes: int) -> TopK:
    """Rows ``rows`` of ``scores`` with class ``j`` renamed ``col_map[j]`` (another class order), re-sorted."""
    sub = scores[rows]
    index, value = _order(col_map[sub.index].astype(np.int32), sub.value, sub.k)
    return TopK(index, value, sub.floor, n_classes, sub.rest)


def weighted_mean(scores: Sequence[Scores], weights: Sequence[float], kind: str = "prob") -> Scores:
    """``sum_i w_i * scores_i`` over rows and classes already aligned; dense when every input is dense.

    A :class:`TopK` result holds the union of the members' classes per row, the ``max k_i`` best kept; a
    member that lacks a class adds 0 (``kind="prob"``) or ``w_i * floor_i`` (``kind="logit"``) to it.

    Args:
        scores: one aligned array or :class:`TopK` per member.
        weights: one weight per member (normalised by the caller).
        kind: ``prob`` or ``logit``.
    """
    if not any(isinstance(s, TopK) for s in scores):
        dtype = np.float32 if all(np.asarray(s).dtype == np.float32 for s in scores) else np.float64
        out = np.zeros(np.asarray(scores[0]).shape, dtype=dtype)
        for w, s in zip(weights, scores, strict=True):
            out += dtype(w) * s
        return out
    parts = [s if isinstance(s, TopK) else from_dense(s, s.shape[1], kind) for s in scores]
    n, c = len(parts[0]), parts[0].n_classes
    k = max(p.k for p in parts)
    fills = [p.floor.astype(np.float64) if kind == "logit" else np.zeros(n) for p in parts]
    base = sum(w * f for w, f in zip(weights, fills, strict=True))
    rows = np.concatenate([np.repeat(np.arange(n, dtype=np.int64), p.k) for p in parts])
    keys = rows * c + np.concatenate([p.index.astype(np.int64).ravel() for p in parts])
    adds = np.concatenate([w * (p.value.astype(np.float64) - f[:, None]).ravel()
                           for w, p, f in zip(weights, parts, fills, strict=True)])
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=adds, minlength=len(uniq))
    urow, ucol = uniq // c, (uniq % c).astype(np.int32)
    value = sums + base[urow]
    order = np.lexsort((ucol, -value, urow))  # by row, then descending value, then class
    start = np.searchsorted(urow[order], np.arange(n))
    pos = np.arange(len(order)) - start[urow[order]]
    keep = order[pos < k]  # every row holds at least k classes: the largest member's
    index, value = ucol[keep].reshape(n, k), value[keep].reshape(n, k).astype(np.float32)
    if kind == "logit":
        return TopK(index, value, np.minimum(value[:, -1], base.astype(np.float32)), c)
    total = sum(w * (p.value.sum(1, dtype=np.float64) + (0 if p.rest is None else p.rest))
                for w, p in zip(weights, parts, strict=True))
    return _prob_topk(index, value, total - value.sum(1, dtype=np.float64), c)


def class_rows(scores: Scores) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """A lookup ``c -> (rows, scores)``: the rows by descending score of class ``c`` (ties by row) and those
    scores; a :class:`TopK` lists only the rows that keep ``c`` among their columns (indexed once, so asking for
    every class costs one sort of the kept entries).

    Args:
        scores: ``(N, C)`` scores.
    """
    if not isinstance(scores, TopK):
        values = np.asarray(scores)

        def dense(c: int) -> tuple[np.ndarray, np.ndarray]:
            order = np.argsort(-values[:, c], kind="stable")
            return order, values[order, c]
        return dense
    rows = np.repeat(np.arange(len(scores), dtype=np.int64), scores.k)
    cols, vals = scores.index.ravel().astype(np.int64), scores.value.ravel()
    order = np.lexsort((rows, -vals, cols))  # by class, then descending score, then row
    bounds = np.searchsorted(cols[order], np.arange(scores.n_classes + 1))

    def sparse(c: int) -> tuple[np.ndarray, np.ndarray]:
        part = order[bounds[c]:bounds[c + 1]]
        return rows[part], vals[part]
    return sparse


def to_dense(scores: Scores, spread_rest: bool = False) -> np.ndarray:
    """The dense ``(N, C)`` float32 matrix (for small inputs, tests and soft targets).

    Args:
        scores: dense or :class:`TopK` scores.
        spread_rest: fill the classes outside a row's columns with its ``rest`` mass shared equally (rows then
            sum to 1: distillation targets); else with the row's floor.
    """
    if not isinstance(scores, TopK):
        return np.asarray(scores)
    n, c = scores.shape
    out = np.repeat(scores.floor.astype(np.float32)[:, None], c, axis=1)
    if spread_rest and scores.rest is not None and scores.k < c:
        out[:] = (scores.rest / (c - scores.k)).astype(np.float32)[:, None]
    np.put_along_axis(out, scores.index.astype(np.int64), scores.value, 1)
    return out


def check_finite(scores: Scores, images: Sequence[str], classes: Sequence[str], source: str) -> None:
    """Raise naming ``source``, the image and the class of the first value that is not finite."""
    values = scores.value if isinstance(scores, TopK) else np.asarray(scores)
    bad = ~np.isfinite(values)
    if bad.any():
        r, j = (int(v) for v in np.argwhere(bad)[0])
        c = int(scores.index[r, j]) if isinstance(scores, TopK) else j
        raise ValueError(f"{source}: value at image {images[r]!r}, class {classes[c]!r} is not finite")
