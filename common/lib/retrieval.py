"""Nearest-neighbour retrieval of individuals with a ``new_individual`` threshold.

The recipe is the one most Happywhale solutions share (e.g. the 1st place,
https://www.kaggle.com/competitions/happy-whale-and-dolphin/discussion/320192, and
https://github.com/knshnb/kaggle-happywhale-1st): cosine similarity between L2-normalised embeddings with an
exact FAISS inner-product index (https://github.com/facebookresearch/faiss), an individual scored by its best
neighbour, and ``new_individual`` inserted in the ranking at a similarity threshold tuned out-of-fold.

Tables passed between the functions here are long: one row per ``(image, individual_id)`` with a ``score``
(cosine similarity, higher is closer), sorted by ``image`` then by descending ``score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import faiss
import numpy as np
import pandas as pd

from common.lib import ann
from common.lib.metrics import NEW_LABEL, map_at_k

TABLE_COLUMNS = ["image", "individual_id", "score"]
# faiss' GPU k-selection is limited to 2048 (GPU_MAX_SELECTION_K); beyond it the CPU index is used.
_GPU_MAX_K = 2048
NEVER_NEW = -2.0  # below every score (cosines, and SIFT-fused scores, lie in [-1, 1]): new_individual never first


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero).

    Args:
        x: ``(n, d)`` array (or a single ``(d,)`` vector).
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, np.float32(1e-12))).astype(np.float32, copy=False)


def concat_embeddings(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Join several models' embeddings of the same images into one vector per image.

    Each part is L2-normalised, the parts are concatenated along features and the result is normalised again,
    so the inner product of two joined vectors is the *mean* of the parts' cosine similarities (every fold
    weighs the same). This is the alternative to :func:`average_scores`: one search instead of one per fold.

    Args:
        arrays: ``(n, d_i)`` arrays whose rows are the same images in the same order.
    """
    if len(arrays) == 0:
        raise ValueError("concat_embeddings: no arrays given")
    n = len(arrays[0])
    for i, a in enumerate(arrays):
        if np.ndim(a) != 2:
            raise ValueError(f"concat_embeddings: array {i} has shape {np.shape(a)}, expected (n, d)")
        if len(a) != n:
            raise ValueError(f"concat_embeddings: array {i} has {len(a)} rows but array 0 has {n}")
    return l2_normalize(np.concatenate([l2_normalize(a) for a in arrays], axis=1))


def _check_matrix(x: np.ndarray, name: str) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"search: {name} must be a 2-D numpy array, got shape {np.shape(x)}")
    if x.dtype != np.float32:
        raise TypeError(f"search: {name} is {x.dtype}, expected float32 (use retrieval.l2_normalize)")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"search: {name} row {row} column {col} is {x[row, col]} (NaN/inf embeddings)")


def _want_gpu(use_gpu: bool | None) -> bool:
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is False:
        return False
    if n_gpus > 0:
        return True
    if use_gpu:
        raise RuntimeError("search(use_gpu=True): faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    return False


def search(
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    use_gpu: bool | None = None,
    exclude_self: bool = False,
    index: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search (cosine similarity for normalised rows): exact with faiss ``IndexFlatIP``,
    or approximate with an IVF index for galleries of :data:`common.lib.ann.FLAT_BELOW` rows and more.

    Args:
        gallery: ``(n_gallery, d)`` float32, rows already L2-normalised by the caller.
        queries: ``(n_queries, d)`` float32, normalised likewise.
        k: neighbours per query; clipped to the gallery size (``n_gallery - 1`` with ``exclude_self``).
        use_gpu: ``None`` uses a GPU index when ``faiss.get_num_gpus() > 0`` (faiss-gpu on a CUDA box), ``False``
            never does, ``True`` requires one.
        exclude_self: ``queries`` *are* the gallery (leave-one-out): each row's own index is dropped from its
            neighbours. When exact duplicates crowd a row's own index out of its top ``k + 1``, the last
            neighbour is dropped instead, so every row keeps exactly ``k`` neighbours, none of them itself.
        index: ``auto`` (exact below :data:`common.lib.ann.FLAT_BELOW` gallery rows or
            :data:`common.lib.ann.IVF_MIN_QUERIES` queries, else IVF-Flat from :mod:`common.lib.ann` with ``nprobe``
            raised until recall@k >= 0.99 on a sample of the queries, :func:`common.lib.ann.calibrate_nprobe`),
            ``flat`` (always exact) or ``ivf``.

    Returns:
        ``(scores, indices)``, both ``(n_queries, k_eff)`` with ``k_eff`` the clipped ``k``, best first.
        ``indices`` are gallery rows. A slot faiss could not fill would hold index ``-1`` with score ``-inf``;
        an exact flat index with ``k_eff <= n_gallery`` never produces one, but every consumer here skips
        ``-1`` so the tables stay right if it ever happens.
    """
    _check_matrix(gallery, "gallery")
    _check_matrix(queries, "queries")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"search: gallery has {gallery.shape[1]} dims but queries have {queries.shape[1]}")
    if len(gallery) == 0:
        raise ValueError("search: the gallery is empty")
    if k < 1:
        raise ValueError(f"search: k must be >= 1, got {k}")
    if exclude_self and not (queries is gallery or np.array_equal(queries, gallery)):
        raise ValueError(
            "search(exclude_self=True): queries must be the gallery itself (same rows, same order)"
        )
    n_q, d = queries.shape
    k_eff = min(int(k), len(gallery) - 1 if exclude_self else len(gallery))
    if k_eff <= 0:
        return np.empty((n_q, 0), np.float32), np.empty((n_q, 0), np.int64)
    k_search = k_eff + 1 if exclude_self else k_eff

    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"search: index must be 'auto', 'flat' or 'ivf', got {index!r}")
    if index == "ivf" or (index == "auto" and ann.choose_index(len(gallery), d, n_q) == "ivf"):
        ivf = ann.build_index(gallery, kind="ivf", use_gpu=use_gpu)
        ann.calibrate_nprobe(ivf, gallery, queries, k_search)  # recall@k >= 0.99 on a sample of these queries
        scores, indices = ann.ann_search(ivf, queries, k_search)
        del ivf
    else:
        flat = faiss.IndexFlatIP(d)
        resources = None
        if _want_gpu(use_gpu) and k_search <= _GPU_MAX_K:
            resources = faiss.StandardGpuResources()  # must outlive the GPU index
            flat = faiss.index_cpu_to_gpu(resources, 0, flat)
        flat.add(np.ascontiguousarray(gallery))
        scores, indices = flat.search(np.ascontiguousarray(queries), k_search)
        del flat, resources
    indices = indices.astype(np.int64, copy=False)
    scores = np.where(indices < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)

    if exclude_self:
        is_self = indices == np.arange(n_q)[:, None]
        keep = ~is_self
        keep[~is_self.any(axis=1), -1] = False  # self not retrieved (duplicates): drop the worst instead
        scores = scores[keep].reshape(n_q, k_eff)
        indices = indices[keep].reshape(n_q, k_eff)
    return scores, indices


def individual_scores(
    scores: np.ndarray,
    indices: np.ndarray,
    gallery_labels: Sequence[str],
    query_ids: Sequence[str],
) -> pd.DataFrame:
    """Turn image neighbours into individual candidates: an individual scores its best retrieved neighbour.

    Args:
        scores: ``(n_queries, k)`` similarities from :func:`search`.
        indices: ``(n_queries, k)`` gallery rows from :func:`search` (``-1`` slots are skipped).
        gallery_labels: the individual of every gallery row.
        query_ids: the image id of every query row (unique).

    Returns:
        Long table ``image, individual_id, score`` (max similarity over that individual's neighbours), sorted
        by image, then descending score, then individual id (so ties are ordered the same on every run).
    """
    scores = np.asarray(scores)
    indices = np.asarray(indices)
    labels = np.asarray([str(x) for x in gallery_labels], dtype=object)
    ids = np.asarray([str(x) for x in query_ids], dtype=object)
    if scores.shape != indices.shape or scores.ndim != 2:
        raise ValueError(
            f"individual_scores: scores {scores.shape} and indices {indices.shape} must be equal 2-D"
        )
    if len(ids) != len(scores):
        raise ValueError(f"individual_scores: {len(ids)} query ids for {len(scores)} rows of neighbours")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("individual_scores: query ids are not unique")
    if indices.size and indices.max() >= len(labels):
        raise ValueError(f"individual_scores: neighbour index {indices.max()} but only {len(labels)} labels")
    valid = indices >= 0
    rows = np.broadcast_to(np.arange(len(ids))[:, None], indices.shape)[valid]
    table = pd.DataFrame(
        {
            "image": ids[rows],
            "individual_id": labels[indices[valid]],
            "score": scores[valid].astype(np.float64),
        }
    )
    table = table.groupby(["image", "individual_id"], sort=False, as_index=False)["score"].max()
    return _sort_table(table)


def _sorted_already(table: pd.DataFrame) -> bool:
    """Whether rows already run by image, then descending score, then individual id (one O(n) pass)."""
    if len(table) < 2:
        return True
    image = table["image"].to_numpy(dtype=object)
    ind = table["individual_id"].to_numpy(dtype=object)
    score = table["score"].to_numpy(dtype=np.float64)
    if np.isnan(score).any():
        return False
    try:
        same_image = image[1:] == image[:-1]
        same_score = same_image & (score[1:] == score[:-1])
        return bool(np.all((image[1:] > image[:-1]) | (same_image & (score[1:] < score[:-1]))
                           | (same_score & (ind[1:] > ind[:-1]))))
    except TypeError:  # mixed or missing ids: let pandas sort (and raise what it raises)
        return False


def _sort_table(table: pd.DataFrame) -> pd.DataFrame:
    if _sorted_already(table):  # every caller but individual_scores passes a sorted table: skip the n log n sort
        return table[TABLE_COLUMNS].reset_index(drop=True)
    return table.sort_values(
        ["image", "score", "individual_id"], ascending=[True, False, True], ignore_index=True
    )[TABLE_COLUMNS]


def _check_table(table: pd.DataFrame, where: str) -> None:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: table lacks column(s) {missing}; expected {TABLE_COLUMNS}")
    if table["score"].isna().any():
        row = int(np.flatnonzero(table["score"].isna().to_numpy())[0])
        raise ValueError(f"{where}: score is NaN at row {row} (image {table['image'].iloc[row]!r})")
    dup = table.duplicated(["image", "individual_id"])
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"{where}: (image, individual_id) repeated at row {row}: {table.iloc[row].tolist()}")


def average_scores(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean of several folds' :func:`individual_scores` tables per ``(image, individual_id)``.

    An individual that one fold did not retrieve for a query gets, for that fold, the lowest score that fold
    retrieved for that query. Why: the individual's best neighbour ranked below that fold's ``k``-th
    neighbour, and the lowest individual score is the best score of some retrieved neighbour, hence
    ``>=`` the ``k``-th neighbour's; so the fill is an upper bound of the unseen score. It is the tightest
    bound the table holds, and unlike a fill of 0 or -1 it does not sink an individual that one fold merely
    ranked just below its cut-off. (Concatenating the folds' embeddings, :func:`concat_embeddings`, avoids
    the fill altogether at the cost of one wider search.)

    Args:
        tables: one table per fold, each covering the same query images.

    Returns:
        Table ``image, individual_id, score`` sorted like :func:`individual_scores`.
    """
    if len(tables) == 0:
        raise ValueError("average_scores: no tables given")
    for i, t in enumerate(tables):
        _check_table(t, f"average_scores table {i}")
    images0 = set(tables[0]["image"])
    for i, t in enumerate(tables[1:], start=1):
        diff = images0.symmetric_difference(set(t["image"]))
        if diff:
            raise ValueError(
                f"average_scores: table {i} and table 0 cover different images ({len(diff)} differ, "
                f"e.g. {sorted(diff)[0]!r})"
            )
    pairs = pd.concat([t[["image", "individual_id"]] for t in tables]).drop_duplicates(ignore_index=True)
    filled = []
    for t in tables:
        merged = pairs.merge(t[TABLE_COLUMNS], on=["image", "individual_id"], how="left")
        floor = t.groupby("image")["score"].min()
        filled.append(merged["score"].fillna(merged["image"].map(floor)).to_numpy(np.float64))
    out = pairs.assign(score=np.mean(np.stack(filled), axis=0))
    return _sort_table(out)


def _top_candidates(table: pd.DataFrame, k: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """``image -> (individual ids, scores)``: each image's best ``k`` candidates, best first (ties by id)."""
    top = _sort_table(table[TABLE_COLUMNS])
    top = top[top.groupby("image", sort=False).cumcount() < k]
    image = top["image"].astype(str).to_numpy()
    ids = top["individual_id"].astype(str).tolist()
    score = top["score"].to_numpy(np.float64)
    # rows are grouped by image after the sort: split at the boundaries (a pandas groupby loop is ~50x slower)
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]]) if len(image) else np.empty(0, int)
    ends = np.r_[starts[1:], len(image)]
    return {image[a]: (ids[a:b], score[a:b]) for a, b in zip(starts, ends, strict=True)}


def _insert_new(
    candidates: list[str], scores: np.ndarray, threshold: float, k: int, new_label: str
) -> list[str]:
    """The ranking rule (see :func:`predict`); ``scores`` are sorted descending."""
    n_above = int((scores >= threshold).sum())
    ranked = candidates[:n_above] + [new_label] + candidates[n_above:]
    return ranked[:k]


def predict(
    table: pd.DataFrame,
    threshold: float,
    k: int = 5,
    new_label: str = NEW_LABEL,
    images: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rank individuals per image and insert ``new_label`` at the similarity threshold.

    Per image the candidates are sorted by descending score (ties by individual id). ``new_label`` is
    inserted just before the first candidate whose score is ``< threshold`` (so a score equal to the threshold
    stays above it); if no candidate is below the threshold it goes after the last candidate. The list is then
    cut to ``k``: with ``k`` or more candidates all above the threshold, ``new_label`` is cut off. The ids are
    always distinct, so an image with fewer than ``k - 1`` candidates gets fewer than ``k`` predictions
    (``new_label`` plus all its candidates) rather than repeated padding; Kaggle's MAP@5 accepts short rows.

    Args:
        table: ``image, individual_id, score`` (from :func:`individual_scores` or :func:`average_scores`).
        threshold: similarity below which "a new individual" ranks higher than the candidate.
        k: predictions per image.
        new_label: the "not in the gallery" label; it must not be a gallery individual.
        images: output rows, in this order (e.g. the sample submission's). Images without candidates predict
            ``new_label`` alone. Default: the table's images, sorted.

    Returns:
        ``image, predictions`` with space-separated ids.
    """
    _check_table(table, "predict")
    if k < 1:
        raise ValueError(f"predict: k must be >= 1, got {k}")
    if not np.isfinite(threshold):
        raise ValueError(f"predict: threshold must be finite, got {threshold}")
    if (table["individual_id"].astype(str) == new_label).any():
        raise ValueError(f"predict: {new_label!r} appears as a gallery individual_id; it is reserved")
    top = _top_candidates(table, k)
    if images is None:
        images = sorted(top)
    images = [str(i) for i in images]
    if len(set(images)) != len(images):
        raise ValueError("predict: `images` has repeated ids")
    extra = set(top) - set(images)
    if extra:
        raise ValueError(f"predict: {len(extra)} table images are not in `images`, e.g. {sorted(extra)[0]!r}")
    empty = ([], np.empty(0))
    rows = [" ".join(_insert_new(*top.get(image, empty), threshold, k, new_label)) for image in images]
    return pd.DataFrame({"image": images, "predictions": rows})


def known_ranking_map5(table: pd.DataFrame, truth: Mapping[str, str], new_label: str = NEW_LABEL, k: int = 5) -> float:
    """MAP@k of the known query images from the ranking alone: ``new_label`` is never ranked first (a threshold
    below every score), so the figure measures how well the embeddings find known individuals, apart from the
    ``new_individual`` threshold. A thresholded MAP@k on the same images is at most this.

    Args:
        table: ``image, individual_id, score`` of the queries (extra images are ignored).
        truth: image -> true individual; images whose truth is ``new_label`` are left out.
        new_label: the "not in the gallery" label.
        k: predictions per image.

    Returns:
        The MAP@k over the known images, or ``nan`` when there are none.
    """
    known = [str(i) for i, t in truth.items() if t != new_label]
    if not known:
        return float("nan")
    part = table[table["image"].astype(str).isin(set(known))]
    ranked = predict(part, NEVER_NEW, k=k, new_label=new_label, images=known)
    return map_at_k([truth[i] for i in known], ranked["predictions"].tolist(), k)


def tune_threshold(
    table: pd.DataFrame,
    truth: Mapping[str, str] | pd.Series,
    thresholds: Sequence[float],
    k: int = 5,
    new_label: str = NEW_LABEL,
) -> tuple[float, pd.DataFrame]:
    """Sweep the ``new_label`` threshold on out-of-fold scores and keep the best MAP@k.

    Scores every threshold exactly as ``map_at_k(truth, predict(table, threshold))`` would, but vectorised:
    with ``m`` candidates at or above the threshold, ``new_label`` sits at rank ``m + 1`` and a true
    candidate at position ``p`` (0-based) ranks ``p + 1`` if ``p < m`` else ``p + 2``.

    Args:
        table: out-of-fold ``image, individual_id, score`` table.
        truth: ``image -> true label``, already ``new_label`` for individuals absent from the gallery (see
            :func:`oof_truth`). Every image of the table needs one; truth images without candidates count too.
        thresholds: values to try.
        k: predictions per image.
        new_label: the "not in the gallery" label.

    Returns:
        ``(best, sweep)``. ``sweep`` has ``threshold, map5, map5_known, map5_new, new_share`` sorted by
        threshold, where ``new_share`` is the share of images whose first prediction is ``new_label``. On a
        tie the *lowest* threshold wins: it predicts ``new_label`` least often among equally good choices.
    """
    _check_table(table, "tune_threshold")
    truth = {str(a): str(b) for a, b in dict(truth).items()}
    if not truth:
        raise ValueError("tune_threshold: truth is empty")
    thr = np.asarray(sorted(float(t) for t in thresholds), dtype=np.float64)
    if thr.size == 0 or not np.isfinite(thr).all():
        raise ValueError(
            f"tune_threshold: thresholds must be a non-empty list of finite numbers, got {thresholds}"
        )
    top = _top_candidates(table, k)
    missing = set(top) - set(truth)
    if missing:
        raise ValueError(
            f"tune_threshold: {len(missing)} table images have no truth, e.g. {sorted(missing)[0]!r}"
        )
    images = list(truth)
    scores = np.full((len(images), k), -np.inf)
    pos = np.full(len(images), k)  # k = truth not among the top-k candidates
    for row, image in enumerate(images):
        cands, s = top.get(image, ([], np.empty(0)))
        scores[row, : len(s)] = s
        if truth[image] in cands:
            pos[row] = cands.index(truth[image])
    is_new = np.array([truth[i] == new_label for i in images])

    records = []
    for t in thr:
        m = (scores >= t).sum(axis=1)
        rank = np.where(is_new, m + 1, np.where(pos < m, pos + 1, pos + 2))
        rr = np.where(rank <= k, 1.0 / rank, 0.0)
        records.append(
            {
                "threshold": float(t),
                "map5": float(rr.mean()),
                "map5_known": float(rr[~is_new].mean()) if (~is_new).any() else np.nan,
                "map5_new": float(rr[is_new].mean()) if is_new.any() else np.nan,
                "new_share": float((m == 0).mean()),
            }
        )
    sweep = pd.DataFrame.from_records(records)
    best = float(sweep["threshold"].iloc[int(np.argmax(sweep["map5"].to_numpy()))])  # first max = lowest
    return best, sweep


def oof_truth(
    valid_labels: Sequence[str], gallery_labels: Sequence[str], new_label: str = NEW_LABEL
) -> list[str]:
    """Out-of-fold truth: a validation image's individual if the gallery holds it, else ``new_label``.

    Args:
        valid_labels: individual of each validation image.
        gallery_labels: individuals of the gallery (the other folds' train images).
        new_label: label for individuals the gallery does not hold.
    """
    known = {str(x) for x in gallery_labels}
    return [str(v) if str(v) in known else new_label for v in valid_labels]


def leave_one_out_map5(
    embeddings: np.ndarray,
    labels: Sequence[str],
    k: int = 5,
    n_neighbors: int = 100,
    drop_singletons: bool = True,
    use_gpu: bool | None = None,
) -> float:
    """MAP@k of every image querying all the others, ranking individuals by best neighbour (no ``new_label``).

    A quick embedding benchmark that needs no folds or threshold.

    Args:
        embeddings: ``(n, d)`` float32, L2-normalised.
        labels: individual of each row.
        k: predictions per image.
        n_neighbors: image neighbours retrieved per query (enough to usually name ``k`` individuals).
        drop_singletons: skip images whose individual has no other image: no ranking can name them, so they
            only add zeros.
        use_gpu: passed to :func:`search`.
    """
    labels = [str(x) for x in labels]
    if len(labels) != len(embeddings):
        raise ValueError(f"leave_one_out_map5: {len(labels)} labels for {len(embeddings)} embeddings")
    scores, indices = search(embeddings, embeddings, max(n_neighbors, k), use_gpu=use_gpu, exclude_self=True)
    ids = [str(i) for i in range(len(labels))]
    top = _top_candidates(individual_scores(scores, indices, labels, ids), k)
    counts = pd.Series(labels).value_counts()
    rows = [i for i in range(len(labels)) if not (drop_singletons and counts[labels[i]] < 2)]
    if not rows:
        raise ValueError("leave_one_out_map5: no image has another image of its individual")
    return map_at_k([labels[i] for i in rows], [top.get(ids[i], ([], None))[0] for i in rows], k=k)
