"""After the ensemble: ``new_individual`` thresholds, pseudo-labels, label cleaning and label re-distribution.

- ``new_individual`` thresholds: species differ in how tight their embeddings are and in how many of their
  images are unseen individuals, so a threshold per species, tuned out of fold where a species has enough
  queries, can beat the global one; a threshold set by the share of test images answered ``new_individual``
  is the other knob. Both reuse :func:`common.lib.retrieval.tune_threshold` / :func:`common.lib.retrieval.predict`.
- Pseudo-labels (rounds of "ensemble -> confident test images -> retrain"), label cleaning with out-of-fold
  predictions and re-distribution of labels toward a minimum count per class follow the ACCV 2022 FGIA
  1st-place solution, https://github.com/Ezra-Yu/ACCV2022_FGIA_1st (``tools/creat_pseudo.py``,
  ``tools/re-distribute-label.py``).

Pseudo-labels, cleaning and re-distribution take dense ``(N, C)`` probabilities or a
:class:`common.lib.topk.TopK` (stage 05's bounded-memory format): a label outside an image's kept classes has
the row's floor as its probability, and re-distribution moves an image only to a class it keeps
(:mod:`common.lib.topk`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import store
from common.lib import retrieval, topk
from common.lib.metrics import NEW_LABEL, map_at_k


def _check_matrix(probs: np.ndarray | topk.TopK, images: Sequence[str], classes: Sequence[str], where: str
                  ) -> np.ndarray | topk.TopK:
    if isinstance(probs, topk.TopK):
        if probs.shape != (len(images), len(classes)):
            raise ValueError(f"{where}: probs of shape {probs.shape} for {len(images)} images x "
                             f"{len(classes)} classes")
        topk.check_finite(probs, [str(i) for i in images], [str(c) for c in classes], where)
        return probs
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if probs.ndim != 2 or probs.shape != (len(images), len(classes)):
        raise ValueError(f"{where}: probs of shape {probs.shape} for {len(images)} images x "
                         f"{len(classes)} classes")
    if len({str(i) for i in images}) != len(images):
        raise ValueError(f"{where}: image ids are not unique")
    if len({str(c) for c in classes}) != len(classes):
        raise ValueError(f"{where}: class names are not unique")
    if not np.isfinite(probs).all():
        r, c = (int(v) for v in np.argwhere(~np.isfinite(probs))[0])
        raise ValueError(f"{where}: probs at image {images[r]!r}, class {classes[c]!r} is {probs[r, c]}")
    return probs


# ------------------------------------------------------------------------------- new_individual thresholds
def tune_species_thresholds(
    table: pd.DataFrame,
    truth: Mapping[str, str] | pd.Series,
    species: Mapping[str, str] | pd.Series,
    thresholds: Sequence[float],
    min_queries: int = 50,
    k: int = 5,
    new_label: str = NEW_LABEL,
) -> tuple[dict[str, float], float, pd.DataFrame]:
    """Tune the ``new_individual`` threshold per species on out-of-fold scores.

    The global threshold is :func:`common.lib.retrieval.tune_threshold` over all queries; each species with at
    least ``min_queries`` out-of-fold queries gets its own tuned on its queries alone, the others fall back to
    the global one (a threshold tuned on a handful of images is noise).

    Args:
        table: out-of-fold ``image, individual_id, score`` (stage 04's ``oof_scores.csv``).
        truth: ``image -> true label`` (``new_label`` for unseen individuals; stage 04's ``oof_truth.csv``).
        species: ``image -> species`` for every truth image (from ``train.csv``).
        thresholds: values to try.
        min_queries: fewest queries of a species for its own threshold.
        k: predictions per image.
        new_label: the "not in the gallery" label.

    Returns:
        ``(per_species, global_threshold, summary)``: a threshold for every species (fallbacks included), the
        global one, and ``species, n_queries, threshold, own, map5, map5_global`` (MAP@k of the species'
        queries at its threshold and at the global one).
    """
    truth = {str(a): str(b) for a, b in dict(truth).items()}
    species = {str(a): str(b) for a, b in dict(species).items()}
    missing = [i for i in truth if i not in species]
    if missing:
        raise ValueError(f"tune_species_thresholds: {len(missing)} truth images have no species, "
                         f"e.g. {missing[0]!r}")
    if min_queries < 1:
        raise ValueError(f"tune_species_thresholds: min_queries must be >= 1, got {min_queries}")
    best = retrieval.tune_threshold(table, truth, thresholds, k=k, new_label=new_label)[0]
    by_species = pd.Series(species).reindex(list(truth))
    # Table rows per species in one pass (every table image has a truth, checked by tune_threshold above), not
    # one scan of the whole table per species; positions ascend, so each sub-table keeps the table's order.
    row_species = table["image"].astype(str).map(species).to_numpy(dtype=object)
    rows_of = pd.Series(np.arange(len(table))).groupby(row_species, sort=False).indices
    per_species, rows = {}, []
    for name, members in by_species.groupby(by_species, sort=True):
        images = list(members.index)
        sub_truth = {i: truth[i] for i in images}
        sub_table = table.iloc[rows_of.get(name, np.empty(0, np.int64))]
        own = len(images) >= min_queries
        thr = best
        if own:
            thr = retrieval.tune_threshold(sub_table, sub_truth, thresholds, k=k, new_label=new_label)[0]
        per_species[str(name)] = thr

        def score(t: float, sub_table=sub_table, images=images, sub_truth=sub_truth) -> float:
            pred = retrieval.predict(sub_table, t, k=k, new_label=new_label, images=images)
            return map_at_k([sub_truth[i] for i in images], pred["predictions"].str.split().tolist(), k=k)

        rows.append(dict(species=str(name), n_queries=len(images), threshold=thr, own=own, map5=score(thr),
                         map5_global=score(best)))
    return per_species, best, pd.DataFrame(rows)


def candidate_species(table: pd.DataFrame, individual_species: Mapping[str, str] | pd.Series) -> pd.Series:
    """``image -> species`` of each image's best candidate: the species of a test image, which has no label.

    An image whose best candidate has no species in ``individual_species`` gets NaN (the default threshold).

    Args:
        table: ``image, individual_id, score``.
        individual_species: ``individual_id -> species`` (from ``train.csv``).
    """
    top = table.sort_values(["image", "score", "individual_id"], ascending=[True, False, True])
    top = top.drop_duplicates("image")
    lookup = {str(a): str(b) for a, b in dict(individual_species).items()}
    return pd.Series([lookup.get(str(i)) for i in top["individual_id"]],
                     index=top["image"].astype(str).to_numpy())


def predict_by_species(
    table: pd.DataFrame,
    image_species: Mapping[str, str] | pd.Series,
    thresholds: Mapping[str, float],
    default: float,
    k: int = 5,
    new_label: str = NEW_LABEL,
    images: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`common.lib.retrieval.predict` with each image's threshold taken from its species.

    Args:
        table: ``image, individual_id, score``.
        image_species: ``image -> species`` (e.g. :func:`candidate_species` for test images).
        thresholds: ``species -> threshold`` (from :func:`tune_species_thresholds`).
        default: threshold of images whose species is unknown or has no threshold.
        k: predictions per image.
        new_label: the "not in the gallery" label.
        images: output rows in this order; default the table's images, sorted.

    Returns:
        ``image, predictions, threshold``.
    """
    images = sorted(set(table["image"].astype(str))) if images is None else [str(i) for i in images]
    extra = set(table["image"].astype(str)) - set(images)
    if extra:
        raise ValueError(f"predict_by_species: {len(extra)} table images are not in `images`, "
                         f"e.g. {sorted(extra)[0]!r}")
    sp = {str(a): b for a, b in dict(image_species).items()}
    thr = pd.Series([float(thresholds.get(sp.get(i), default)) for i in images], index=images)
    parts = []
    row_thr = table["image"].astype(str).map(thr).to_numpy()  # one pass, not one table scan per threshold
    rows_of = pd.Series(np.arange(len(table))).groupby(row_thr, sort=False).indices
    for t, members in thr.groupby(thr, sort=False):
        sub = table.iloc[rows_of.get(t, np.empty(0, np.int64))]
        parts.append(retrieval.predict(sub, float(t), k=k, new_label=new_label, images=list(members.index)))
    out = pd.concat(parts).set_index("image").reindex(images).reset_index()
    return out.assign(threshold=thr.to_numpy())


def threshold_for_share(table: pd.DataFrame, share: float, images: Sequence[str] | None = None
                        ) -> tuple[float, float]:
    """The threshold at which about ``share`` of the images get ``new_individual`` as their first answer.

    An image answers ``new_individual`` first when its best candidate scores below the threshold
    (:func:`common.lib.retrieval.predict`). With the images' best scores sorted ascending ``s_1 <= ... <= s_n``
    and ``q = round(share * n)``, the threshold is the midpoint ``(s_q + s_{q+1}) / 2`` (``s_1`` for
    ``q = 0``, just above ``s_n`` for ``q = n``), so exactly ``q`` images fall below it unless scores tie.

    Args:
        table: test ``image, individual_id, score``.
        share: target share in ``[0, 1]`` (e.g. the share of unseen individuals expected in the test set).
        images: all test images; those without candidates always answer ``new_individual`` and count.

    Returns:
        ``(threshold, achieved_share)``.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"threshold_for_share: share must be in [0, 1], got {share}")
    best = table.groupby(table["image"].astype(str))["score"].max()
    images = list(best.index) if images is None else [str(i) for i in images]
    extra = set(best.index) - set(images)
    if extra:
        raise ValueError(f"threshold_for_share: {len(extra)} table images are not in `images`, "
                         f"e.g. {sorted(extra)[0]!r}")
    n = len(images)
    if n == 0:
        raise ValueError("threshold_for_share: no images")
    s = np.sort(best.reindex(images).fillna(-np.inf).to_numpy(np.float64))  # no candidate: always new
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        raise ValueError("threshold_for_share: no image has a candidate")
    q = int(round(share * n))
    lo, hi = (s[q - 1] if q > 0 else -np.inf), (s[q] if q < n else np.inf)
    if hi == np.inf:  # everything new: just above the best score
        t = float(np.nextafter(finite[-1], np.inf))
    elif hi == -np.inf:  # more images lack candidates than q: the fewest new answers possible
        t = float(finite[0])
    elif lo == -np.inf:
        t = float(hi)  # a score equal to the threshold stays above it
    else:
        t = float((lo + hi) / 2)
    return t, float((s < t).mean())


# ------------------------------------------------------------------------------------------ pseudo-labels
def select_pseudo_labels(
    probs: np.ndarray,
    images: Sequence[str],
    classes: Sequence[str],
    threshold: float,
    round_no: int,
    label_column: str = "individual_id",
) -> pd.DataFrame:
    """Test images whose ensemble is confident enough to be trained on: ``max prob >= threshold``.

    The reference kept test images at ``max prob > 0.45`` (strictly; here ``>=``) in each of three rounds, on
    probabilities of an ensemble *without* its ``--scale`` weights: use :func:`common.lib.ensemble.ensemble_probs`
    with ``rescale=False`` so the threshold is on a probability.

    Args:
        probs: ``(N, C)`` ensemble probabilities of the test images.
        images: row ids.
        classes: column names.
        threshold: lowest max probability kept.
        round_no: the pseudo-label round (1, 2, ...), written in the table.
        label_column: name of the label column (that of ``train.csv``).

    Returns:
        ``image, <label_column>, confidence, round`` for the kept images, in input order.
    """
    probs = _check_matrix(probs, images, classes, "select_pseudo_labels")
    if round_no < 1:
        raise ValueError(f"select_pseudo_labels: round_no must be >= 1 (0: the original labels), "
                         f"got {round_no}")
    top = topk.argmax(probs)
    conf = topk.row_max(probs)
    keep = conf >= threshold
    return pd.DataFrame({"image": np.asarray([str(i) for i in images], dtype=object)[keep],
                         label_column: np.asarray([str(c) for c in classes], dtype=object)[top[keep]],
                         "confidence": conf[keep], "round": int(round_no)})


def pseudo_label_summary(
    pseudo: pd.DataFrame, label_column: str = "individual_id", n_test: int | None = None
) -> pd.DataFrame:
    """Per round: ``round, n_images, n_classes, mean_confidence, min_confidence`` (+ ``share`` of ``n_test``).

    Args:
        pseudo: one or several rounds of :func:`select_pseudo_labels` tables, concatenated.
        label_column: the label column of ``pseudo``.
        n_test: number of test images, for the kept share.
    """
    out = pseudo.groupby("round", sort=True).agg(
        n_images=("image", "size"), n_classes=(label_column, "nunique"),
        mean_confidence=("confidence", "mean"), min_confidence=("confidence", "min")).reset_index()
    return out.assign(share=out["n_images"] / n_test) if n_test else out


def write_pseudo_training_table(
    train: pd.DataFrame,
    pseudo: pd.DataFrame,
    folder: str | os.PathLike,
    round_no: int,
    label_column: str = "individual_id",
    stem: str = "train",
) -> Path:
    """Write ``<folder>/<stem>_round<round_no>.csv``: the training rows plus the kept test rows, atomically.

    Training rows get ``round`` 0 and an empty ``confidence``. A pseudo row takes the columns ``pseudo`` has;
    a training column it lacks is filled from the label when the training table maps every label to one value
    and some value is shared by several rows (``species`` of an ``individual_id``), else left empty (e.g.
    ``path``: add it to ``pseudo`` first).

    Args:
        train: the *original* training table (not an earlier round's output).
        pseudo: :func:`select_pseudo_labels` table (any extra columns kept).
        folder: output folder.
        round_no: the round number, in the file name.
        label_column: the label column of both tables.
        stem: file name stem.

    Raises:
        ValueError: naming the image and its row when a pseudo image is already a training image or is
            repeated, or when a needed column is missing.
    """
    for name, df in (("train", train), ("pseudo", pseudo)):
        missing = [c for c in ("image", label_column) if c not in df.columns]
        if missing:
            raise ValueError(f"write_pseudo_training_table: {name} table lacks column(s) {missing}")
    train_ids = set(train["image"].astype(str))
    for row, image in enumerate(pseudo["image"].astype(str)):
        if image in train_ids:
            raise ValueError(f"write_pseudo_training_table: pseudo row {row}: image {image!r} is already a "
                             "training image (pass the original train table, not an earlier round's)")
    dup = pseudo["image"].astype(str).duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"write_pseudo_training_table: pseudo row {row}: image "
                         f"{pseudo['image'].iloc[row]!r} repeated")
    rows = pseudo.copy()
    labels = train[label_column].astype(str)
    for col in train.columns:
        if col in rows.columns:
            continue
        per_label = train.groupby(labels)[col].nunique(dropna=False)
        # one value per label, shared by several rows (a per-image column such as a path is never filled)
        if (per_label == 1).all() and train[col].duplicated().any():
            lookup = train.assign(_l=labels).drop_duplicates("_l").set_index("_l")[col]
            rows[col] = rows[label_column].astype(str).map(lookup)
    base = train.assign(round=0, confidence=np.nan)
    columns = list(base.columns) + [c for c in rows.columns if c not in base.columns]
    out = pd.concat([base, rows], ignore_index=True)[columns]
    return store.write_csv(Path(folder) / f"{stem}_round{int(round_no)}.csv", out)


# ----------------------------------------------------------------------------------------- label cleaning
def flag_noisy_labels(
    probs: np.ndarray,
    images: Sequence[str],
    classes: Sequence[str],
    labels: Sequence[str] | Sequence[int],
    threshold: float,
) -> pd.DataFrame:
    """Training images whose out-of-fold prediction disagrees with their label, confidently.

    Args:
        probs: ``(N, C)`` out-of-fold probabilities (stage 05's ``oof.npz`` ``probs``).
        images: row ids.
        classes: column names.
        labels: each row's given label: class names, or integer class indices (``oof.npz`` ``label``).
        threshold: flag when the predicted class differs and its probability is ``>= threshold``.

    Returns:
        ``image, label, predicted, confidence, label_prob`` of the flagged rows, most confident first.
    """
    probs = _check_matrix(probs, images, classes, "flag_noisy_labels")
    names = [str(c) for c in classes]
    lab = np.asarray(labels)
    if len(lab) != len(probs):
        raise ValueError(f"flag_noisy_labels: {len(lab)} labels for {len(probs)} rows")
    if np.issubdtype(lab.dtype, np.integer):
        bad = (lab < 0) | (lab >= len(names))
        if bad.any():
            raise ValueError(f"flag_noisy_labels: row {int(np.argmax(bad))}: class index {lab[bad][0]} "
                             f"out of range")
        idx = lab.astype(int)
    else:
        pos = {c: i for i, c in enumerate(names)}
        unknown = [i for i, v in enumerate(lab) if str(v) not in pos]
        if unknown:
            bad_label = str(lab[unknown[0]])
            raise ValueError(f"flag_noisy_labels: row {unknown[0]}: label {bad_label!r} is not a class")
        idx = np.array([pos[str(v)] for v in lab], dtype=int)
    pred = topk.argmax(probs)
    conf = topk.row_max(probs)
    flag = (pred != idx) & (conf >= threshold)
    names_arr = np.asarray(names, dtype=object)
    out = pd.DataFrame({"image": np.asarray([str(i) for i in images], dtype=object)[flag],
                        "label": names_arr[idx[flag]], "predicted": names_arr[pred[flag]],
                        "confidence": conf[flag],
                        "label_prob": topk.gather(probs, np.flatnonzero(flag), idx[flag])})
    return out.sort_values(["confidence", "image"], ascending=[False, True], ignore_index=True)


def write_clean_table(train: pd.DataFrame, flagged: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """Write the training table without the flagged images, atomically; returns it.

    Args:
        train: training table with an ``image`` column.
        flagged: :func:`flag_noisy_labels` output (its ``image`` column is used).
        path: output CSV.
    """
    unknown = sorted(set(flagged["image"].astype(str)) - set(train["image"].astype(str)))
    if unknown:
        raise ValueError(f"write_clean_table: {len(unknown)} flagged images are not training images, "
                         f"e.g. {unknown[0]!r}")
    clean = train[~train["image"].astype(str).isin(set(flagged["image"].astype(str)))].reset_index(drop=True)
    store.write_csv(path, clean)
    return clean


# ------------------------------------------------------------------------------------ label re-distribution
def redistribute_labels(probs: np.ndarray, images: Sequence[str], classes: Sequence[str], k: int
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give every class predicted fewer than ``k`` times on the test set up to ``k`` images.

    The reference (``re-distribute-label.py``, ``--K 16`` for 90,000 images of 5,000 classes: a little below
    ``n_images / n_classes``) assumes a roughly balanced test set. Its greedy may take an image from a class
    it pushes below ``k``; this one never does. The exact order:

    1. Predictions are the argmax; classes with fewer than ``k`` predictions are visited once, in ascending
       order of their starting count, ties by column order.
    2. For a visited class ``c``, the images not predicted ``c`` now are tried by descending ``probs[:, c]``
       (ties by row order). An image predicted ``d`` moves to ``c`` only if ``d`` still has at least ``k``
       predictions after losing it (so a class below ``k``, or one that reached ``k`` by an earlier move, is
       never taken from). The visit stops when ``c`` has ``k`` predictions or no image is left to try.

    Args:
        probs: ``(N, C)`` ensemble scores of the test images.
        images: row ids.
        classes: column names.
        k: minimum predictions per class, >= 1.

    Returns:
        ``(predictions, moved)``: ``image, label, moved`` in input order, and one row per move
        ``image, from_label, to_label, score, from_score`` in the order the moves were made.
    """
    probs = _check_matrix(probs, images, classes, "redistribute_labels")
    if k < 1:
        raise ValueError(f"redistribute_labels: k must be >= 1, got {k}")
    names = [str(c) for c in classes]
    pred = topk.argmax(probs)
    counts = np.bincount(pred, minlength=len(names))
    start = counts.copy()
    moved = []
    rows_of = topk.class_rows(probs)
    for c in sorted(np.flatnonzero(start < k), key=lambda j: (start[j], j)):
        for i, score in zip(*rows_of(c), strict=True):
            if counts[c] >= k:
                break
            d = pred[i]
            if d == c or counts[d] - 1 < k:
                continue
            pred[i], counts[d], counts[c] = c, counts[d] - 1, counts[c] + 1
            moved.append(dict(image=str(images[i]), from_label=names[d], to_label=names[c],
                              score=float(score), from_score=float(topk.gather(probs, [i], [d])[0])))
    first = topk.argmax(probs)
    predictions = pd.DataFrame({"image": [str(i) for i in images], "label": [names[j] for j in pred],
                                "moved": pred != first})
    columns = ["image", "from_label", "to_label", "score", "from_score"]
    return predictions, pd.DataFrame(moved, columns=columns)
