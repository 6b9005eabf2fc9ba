"""Approximate search (common.lib.ann): recall on hand-made neighbours, IVF vs exact search, rules and errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from common.lib import ann
from common.lib.retrieval import l2_normalize, search


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.standard_normal((3000, 16)))
    queries = l2_normalize(rng.standard_normal((50, 16)))
    return gallery, queries


def test_recall_at_k_hand_made():
    exact = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    approx = np.array(
        [
            [3, 2, 1],  # same set, other order: 3/3
            [4, 0, -1],  # one found, one wrong, one unfilled slot: 1/3
            [9, 8, 0],  # 2/3 (order ignored)
        ]
    )
    assert ann.recall_at_k(exact, approx, 3) == pytest.approx(6 / 9)
    # k=1 compares first columns only: 1 vs 3 no, 4 vs 4 yes, 7 vs 9 no
    assert ann.recall_at_k(exact, approx, 1) == pytest.approx(1 / 3)
    # -1 in the exact result is never a hit, even against -1
    assert ann.recall_at_k(np.array([[-1, 1]]), np.array([[-1, 1]]), 2) == pytest.approx(0.5)


def test_ivf_full_probe_equals_exact(data):
    gallery, queries = data
    index = ann.build_index(gallery, kind="ivf", nlist=20, nprobe=20, use_gpu=False)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == 20 and index.nprobe == 20
    s_ivf, i_ivf = ann.ann_search(index, queries, 7)
    s_ref, i_ref = search(gallery, queries, 7, use_gpu=False)
    np.testing.assert_array_equal(i_ivf, i_ref)
    np.testing.assert_allclose(s_ivf, s_ref, atol=1e-6)
    # brute force in float64 as an independent reference for the top-1
    np.testing.assert_array_equal(i_ivf[:, 0], np.argmax(queries.astype(np.float64) @ gallery.T, axis=1))
    assert i_ivf.dtype == np.int64 and s_ivf.dtype == np.float32


def test_nprobe_override_lowers_recall_and_restores(data):
    gallery, queries = data
    index = ann.build_index(gallery, kind="ivf", nlist=20, nprobe=20, use_gpu=False)
    exact = search(gallery, queries, 5, use_gpu=False)[1]
    low = ann.recall_at_k(exact, ann.ann_search(index, queries, 5, nprobe=1)[1], 5)
    assert low < 0.9  # one cell of 20 misses neighbours of random data
    assert index.nprobe == 20  # the override did not stick
    assert ann.recall_at_k(exact, ann.ann_search(index, queries, 5)[1], 5) == 1.0


def test_same_seed_same_index(data):
    gallery, queries = data
    a = ann.ann_search(ann.build_index(gallery, kind="ivf", nlist=20, nprobe=2, seed=3), queries, 5)[1]
    b = ann.ann_search(ann.build_index(gallery, kind="ivf", nlist=20, nprobe=2, seed=3), queries, 5)[1]
    np.testing.assert_array_equal(a, b)


def test_flat_and_auto(data):
    gallery, queries = data
    index = ann.build_index(gallery)  # 3000 rows < FLAT_BELOW -> exact
    assert isinstance(index, faiss.IndexFlatIP)
    np.testing.assert_array_equal(ann.ann_search(index, queries, 5)[1], search(gallery, queries, 5)[1])
    # k is clipped to the gallery size
    assert ann.ann_search(ann.build_index(gallery[:3]), queries, 10)[1].shape == (50, 3)


def test_float64_converted(data):
    gallery, queries = data
    index = ann.build_index(gallery.astype(np.float64), kind="flat")
    idx64 = ann.ann_search(index, queries.astype(np.float64), 5)[1]
    np.testing.assert_array_equal(idx64, search(gallery, queries, 5)[1])


def test_choose_index_and_defaults():
    assert ann.choose_index(ann.FLAT_BELOW - 1, 512) == "flat"
    assert ann.choose_index(ann.FLAT_BELOW, 512) == "ivf"
    assert ann.choose_index(1_000_000, 512) == "ivf"
    assert ann.choose_index(1_000_000, 512, n_queries=ann.IVF_MIN_QUERIES - 1) == "flat"  # build not paid back
    assert ann.choose_index(1_000_000, 512, n_queries=ann.IVF_MIN_QUERIES) == "ivf"
    assert ann.default_nlist(1_000_000) == 4000  # 4 * sqrt(1e6)
    assert ann.default_nlist(100) == 2  # capped at 100 // 39 rows per centroid
    assert ann.default_nlist(10) == 1
    assert ann.default_nprobe(4000) == int(np.ceil(4000 * ann.DEFAULT_NPROBE_SHARE))
    assert ann.default_nprobe(1) == 1
    with pytest.raises(ValueError, match="n_gallery must be >= 1"):
        ann.choose_index(0, 512)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        ann.choose_index(10, 0)


def test_index_bytes_matches_serialized(data):
    gallery, _ = data
    for index in (ann.build_index(gallery, kind="flat"), ann.build_index(gallery, kind="ivf", nlist=20)):
        serialized = faiss.serialize_index(index).nbytes
        assert 0 <= serialized - ann.index_bytes(index) < 2048  # only headers differ
    # ivf: 3000 x (16 floats + one int64 id) + 20 centroids x 16 floats
    assert ann.index_bytes(ann.build_index(gallery, kind="ivf", nlist=20)) == 3000 * (64 + 8) + 20 * 64


def test_errors(data):
    gallery, queries = data
    index = ann.build_index(gallery, kind="flat")
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        ann.build_index(gallery[0])
    with pytest.raises(TypeError, match="gallery must be a numpy array"):
        ann.build_index(gallery.tolist())
    with pytest.raises(ValueError, match="the gallery is empty"):
        ann.build_index(np.empty((0, 16), np.float32))
    with pytest.raises(ValueError, match="kind must be"):
        ann.build_index(gallery, kind="hnsw")
    with pytest.raises(ValueError, match="nlist must be in"):
        ann.build_index(gallery, kind="ivf", nlist=5000)
    with pytest.raises(ValueError, match="nprobe must be in"):
        ann.build_index(gallery, kind="ivf", nlist=10, nprobe=11)
    bad = gallery.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="gallery row 7 column 3 is nan"):
        ann.build_index(bad)
    with pytest.raises(ValueError, match="index has 16 dims but queries have 8"):
        ann.ann_search(index, queries[:, :8], 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ann.ann_search(index, queries, 0)
    with pytest.raises(TypeError, match="dtype <U1"):
        ann.ann_search(index, np.array([["a"] * 16]), 5)
    with pytest.raises(ValueError, match="3 exact rows but 2 approximate rows"):
        ann.recall_at_k(np.zeros((3, 5)), np.zeros((2, 5)), 5)
    with pytest.raises(ValueError, match="fewer than k=5"):
        ann.recall_at_k(np.zeros((3, 5)), np.zeros((3, 4)), 5)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="faiss sees no GPU"):
            ann.build_index(gallery, use_gpu=True)


def test_calibrate_nprobe_raises_nprobe_until_the_sampled_recall_is_reached():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(3000, 8)).astype(np.float32)  # no cluster structure: IVF at nprobe 1 misses a lot
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(3000, 300, replace=False)] + 0.05 * rng.normal(size=(300, 8)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    index = ann.build_index(gallery, kind="ivf", nlist=64, nprobe=1, use_gpu=False)
    exact = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :5]
    before = ann.recall_at_k(exact, ann.ann_search(index, queries, 5)[1], 5)
    nprobe, recall = ann.calibrate_nprobe(index, gallery, queries, 5, target=0.99, sample=100)
    assert before < 0.9 and nprobe in (2, 4, 8, 16, 32, 64) and recall >= 0.99  # doubled from 1
    assert index.nprobe == nprobe  # kept on the index
    assert ann.recall_at_k(exact, ann.ann_search(index, queries, 5)[1], 5) >= 0.97  # holds beyond the sample
    flat = ann.build_index(gallery, kind="flat", use_gpu=False)
    assert ann.calibrate_nprobe(flat, gallery, queries, 5) == (0, 1.0)
