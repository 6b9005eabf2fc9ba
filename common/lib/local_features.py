"""Local-feature re-ranking: SIFT keypoints matched between a query and its nearest global neighbours.

Global embeddings (GeM + ArcFace) find *similar-looking* animals; on few images per individual they often fail to
tell two nyala or two lions apart, while the coat pattern, scars and whisker spots that identify an individual are
local. Wildlife re-identification has long matched local descriptors for this (HotSpotter, Crall et al., WACV 2013,
https://doi.org/10.1109/WACV.2013.6475023), and wildlife-tools fuses such local matching with global similarity
(WildFusion, Cermak et al., 2024, https://arxiv.org/abs/2408.12934). Here the number of descriptor matches that
pass Lowe's ratio test (Lowe, IJCV 2004) between two images becomes a similarity in ``[0, 1)``:

    local = matches / (matches + half)

and the fused similarity of a query and a gallery image is ``(cosine + weight * local) / (1 + weight)``, still at
most 1, so the ``new_individual`` threshold sweep keeps its range. Descriptors are RootSIFT (Arandjelovic &
Zisserman, CVPR 2012): L1-normalised, square-rooted SIFT, matched with the L2 distance.

Only the ``top`` global neighbours of each query are matched (matching is ~1 ms per pair on a CPU core), so the cost
is queries x top pairs, linear in the number of queries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

DESCRIPTOR_DIM = 128


def sift_descriptors(image: np.ndarray, side: int = 512, n_features: int = 1500) -> np.ndarray:
    """SIFT descriptors of one image, resized so that its longer side is ``side`` (up or down).

    Small crops gain keypoints from the upscaling (lion crops of ~130 px give ~150 keypoints as they are).

    Args:
        image: ``(H, W)`` grey or ``(H, W, 3)`` RGB ``uint8`` array.
        side: the longer side, in pixels, at which keypoints are detected.
        n_features: at most this many keypoints (the strongest), as OpenCV's ``nfeatures``.

    Returns:
        ``(m, 128)`` ``uint8`` descriptors, ``m <= n_features`` (``m`` may be 0 on a blank image).
    """
    if side < 16 or n_features < 1:
        raise ValueError(f"side must be >= 16 and n_features >= 1, got side={side}, n_features={n_features}")
    image = np.asarray(image)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    if grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {grey.dtype}")
    scale = side / max(grey.shape)
    if scale != 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    _, desc = cv2.SIFT_create(nfeatures=n_features).detectAndCompute(grey, None)
    if desc is None:
        return np.zeros((0, DESCRIPTOR_DIM), np.uint8)
    # OpenCV's SIFT descriptors are floats already clipped to 0..255: uint8 loses nothing that matters and a
    # quarter of the storage.
    return np.clip(np.rint(desc[:n_features]), 0, 255).astype(np.uint8)


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT: L1-normalise each descriptor, then take the element-wise square root (float32)."""
    d = np.asarray(desc, np.float32)
    return np.sqrt(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7))


def count_matches(a: np.ndarray, b: np.ndarray, ratio: float = 0.8) -> int:
    """Descriptors of ``a`` whose nearest neighbour in ``b`` passes Lowe's ratio test.

    Args:
        a: ``(m, 128)`` RootSIFT descriptors (float32) of one image.
        b: ``(n, 128)`` RootSIFT descriptors of the other.
        ratio: a match counts when its distance is below ``ratio`` x the second-nearest distance.

    Returns:
        The number of matches (0 when either image has fewer than 2 descriptors).
    """
    if len(a) < 1 or len(b) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a, b, k=2)
    return sum(1 for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance)


def local_similarity(matches: np.ndarray, half: float) -> np.ndarray:
    """``matches / (matches + half)``: 0 for no match, 0.5 at ``half`` matches, towards 1 beyond."""
    if half <= 0:
        raise ValueError(f"half must be > 0, got {half}")
    m = np.asarray(matches, np.float64)
    return (m / (m + half)).astype(np.float32)


def fuse(global_scores: np.ndarray, matches: np.ndarray, weight: float, half: float) -> np.ndarray:
    """``(global + weight * local_similarity(matches)) / (1 + weight)``, element-wise.

    Args:
        global_scores: cosine similarities.
        matches: match counts, the same shape.
        weight: the local term's weight (0: the global scores unchanged).
        half: see :func:`local_similarity`.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    g = np.asarray(global_scores, np.float32)
    return ((g + weight * local_similarity(matches, half)) / (1.0 + weight)).astype(np.float32)


def rerank(scores: np.ndarray, idx: np.ndarray, matches: np.ndarray, weight: float, half: float,
           top: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each query's first ``top`` neighbours, fuse their scores with the match counts, sort again.

    Args:
        scores: ``(q, k)`` global similarities, best first (as :func:`common.lib.retrieval.search` returns).
        idx: ``(q, k)`` gallery rows (-1 for a missing neighbour).
        matches: ``(q, min(k, top))`` match counts of those pairs.
        weight: see :func:`fuse`.
        half: see :func:`local_similarity`.
        top: neighbours kept and re-scored per query.

    Returns:
        ``(scores, idx)`` of shape ``(q, min(k, top))``, best fused score first; missing neighbours stay last.
    """
    top = min(top, scores.shape[1])
    s, i = scores[:, :top], idx[:, :top]
    if matches.shape != s.shape:
        raise ValueError(f"matches has shape {matches.shape}, expected {s.shape}")
    fused = np.where(i >= 0, fuse(s, matches, weight, half), -np.inf).astype(np.float32)
    order = np.argsort(-fused, axis=1, kind="stable")
    return np.take_along_axis(fused, order, 1), np.take_along_axis(i, order, 1)


class PairMatcher:
    """Match counts between images by id, each pair matched once (the counts are symmetric enough to share:
    the pair is always matched with the lexicographically smaller id as the query).

    Memory stays bounded whatever the number of images: descriptors are fetched when a pair needs them (the
    stored files are memory-mapped, :mod:`common.stages.local_rerank`) and only the ``cache_images`` most
    recently used RootSIFT arrays are kept (float32, ~0.8 MB each at 1,500 keypoints). Pairs are matched in
    sorted order, so one query's neighbours reuse its array (two threads may both convert an image that is not
    cached yet: the same array, computed twice).

    Args:
        descriptors: a function from an image id to its ``uint8`` SIFT descriptors.
        ratio: Lowe's ratio (see :func:`count_matches`).
        threads: matching threads (OpenCV releases the GIL while it matches).
        cache_images: RootSIFT arrays kept (least recently used dropped first).
    """

    def __init__(self, descriptors: Callable[[str], np.ndarray], ratio: float = 0.8, threads: int = 1,
                 cache_images: int = 256):
        self._descriptors = descriptors
        self._get = functools.lru_cache(maxsize=max(2, int(cache_images)))(self._root_sift)
        self.ratio = ratio
        self.threads = max(1, int(threads))
        self.cache: dict[tuple[str, str], int] = {}

    def _root_sift(self, image: str) -> np.ndarray:
        return root_sift(np.asarray(self._descriptors(image)))

    def _key(self, a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def _count(self, key: tuple[str, str]) -> int:
        return count_matches(self._get(key[0]), self._get(key[1]), self.ratio)

    def count_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Match every pair not matched yet (in ``threads`` threads)."""
        todo = sorted({self._key(a, b) for a, b in pairs} - self.cache.keys())
        if self.threads == 1:
            counts = [self._count(k) for k in todo]
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                counts = list(pool.map(self._count, todo, chunksize=64))
        self.cache.update(zip(todo, counts, strict=True))

    def matches(self, queries: Sequence[str], gallery: Sequence[str], idx: np.ndarray) -> np.ndarray:
        """Match counts of each query with its neighbours ``gallery[idx[q, j]]`` (0 where ``idx`` is -1).

        Args:
            queries: ``q`` query image ids.
            gallery: the gallery image ids that ``idx`` indexes.
            idx: ``(q, t)`` gallery rows.
        """
        gallery = np.asarray(gallery, dtype=object)
        pairs = [(str(q), str(gallery[j])) for q, row in zip(queries, idx, strict=True) for j in row if j >= 0]
        self.count_pairs(pairs)
        out = np.zeros(idx.shape, np.int32)
        for r, (q, row) in enumerate(zip(queries, idx, strict=True)):
            for c, j in enumerate(row):
                if j >= 0:
                    out[r, c] = self.cache[self._key(str(q), str(gallery[j]))]
        return out
