"""Approximate nearest-neighbour search for large galleries (1M+ embeddings) with a FAISS inverted-file index.

:func:`common.lib.retrieval.search` is exact: every query is compared with every gallery row, which costs
``n_queries * n_gallery * d`` multiply-adds and is fine up to a few hundred thousand rows. Above that this
module builds an IVF-Flat index (https://github.com/facebookresearch/faiss/wiki/Faiss-indexes, Jégou et al.,
"Product quantization for nearest neighbor search", TPAMI 2011, https://doi.org/10.1109/TPAMI.2010.57): k-means
splits the gallery into ``nlist`` cells and a query scans only the ``nprobe`` cells whose centroids are
closest, with exact inner products inside them.

Why IVF-Flat rather than HNSW (Malkov & Yashunin, https://arxiv.org/abs/1603.09320): on the small CPUs these
notebooks run on, HNSW's graph build over 1M x 512-d vectors takes tens of minutes and adds ``~2 * M * 4``
bytes of links per vector, while IVF-Flat trains k-means on a sample in about a minute, stores the vectors
once (plus an 8-byte id each) and exposes a single recall/speed knob, ``nprobe``, that can be changed at query
time without rebuilding. ``nprobe == nlist`` scans every cell, so it returns exactly the flat search.

Inputs follow :func:`common.lib.retrieval.search`: float32, L2-normalised rows, inner product = cosine similarity.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

FLAT_BELOW = 200_000
"""Galleries with fewer rows than this use the exact flat index (:func:`choose_index`)."""
DEFAULT_NPROBE_SHARE = 1 / 32
"""Default ``nprobe`` as a share of ``nlist`` (see :func:`default_nprobe`): 125 of 4000 cells for 1M rows; in
``bench/ann_speed.py`` nprobe 128 of 4000 gave recall@5 1.000 and 64 gave 0.961 on 1M clustered rows."""
IVF_MIN_QUERIES = 10_000
"""With fewer queries than this the exact search is kept (:func:`choose_index`): on 1M rows the IVF build took
146 s and saved 1/58 - 1/282 s per query (``bench/ann_speed.py``), so it pays off from about 10,700 queries."""
KINDS = ("flat", "ivf")


def _check_matrix(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array, or a clear error (non-finite values named by row/column)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{where}: {name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{where}: {name} must be 2-D (n, d), got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{where}: {name} has 0 columns")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise TypeError(f"{where}: {name} has dtype {x.dtype}, expected a real float array")
    x = np.ascontiguousarray(x, dtype=np.float32)  # float64 etc. converted, float32 kept without a copy
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{where}: {name} row {row} column {col} is {x[row, col]} (NaN/inf embeddings)")
    return x


def default_nlist(n_gallery: int) -> int:
    """``round(4 * sqrt(n))`` cells (the faiss wiki's ``4*sqrt(N)`` to ``16*sqrt(N)`` rule, low end), at least 1
    and at most ``n / 39`` so k-means has the 39 training points per centroid faiss asks for.

    Args:
        n_gallery: rows in the gallery.
    """
    return int(max(1, min(round(4 * math.sqrt(n_gallery)), n_gallery // 39)))


def default_nprobe(nlist: int) -> int:
    """``ceil(nlist * DEFAULT_NPROBE_SHARE)`` cells scanned per query, at least 1 and at most ``nlist``.

    Args:
        nlist: cells in the IVF index.
    """
    return int(min(nlist, max(1, math.ceil(nlist * DEFAULT_NPROBE_SHARE))))


def choose_index(n_gallery: int, dim: int, n_queries: int | None = None) -> str:
    """The index kind for a search: ``"flat"`` (exact) below :data:`FLAT_BELOW` gallery rows or, when the number
    of queries is known, below :data:`IVF_MIN_QUERIES` queries; else ``"ivf"``.

    Below ~200k rows exact search of a few thousand queries takes seconds on a CPU and k-means training
    would cost more than it saves; above it the scan grows linearly while IVF's grows like ``sqrt(n)``. The
    index is built for one search, so its build must also be paid back by enough queries.

    Args:
        n_gallery: rows in the gallery.
        dim: embedding size (checked to be positive; the rule does not depend on it).
        n_queries: queries that will be searched with this index (``None``: not known, not considered).
    """
    if n_gallery < 1:
        raise ValueError(f"choose_index: n_gallery must be >= 1, got {n_gallery}")
    if dim < 1:
        raise ValueError(f"choose_index: dim must be >= 1, got {dim}")
    if n_gallery < FLAT_BELOW or (n_queries is not None and n_queries < IVF_MIN_QUERIES):
        return "flat"
    return "ivf"


def build_index(
    gallery: np.ndarray,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    train_per_list: int = 50,
    niter: int = 10,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """Build a flat or IVF-Flat inner-product index over ``gallery``.

    Args:
        gallery: ``(n, d)`` L2-normalised rows; converted to float32 if needed.
        kind: ``"auto"`` (:func:`choose_index`), ``"flat"`` or ``"ivf"``.
        nlist: IVF cells; ``None`` = :func:`default_nlist`. Must be ``<= n``.
        nprobe: cells scanned per query, stored on the index; ``None`` = :func:`default_nprobe`.
        seed: seeds the k-means training sample and initialisation (same seed, same index).
        train_per_list: k-means trains on ``min(n, train_per_list * nlist)`` random rows.
        niter: k-means iterations.
        use_gpu: ``None`` copies the index to all GPUs when ``faiss.get_num_gpus() > 0`` (faiss-gpu), ``False``
            never does, ``True`` requires a GPU.

    Returns:
        A faiss index holding every gallery row under its row number.
    """
    gallery = _check_matrix(gallery, "gallery", "build_index")
    n, d = gallery.shape
    if n == 0:
        raise ValueError("build_index: the gallery is empty")
    if kind == "auto":
        kind = choose_index(n, d)
    if kind not in KINDS:
        raise ValueError(f"build_index: kind must be 'auto' or one of {KINDS}, got {kind!r}")
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and n_gpus == 0:
        raise RuntimeError("build_index(use_gpu=True): faiss sees no GPU (faiss-cpu, or no CUDA device)")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(gallery)
    else:
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise ValueError(f"build_index: nlist must be in [1, {n}] (gallery rows), got {nlist}")
        nprobe = default_nprobe(nlist) if nprobe is None else int(nprobe)
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"build_index: nprobe must be in [1, nlist={nlist}], got {nprobe}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = int(niter)
        index.cp.seed = int(seed)
        index.cp.max_points_per_centroid = max(int(train_per_list), 1)  # the sample below is the whole set
        n_train = min(n, max(int(train_per_list), 1) * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        index.train(gallery[rows] if n_train < n else gallery)
        index.add(gallery)
        index.nprobe = nprobe  # faiss' Python wrapper keeps `quantizer` alive as long as `index`
    if n_gpus > 0 and use_gpu is not False:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def ann_search(
    index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search in an index from :func:`build_index`, same contract as ``retrieval.search``.

    Args:
        index: from :func:`build_index`.
        queries: ``(n_queries, d)`` L2-normalised rows; converted to float32 if needed.
        k: neighbours per query; clipped to the index size.
        nprobe: IVF cells to scan for this call (the index keeps its own value afterwards); ignored for flat.

    Returns:
        ``(scores, indices)``, both ``(n_queries, k_eff)``, best first; ``indices`` are gallery rows (int64). An
        IVF search whose probed cells hold fewer than ``k`` rows leaves slots with index ``-1`` and score ``-inf``.
    """
    queries = _check_matrix(queries, "queries", "ann_search")
    if queries.shape[1] != index.d:
        raise ValueError(f"ann_search: index has {index.d} dims but queries have {queries.shape[1]}")
    if index.ntotal == 0:
        raise ValueError("ann_search: the index is empty")
    if k < 1:
        raise ValueError(f"ann_search: k must be >= 1, got {k}")
    k_eff = min(int(k), int(index.ntotal))
    ivf = _ivf_of(index)
    before = None
    if nprobe is not None and ivf is not None:
        if not 1 <= nprobe <= ivf.nlist:
            raise ValueError(f"ann_search: nprobe must be in [1, nlist={ivf.nlist}], got {nprobe}")
        before, ivf.nprobe = ivf.nprobe, int(nprobe)
    try:
        scores, indices = index.search(queries, k_eff)
    finally:
        if before is not None:
            ivf.nprobe = before
    indices = indices.astype(np.int64, copy=False)
    scores = np.where(indices < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, indices


def recall_at_k(exact_idx: np.ndarray, approx_idx: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-``k`` rows that the approximate top-``k`` also returns.

    Order inside the top ``k`` does not matter; ``-1`` (unfilled) slots never count as found.

    Args:
        exact_idx: ``(n_queries, >= k)`` gallery rows from exact search, best first.
        approx_idx: ``(n_queries, >= k)`` gallery rows from the approximate index, best first.
        k: how many leading columns to compare.
    """
    exact_idx, approx_idx = np.asarray(exact_idx), np.asarray(approx_idx)
    for name, a in (("exact_idx", exact_idx), ("approx_idx", approx_idx)):
        if a.ndim != 2:
            raise ValueError(f"recall_at_k: {name} must be 2-D (n_queries, k), got shape {a.shape}")
        if a.shape[1] < k:
            raise ValueError(f"recall_at_k: {name} has {a.shape[1]} columns, fewer than k={k}")
    if len(exact_idx) != len(approx_idx):
        raise ValueError(f"recall_at_k: {len(exact_idx)} exact rows but {len(approx_idx)} approximate rows")
    if k < 1 or len(exact_idx) == 0:
        raise ValueError(f"recall_at_k: need k >= 1 and at least one query, got k={k}, {len(exact_idx)} rows")
    e, a = exact_idx[:, :k], approx_idx[:, :k]
    hit = (e[:, :, None] == a[:, None, :]) & (e[:, :, None] >= 0)
    return float(hit.any(axis=2).sum() / e.size)


def calibrate_nprobe(
    index: faiss.Index,
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    target: float = 0.99,
    sample: int = 256,
    seed: int = 0,
) -> tuple[int, float]:
    """Raise an IVF index's ``nprobe`` (doubling) until recall@k against exact search on a sample of the queries
    reaches ``target``, or every cell is scanned; the index keeps the value found.

    How well IVF does depends on the data: on clustered embeddings the default ``nprobe`` reaches recall@5 1.000
    (``bench/ann_speed.py``), on structureless vectors it finds almost nothing. Checking on the queries at hand
    costs one brute-force search of ``sample`` queries and a few IVF searches of them.

    Args:
        index: an IVF index from :func:`build_index` (a flat index is returned as is, recall 1).
        gallery: the rows the index holds, in index order.
        queries: the queries about to be searched (a sample of them is used).
        k: the neighbours that will be asked for.
        target: recall@k to reach.
        sample: queries checked.
        seed: which queries are sampled.

    Returns:
        ``(nprobe, recall)`` on the sample.
    """
    ivf = _ivf_of(index)
    if ivf is None:
        return 0, 1.0
    gallery = _check_matrix(gallery, "gallery", "calibrate_nprobe")
    queries = _check_matrix(queries, "queries", "calibrate_nprobe")
    k = min(int(k), len(gallery))
    rows = np.random.default_rng(seed).choice(len(queries), size=min(sample, len(queries)), replace=False)
    q = queries[np.sort(rows)]
    # Exact top-k by brute force, without a (sample x gallery) matrix sorted in full or a copy of the gallery.
    _, exact = faiss.knn(q, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
    nprobe = int(ivf.nprobe)
    while True:
        _, approx = ann_search(index, q, k, nprobe=nprobe)
        recall = recall_at_k(exact, approx, k)
        if recall >= target or nprobe >= ivf.nlist:
            break
        nprobe = min(int(ivf.nlist), 2 * nprobe)
    ivf.nprobe = nprobe
    return nprobe, recall


def _ivf_of(index: faiss.Index):
    """The object carrying ``nlist``/``nprobe`` (CPU IVF or single-GPU IVF index), else ``None``."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return index if hasattr(index, "nprobe") and hasattr(index, "nlist") else None


def index_bytes(index: faiss.Index) -> int:
    """Bytes the index holds in memory: vectors, ids and (for IVF) the centroids; headers are ignored.

    Args:
        index: a CPU index from :func:`build_index`.
    """
    ivf = _ivf_of(index)
    if ivf is None:
        return int(index.ntotal) * int(index.d) * 4
    lists = ivf.invlists
    id_size = np.dtype(np.int64).itemsize
    stored = sum(int(lists.list_size(i)) for i in range(ivf.nlist)) * (int(lists.code_size) + id_size)
    return stored + index_bytes(ivf.quantizer)
