"""Combining models: accuracy-weighted probability ensembles, retrieval/classifier blends and model soups.

- Accuracy-derived weights ``(score_i / min score) ** factor`` and the weighted probability ensemble follow
  the "adaptive ensemble" of the ACCV 2022 fine-grained (FGIA) 1st-place solution,
  https://github.com/Ezra-Yu/ACCV2022_FGIA_1st (``tools/emsemble.py --scale --factor 25``, see its
  ``Reproduce.md``; summarised in
  https://github.com/open-mmlab/mmpretrain/tree/main/projects/fgia_accv2022_1st).
- Model soups: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time" (https://arxiv.org/abs/2203.05482), uniform and greedy; the
  averaging itself is :func:`common.lib.averaging.average_state_dicts`.
- Joining several models' embeddings for one retrieval search is :func:`common.lib.retrieval.concat_embeddings`.

Every ``(N, C)`` array comes with its row ids (``image``) and column names (``classes``) and is aligned by
them, never by position: two sources that disagree on the set of images or classes raise naming both.
Each may also be a :class:`common.lib.topk.TopK` (the ``k`` best classes per row, stage 05's bounded-memory
format): :func:`align`, :func:`ensemble_probs` and :func:`blend_scores` take it as they take a dense array.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from common.lib import topk
from common.lib.averaging import average_state_dicts

BLEND_KINDS = ("prob", "logit")


def accuracy_weights(scores: Sequence[float], factor: float = 25.0, normalize: bool = True) -> np.ndarray:
    """Ensemble weights from each model's validation score: ``w_i = (score_i / min(score)) ** factor``.

    With ``factor = 25`` (the reference's value) a model 1 % better than the weakest gets
    ``1.01 ** 25 = 1.28`` times its weight, so the ensemble leans hard on the best models while still hearing
    the others; ``factor = 0`` gives every model weight 1, i.e. plain averaging.

    Args:
        scores: one validation score per model (accuracy, MAP@5...), higher is better, all > 0.
        factor: exponent; 0 for plain averaging.
        normalize: divide by the sum so the weights sum to 1 (the default). ``False`` returns the raw factors,
            as the reference prints them ("Adjusted factor is: ..."): pass them with ``rescale=True`` to
            :func:`ensemble_probs` to reproduce its numbers.

    Returns:
        float64 array of one weight per model.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"accuracy_weights: scores must be a non-empty list of numbers, got {scores!r}")
    if not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"accuracy_weights: scores must be finite and > 0, got {s.tolist()}")
    if not np.isfinite(factor) or factor < 0:
        raise ValueError(f"accuracy_weights: factor must be finite and >= 0, got {factor}")
    w = (s / s.min()) ** float(factor)
    return w / w.sum() if normalize else w


def _ids(values: Sequence[Any], what: str, source: str) -> list[str]:
    ids = [str(v) for v in values]
    seen: set[str] = set()
    for row, v in enumerate(ids):
        if v in seen:
            raise ValueError(f"{source}: {what} {v!r} repeated (row {row})")
        seen.add(v)
    return ids


def _same_set(a: list[str], b: list[str], what: str, source: str, ref_source: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        sides = ((only_a, source), (only_b, ref_source))
        examples = [f"{v[0]!r} is only in {name}" for v, name in sides if v]
        raise ValueError(
            f"{source} and {ref_source} have different {what}: {len(only_a)} only in {source}, "
            f"{len(only_b)} only in {ref_source}; e.g. {', '.join(examples)}"
        )


def align(
    values: np.ndarray | topk.TopK,
    images: Sequence[str],
    classes: Sequence[str],
    ref_images: Sequence[str],
    ref_classes: Sequence[str],
    source: str = "model 1",
    ref_source: str = "model 0",
) -> np.ndarray:
    """Reorder an ``(N, C)`` array's rows and columns to a reference order of images and classes.

    Args:
        values: ``(len(images), len(classes))`` array or :class:`~common.lib.topk.TopK`.
        images: row ids of ``values``.
        classes: column names of ``values``.
        ref_images: the row order wanted.
        ref_classes: the column order wanted.
        source: name of ``values`` in error messages (e.g. a file path).
        ref_source: name of the reference in error messages.

    Raises:
        ValueError: on a shape that does not match the ids, a repeated id, or a different set of images or
            classes (both sources, the counts and one example are named).
    """
    values = values if isinstance(values, topk.TopK) else np.asarray(values)
    rows, cols = _ids(images, "image", source), _ids(classes, "class", source)
    if len(values.shape) != 2 or values.shape != (len(rows), len(cols)):
        raise ValueError(
            f"{source}: array of shape {values.shape} for {len(rows)} images x {len(cols)} classes"
        )
    ref_rows, ref_cols = _ids(ref_images, "image", ref_source), _ids(ref_classes, "class", ref_source)
    _same_set(rows, ref_rows, "images", source, ref_source)
    _same_set(cols, ref_cols, "classes", source, ref_source)
    if rows == ref_rows and cols == ref_cols:
        return values  # already in order: no copy
    row_pos = {v: i for i, v in enumerate(rows)}
    col_pos = {v: i for i, v in enumerate(cols)}
    if isinstance(values, topk.TopK):  # rows taken, class indices renamed to the reference's order
        ref_col = {v: j for j, v in enumerate(ref_cols)}
        return topk.remap(values, np.array([row_pos[v] for v in ref_rows], dtype=np.int64),
                          np.array([ref_col[v] for v in cols], dtype=np.int32), len(ref_cols))
    return values[np.ix_([row_pos[v] for v in ref_rows], [col_pos[v] for v in ref_cols])]


def ensemble_probs(
    probs: Sequence[np.ndarray | topk.TopK],
    images: Sequence[Sequence[str]],
    classes: Sequence[Sequence[str]],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    rescale: bool = False,
    kind: str = "prob",
) -> tuple[np.ndarray, list[str], list[str]]:
    """Weighted mean of several models' ``(N, C)`` probabilities, aligned by image id and class name.

    The output follows the first model's row and column order.

    What "rescaling" means: the reference's ``--scale`` switch multiplies each model's probabilities by its
    *raw* factor ``(acc_i / min acc) ** factor`` and sums them over ``n`` models divided by ``n``, without
    normalising the factors, so its rows sum to ``mean(w_i)`` rather than 1. That is the normalised weighted
    mean times the constant ``sum(w) / n``: argmax, per-class rankings and re-distribution are unchanged, but
    a confidence threshold is not (the reference's ``Reproduce.md`` ensembles *without* ``--scale --factor``
    before thresholding probabilities for pseudo-labels). ``rescale=False`` (default) normalises the weights,
    so rows stay probability distributions; ``rescale=True`` reproduces the reference's numbers.

    Args:
        probs: one ``(N, C)`` array or :class:`~common.lib.topk.TopK` per model (softmax outputs; any
            non-negative scores work).
        images: row ids of each array.
        classes: column names of each array.
        weights: one weight per model (e.g. :func:`accuracy_weights`), ``None`` for equal weights.
        names: a name per model for error messages (e.g. the ``.npz`` paths); default ``model 0``, ...
        rescale: use ``weights`` as given and divide by the number of models (the reference's ``--scale``).
        kind: ``prob``, or ``logit`` for logits / cosines (matters for top-k inputs only: a class a model does
            not keep adds its floor, not 0; :func:`common.lib.topk.weighted_mean`).

    Returns:
        ``(ensemble, images, classes)``: ``(N, C)`` (float32 when every input is float32, else float64), or a
        :class:`~common.lib.topk.TopK` when an input is one (:func:`common.lib.topk.weighted_mean`: the union
        of the models' classes per row), and the first model's ids and class names.
    """
    n = len(probs)
    if n == 0:
        raise ValueError("ensemble_probs: no models given")
    names = [f"model {i}" for i in range(n)] if names is None else [str(x) for x in names]
    if not (len(images) == len(classes) == len(names) == n):
        raise ValueError(
            f"ensemble_probs: {n} arrays but {len(images)} image lists, {len(classes)} class lists, "
            f"{len(names)} names"
        )
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble_probs: need {n} finite weights >= 0 with a positive sum, got {weights!r}")
    w = w / n if rescale else w / w.sum()
    ref_images, ref_classes = [str(v) for v in images[0]], [str(v) for v in classes[0]]
    if any(isinstance(p, topk.TopK) for p in probs):
        parts = [align(probs[i], images[i], classes[i], ref_images, ref_classes, names[i], names[0])
                 for i in range(n)]
        for i, part in enumerate(parts):
            topk.check_finite(part, ref_images, ref_classes, names[i])
        return topk.weighted_mean(parts, w, kind), ref_images, ref_classes
    # float32 inputs (stage 05 writes float32) sum in float32: a float64 (N, C) of a large test set is GBs
    dtype = np.float32 if all(np.asarray(p).dtype == np.float32 for p in probs) else np.float64
    out = np.zeros((len(ref_images), len(ref_classes)), dtype=dtype)
    for i in range(n):
        aligned = align(probs[i], images[i], classes[i], ref_images, ref_classes, names[i], names[0])
        if not np.isfinite(aligned).all():
            r, c = (int(v) for v in np.argwhere(~np.isfinite(aligned))[0])
            raise ValueError(
                f"{names[i]}: value at image {ref_images[r]!r}, class {ref_classes[c]!r} is not finite"
            )
        out += dtype(w[i]) * aligned
    return out, ref_images, ref_classes


def blend_scores(
    retrieval_table: pd.DataFrame,
    class_scores: np.ndarray | topk.TopK,
    images: Sequence[str],
    classes: Sequence[str],
    ratio: float,
    kind: str = "prob",
    logit_scale: float = 1.0,
    class_top_k: int = 5,
) -> pd.DataFrame:
    """Blend per-individual retrieval scores with classifier scores over the same individuals.

    ``score = (1 - ratio) * retrieval + ratio * classifier`` for each ``(image, individual)`` candidate.

    The scale issue: a retrieval score is the cosine similarity of the best neighbour
    (:func:`common.lib.retrieval.individual_scores`), in ``[-1, 1]`` and for the best candidates usually in a
    narrow positive band; a softmax probability is near 0 for all but a few classes; a logit is unbounded
    (``s * cos`` for an ArcFace head, ``s`` ~ 30). A blend of raw values of different scales is dominated by
    the wider one whatever ``ratio`` says. So: ``kind="prob"`` uses probabilities as they are (both terms then
    lie in ``[0, 1]`` for positive similarities); ``kind="logit"`` divides logits by ``logit_scale``: pass the
    ArcFace ``s`` (``arc_s``) and the term *is* the cosine to the class centre, on the retrieval scale (with
    post-hoc logit adjustment it is shifted by ``tau * log prior / s``). Either way the blended scores are a
    new scale: tune the ``new_individual`` threshold on the blended out-of-fold table
    (:func:`common.lib.retrieval.tune_threshold`), never reuse the retrieval one. Tune ``ratio`` out of fold too:
    the ACCV 2022 winners list a retrieval/classification mix among what did not help them.

    Candidates per image: the individuals the retrieval table holds, plus (when ``ratio > 0``) the
    classifier's ``class_top_k`` best classes. A missing retrieval score is filled with that image's lowest
    retrieved score (the upper bound :func:`common.lib.retrieval.average_scores` also uses); an individual that is
    not a classifier class gets that image's lowest classifier score.

    Args:
        retrieval_table: ``image, individual_id, score`` (stage 04's ``oof_scores.csv``/``test_scores.csv``).
        class_scores: ``(N, C)`` classifier probabilities or logits (stage 05's ``probs`` / ``logits``), dense
            or a :class:`~common.lib.topk.TopK`: then a pair whose individual is outside the image's kept
            classes, or is no class, gets the row's floor (:mod:`common.lib.topk`).
        images: row ids of ``class_scores``; the same set as the table's images.
        classes: column names of ``class_scores`` (individual ids).
        ratio: weight of the classifier, in ``[0, 1]``; 0 returns the retrieval scores alone.
        kind: ``"prob"`` or ``"logit"`` (see above).
        logit_scale: divisor of logits for ``kind="logit"``.
        class_top_k: classifier classes added as candidates per image.

    Returns:
        ``image, individual_id, score`` sorted by image, then descending score, then individual id: the input
        of :func:`common.lib.retrieval.predict` and :func:`common.lib.retrieval.tune_threshold`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blend_scores: ratio must be in [0, 1], got {ratio}")
    if kind not in BLEND_KINDS:
        raise ValueError(f"blend_scores: kind={kind!r}; use one of {BLEND_KINDS}")
    if not logit_scale > 0:
        raise ValueError(f"blend_scores: logit_scale must be > 0, got {logit_scale}")
    missing = [c for c in ("image", "individual_id", "score") if c not in retrieval_table.columns]
    if missing:
        raise ValueError(f"blend_scores: retrieval table lacks column(s) {missing}")
    table = retrieval_table[["image", "individual_id", "score"]].astype({"image": str, "individual_id": str})
    rows, cols = _ids(images, "image", "classifier"), _ids(classes, "class", "classifier")
    _same_set(sorted(set(table["image"])), rows, "images", "retrieval table", "classifier")
    # kept in its dtype: (N, C) can be GBs; gathered entries go to float64
    sparse = isinstance(class_scores, topk.TopK)
    values = class_scores if sparse else np.asarray(class_scores)
    if values.shape != (len(rows), len(cols)):
        raise ValueError(
            f"classifier: array of shape {values.shape} for {len(rows)} images x {len(cols)} classes"
        )
    dense = values.value if sparse else values  # the stored entries (a TopK's kept columns)

    def where(r: int, j: int) -> str:
        return f"image {rows[r]!r}, class {cols[int(values.index[r, j]) if sparse else j]!r} is {dense[r, j]}"

    if not np.isfinite(dense).all():
        raise ValueError(f"classifier: {where(*(int(v) for v in np.argwhere(~np.isfinite(dense))[0]))}")
    if kind == "prob" and dense.size and (dense.min() < -1e-6 or dense.max() > 1 + 1e-6):
        r, j = (int(v) for v in np.argwhere((dense < -1e-6) | (dense > 1 + 1e-6))[0])
        raise ValueError(f"classifier: kind='prob' but {where(r, j)}; pass logits with kind='logit'")
    scale = float(logit_scale) if kind == "logit" else 1.0
    if not set(table["individual_id"]) & set(cols):
        raise ValueError("blend_scores: no retrieval individual is a classifier class (wrong label_column?)")

    pairs = table[["image", "individual_id"]]
    if ratio > 0 and class_top_k > 0:
        kk = min(class_top_k, len(cols))
        # the kk best columns per row (their order does not matter: the output is sorted by score)
        if sparse:
            top = values.index[:, :kk]
        else:
            top = np.argpartition(-values, kk - 1, axis=1)[:, :kk] if kk < len(cols) else np.arange(kk)[None]
            top = np.broadcast_to(top, (len(rows), kk))
        extra = pd.DataFrame(
            {"image": np.repeat(rows, top.shape[1]), "individual_id": np.asarray(cols)[top].ravel()}
        )
        pairs = pd.concat([pairs, extra]).drop_duplicates(ignore_index=True)
    merged = pairs.merge(table, on=["image", "individual_id"], how="left")
    floor = table.groupby("image")["score"].min()
    r_score = merged["score"].fillna(merged["image"].map(floor)).to_numpy(np.float64)
    row_pos = pd.Series(np.arange(len(rows)), index=rows)[merged["image"]].to_numpy()
    col_pos = pd.Series(np.arange(len(cols)), index=cols).reindex(merged["individual_id"]).to_numpy()
    known = ~np.isnan(col_pos)
    c_score = topk.row_min(values)[row_pos].astype(np.float64) / scale
    c_score[known] = topk.gather(values, row_pos[known], col_pos[known].astype(int)).astype(np.float64) / scale
    out = merged.assign(score=(1.0 - ratio) * r_score + ratio * c_score)
    return out.sort_values(
        ["image", "score", "individual_id"], ascending=[True, False, True], ignore_index=True
    )[["image", "individual_id", "score"]]


def uniform_soup(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The uniform model soup: the mean of state dicts of one architecture (Wortsman et al., 2022).

    Args:
        states: state dicts with the same keys and shapes (e.g. the last epochs of one run, or several runs
            fine-tuned from the same initialisation).
    """
    return average_state_dicts(states)


def greedy_soup(
    states: Sequence[Mapping[str, Any]],
    evaluate: Callable[[dict[str, Any]], float],
    names: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
) -> tuple[dict[str, Any], list[str], pd.DataFrame]:
    """The greedy model soup (Wortsman et al., 2022, Recipe 1): add a model only if it does not hurt.

    Candidates are sorted by their own validation score, best first (ties keep input order). The soup starts
    as the best candidate; each next candidate is tried as the uniform mean of the kept models plus itself,
    and kept when that soup's score is ``>=`` the current soup's score.

    Args:
        states: candidate state dicts of one architecture.
        evaluate: ``evaluate(state_dict) -> float``, the held-out score to maximise (e.g. loads the weights
            into a model and returns its validation accuracy).
        names: a name per candidate (default ``"0"``, ``"1"``, ...).
        scores: each candidate's own score when already known; ``None`` evaluates each once.

    Returns:
        ``(soup, kept, steps)``: the soup's state dict, the kept names in the order added, and one row per
        candidate ``step, candidate, candidate_score, soup_score, kept, best_score`` (``soup_score``: the
        score of the soup tried at that step; ``best_score``: the current soup's score after it).
    """
    n = len(states)
    if n == 0:
        raise ValueError("greedy_soup: no candidate states")
    names = [str(i) for i in range(n)] if names is None else [str(x) for x in names]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"greedy_soup: need {n} distinct names, got {names}")

    def score_of(state: dict[str, Any], what: str) -> float:
        value = float(evaluate(state))
        if not np.isfinite(value):
            raise ValueError(f"greedy_soup: evaluate returned {value} for {what}")
        return value

    own = (
        [score_of(dict(s), f"candidate {names[i]}") for i, s in enumerate(states)]
        if scores is None
        else [float(v) for v in scores]
    )
    if len(own) != n:
        raise ValueError(f"greedy_soup: {len(own)} scores for {n} states")
    order = sorted(range(n), key=lambda i: -own[i])  # sorted() is stable: ties keep input order
    kept, best = [order[0]], own[order[0]]
    soup = average_state_dicts([states[order[0]]])
    rows = [
        dict(
            step=0,
            candidate=names[order[0]],
            candidate_score=own[order[0]],
            soup_score=best,
            kept=True,
            best_score=best,
        )
    ]
    for step, i in enumerate(order[1:], start=1):
        trial = average_state_dicts([states[j] for j in kept] + [states[i]])
        value = score_of(trial, f"the soup with {names[i]}")
        take = value >= best
        if take:
            kept, best, soup = kept + [i], value, trial
        rows.append(
            dict(
                step=step,
                candidate=names[i],
                candidate_score=own[i],
                soup_score=value,
                kept=take,
                best_score=best,
            )
        )
    return soup, [names[i] for i in kept], pd.DataFrame(rows)
