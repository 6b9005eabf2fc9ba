"""Retrieval: search vs brute force and scikit-learn, the individual/threshold rules on hand-made tables, plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from common.lib import ann, plots, retrieval
from common.lib.metrics import map_at_k
from common.lib.retrieval import (
    average_scores,
    concat_embeddings,
    individual_scores,
    known_ranking_map5,
    l2_normalize,
    leave_one_out_map5,
    oof_truth,
    predict,
    search,
    tune_threshold,
)

NEW = "new_individual"


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image", "individual_id", "score"])


def preds_of(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(df["image"], df["predictions"], strict=True))


# ---------------------------------------------------------------- search


def test_l2_normalize():
    x = np.array([[3, 4], [0, 0]], dtype=np.float64)  # row 0 -> (0.6, 0.8); all-zero row stays zero
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]], atol=1e-7)


def test_search_hand_case_and_k_clipping():
    gallery = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    query = np.array([[0.8, 0.6]], np.float32)  # dots: g0 0.8, g1 0.6, g2 0.96
    scores, idx = search(gallery, query, k=10)  # k clipped to the 3 gallery rows
    assert idx.shape == (1, 3)
    np.testing.assert_array_equal(idx, [[2, 0, 1]])
    np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], atol=1e-6)


def test_search_matches_numpy_and_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.normal(size=(300, 16)))
    queries = l2_normalize(rng.normal(size=(50, 16)))
    scores, idx = search(gallery, queries, k=7)
    sim = queries @ gallery.T
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, ref, axis=1), atol=1e-5)
    nn = NearestNeighbors(n_neighbors=7, metric="cosine", algorithm="brute").fit(gallery)
    dist, sk_idx = nn.kneighbors(queries)
    np.testing.assert_array_equal(idx, sk_idx)
    np.testing.assert_allclose(scores, 1 - dist, atol=1e-5)


def test_search_exclude_self():
    g = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    scores, idx = search(g, g, k=2, exclude_self=True)
    # row 0 (1,0): g2 0.6, g1 0 | row 1 (0,1): g2 0.8, g0 0 | row 2: g1 0.8, g0 0.6
    np.testing.assert_array_equal(idx, [[2, 1], [2, 0], [1, 0]])
    np.testing.assert_allclose(scores, [[0.6, 0], [0.8, 0], [0.8, 0.6]], atol=1e-6)
    # k=5 is clipped to n-1 = 2
    assert search(g, g, k=5, exclude_self=True)[1].shape == (3, 2)
    # exact duplicates: rows 0 and 1 tie at 1.0 whatever order faiss returns; neither may return itself
    d = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    _, idx = search(d, d, k=1, exclude_self=True)
    np.testing.assert_array_equal(idx[:2, 0], [1, 0])
    # five identical rows, k=2: faiss' top 3 of the last rows can miss the row itself (all tie at 1.0);
    # the worst is then dropped, so every row still has 2 neighbours and never itself
    five = np.ones((5, 2), np.float32) / np.sqrt(np.float32(2))
    scores, idx = search(five, five, k=2, exclude_self=True)
    assert idx.shape == (5, 2) and not (idx == np.arange(5)[:, None]).any()
    np.testing.assert_allclose(scores, 1, atol=1e-6)
    # a single image has no other image: zero neighbours
    assert search(d[:1], d[:1], k=3, exclude_self=True)[1].shape == (1, 0)
    with pytest.raises(ValueError, match="must be the gallery"):
        search(g, g[::-1].copy(), k=1, exclude_self=True)


def test_search_rejects_bad_input():
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(TypeError, match="gallery is float64"):
        search(g.astype(np.float64), g, k=1)
    bad = g.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="queries row 1 column 2 is nan"):
        search(g, bad, k=1)
    with pytest.raises(ValueError, match="3 dims but queries have 2"):
        search(g, g[:, :2].copy(), k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        search(g, g, k=0)


def test_search_gpu_branch(monkeypatch):
    calls = []
    monkeypatch.setattr(retrieval.faiss, "StandardGpuResources", lambda: "res", raising=False)
    monkeypatch.setattr(
        retrieval.faiss,
        "index_cpu_to_gpu",
        lambda res, dev, idx: calls.append((res, dev)) or idx,
        raising=False,
    )
    g = np.eye(3, dtype=np.float32)
    monkeypatch.setattr(retrieval.faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="no GPU"):
        search(g, g, k=1, use_gpu=True)
    search(g, g, k=1)  # auto, no GPU: CPU index
    assert calls == []
    monkeypatch.setattr(retrieval.faiss, "get_num_gpus", lambda: 1)
    search(g, g, k=1, use_gpu=False)  # forced CPU
    assert calls == []
    _, idx = search(g, g, k=1)  # auto with a GPU: moved to device 0
    assert calls == [("res", 0)]
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])


# ---------------------------------------------------------------- tables


def test_individual_scores_takes_the_max_per_individual():
    labels = ["A", "B", "A", "C"]  # gallery rows 0..3
    scores = np.array([[0.5, 0.4, -np.inf], [0.9, 0.8, 0.7]], np.float32)
    indices = np.array([[3, 0, -1], [2, 1, 0]])
    out = individual_scores(scores, indices, labels, ["q1", "q0"])
    expected = table(
        [
            ("q0", "A", 0.9),  # q0: rows 2 (A .9), 1 (B .8), 0 (A .7) -> A = max(.9, .7)
            ("q0", "B", 0.8),
            ("q1", "C", 0.5),  # q1: rows 3 (C .5), 0 (A .4); the -1 slot is skipped
            ("q1", "A", 0.4),
        ]
    )
    pd.testing.assert_frame_equal(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="2 query ids for 1 rows"):
        individual_scores(scores[:1], indices[:1], labels, ["a", "b"])


def test_average_scores_fills_missing_with_the_fold_floor():
    fold1 = table([("q", "A", 0.9), ("q", "B", 0.5), ("r", "A", 0.3)])
    fold2 = table([("q", "A", 0.8), ("q", "C", 0.6), ("r", "B", 0.2), ("r", "D", 0.1)])
    out = average_scores([fold1, fold2])
    expected = table(
        [
            ("q", "A", 0.85),  # (.9 + .8) / 2
            ("q", "B", 0.55),  # fold2 lacks B for q: its floor for q is .6 -> (.5 + .6) / 2
            ("q", "C", 0.55),  # fold1 lacks C for q: its floor for q is .5 -> (.5 + .6) / 2; tie -> by id
            ("r", "B", 0.25),  # fold1's floor for r is .3 -> (.3 + .2) / 2
            ("r", "A", 0.2),  # fold2's floor for r is .1 -> (.3 + .1) / 2
            ("r", "D", 0.2),  # (.3 + .1) / 2
        ]
    )
    pd.testing.assert_frame_equal(out, expected)
    with pytest.raises(ValueError, match="cover different images"):
        average_scores([fold1, fold2[fold2["image"] == "q"]])


def test_concat_embeddings_is_the_mean_cosine():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 8))
    c = concat_embeddings([a, b])
    assert c.shape == (6, 12) and c.dtype == np.float32
    na, nb = l2_normalize(a), l2_normalize(b)
    np.testing.assert_allclose(c @ c.T, (na @ na.T + nb @ nb.T) / 2, atol=1e-6)


def test_oof_truth():
    assert oof_truth(["A", "B", "C"], ["A", "C", "C"]) == ["A", NEW, "C"]  # B is not in the gallery


# ---------------------------------------------------------------- predict / threshold


def test_predict_insertion_rule():
    t = table(
        [
            ("top", "A", 0.4),  # every candidate below .5 -> new first
            ("top", "B", 0.3),
            ("mid", "E", 0.2),  # table order does not matter: sorted by score
            ("mid", "A", 0.9),
            ("mid", "B", 0.6),
            ("mid", "C", 0.4),  # first below .5: new goes before C; E falls beyond k
            ("mid", "D", 0.3),
            *[("full", x, s) for x, s in zip("ABCDEF", [0.9, 0.8, 0.7, 0.6, 0.55, 0.51], strict=True)],
            ("few", "A", 0.9),  # all above, fewer than k -> new appended
            ("few", "B", 0.8),
            ("short", "A", 0.9),  # fewer than k, one below -> no padding, 3 ids
            ("short", "B", 0.1),
            ("equal", "A", 0.5),  # equal to the threshold counts as above
            ("tie", "B", 0.7),  # equal scores -> ordered by id
            ("tie", "A", 0.7),
        ]
    )
    out = predict(
        t, threshold=0.5, k=5, images=["top", "mid", "full", "few", "short", "equal", "tie", "none"]
    )
    assert out["image"].tolist() == ["top", "mid", "full", "few", "short", "equal", "tie", "none"]
    assert preds_of(out) == {
        "top": f"{NEW} A B",
        "mid": f"A B {NEW} C D",
        "full": "A B C D E",  # k candidates all >= threshold: new is cut off
        "few": f"A B {NEW}",
        "short": f"A {NEW} B",
        "equal": f"A {NEW}",
        "tie": f"A B {NEW}",
        "none": NEW,  # no candidates at all
    }
    assert all(len(set(p.split())) == len(p.split()) for p in out["predictions"])  # always distinct


def test_known_ranking_map5_ignores_the_threshold_and_new_queries():
    t = table(
        [
            ("q1", "A", 0.1),  # low score: a threshold would put new first; the ranking alone gives A at rank 1
            ("q1", "B", 0.05),
            ("q2", "B", 0.9),  # truth A at rank 2 -> 1/2
            ("q2", "A", 0.8),
            ("q3", "C", 0.9),  # truth A absent from the candidates -> 0
            ("q4", "A", 0.9),  # a new query: left out
            ("extra", "A", 0.9),  # not in truth: ignored
        ]
    )
    truth = {"q1": "A", "q2": "A", "q3": "A", "q4": NEW}
    assert known_ranking_map5(t, truth, NEW) == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert math.isnan(known_ranking_map5(t, {"q4": NEW}, NEW))


def test_predict_rejects_bad_tables():
    t = table([("q", "A", 0.9)])
    with pytest.raises(ValueError, match="not in `images`"):
        predict(t, 0.5, images=["other"])
    with pytest.raises(ValueError, match="reserved"):
        predict(table([("q", NEW, 0.9)]), 0.5)
    with pytest.raises(ValueError, match="score is NaN at row 0"):
        predict(table([("q", "A", float("nan"))]), 0.5)
    with pytest.raises(ValueError, match="lacks column"):
        predict(t.rename(columns={"score": "s"}), 0.5)


def test_tune_threshold_picks_the_known_best():
    t = table(
        [
            ("i1", "A", 0.9),  # truth A
            ("i1", "B", 0.5),
            ("i2", "C", 0.6),  # truth new
            ("i2", "D", 0.4),
            ("i3", "A", 0.7),  # truth B
            ("i3", "B", 0.65),
            ("i4", "E", 0.3),  # truth new
        ]
    )
    truth = {"i1": "A", "i2": NEW, "i3": "B", "i4": NEW}
    # by hand (i1, i2, i3, i4 reciprocal ranks):
    # .20: 1, 1/3, 1/2, 1/2 | .35: 1, 1/3, 1/2, 1 | .62: 1, 1, 1/2, 1 | .64: same as .62 (no score in between)
    # .68: 1, 1, 1/3, 1 | .95: 1/2, 1, 1/3, 1
    best, sweep = tune_threshold(t, truth, [0.95, 0.62, 0.2, 0.68, 0.35, 0.64])
    assert best == 0.62  # tie with .64 -> the lowest
    assert sweep["threshold"].tolist() == [0.2, 0.35, 0.62, 0.64, 0.68, 0.95]
    expected = np.array([2 + 1 / 3, 2 + 5 / 6, 3.5, 3.5, 3 + 1 / 3, 2 + 5 / 6]) / 4
    np.testing.assert_allclose(sweep["map5"], expected)
    np.testing.assert_allclose(sweep["new_share"], [0, 0.25, 0.5, 0.5, 0.5, 1.0])  # new ranked first
    np.testing.assert_allclose(sweep["map5_new"], [5 / 12, 2 / 3, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="have no truth"):
        tune_threshold(t, {"i1": "A"}, [0.5])


def test_tune_threshold_equals_predict_then_map():
    rng = np.random.default_rng(3)
    rows, truth = [], {}
    for i in range(60):
        ids = rng.choice(list("ABCDEFGHIJ"), size=rng.integers(0, 9), replace=False)
        rows += [(f"q{i}", x, float(np.round(rng.uniform(0, 1), 2))) for x in ids]  # rounding makes ties
        truth[f"q{i}"] = str(rng.choice(list("ABCDEFGHIJK") + [NEW]))  # K is never a candidate
    t = table(rows)
    thresholds = np.round(np.linspace(0, 1, 21), 2)
    _, sweep = tune_threshold(t, truth, thresholds)
    for thr, got in zip(sweep["threshold"], sweep["map5"], strict=True):
        out = predict(t, thr, images=list(truth))
        assert got == pytest.approx(map_at_k([truth[i] for i in out["image"]], out["predictions"].tolist()))


def test_leave_one_out_hand_case():
    emb = np.array([unit(0), unit(50), unit(20), unit(90), unit(60)], np.float32)
    labels = ["A", "A", "B", "B", "C"]
    # img0 (0deg):  B cos20 > A cos50 > C cos60  -> A rank 2 -> 1/2
    # img1 (50deg): C cos10 > B cos30 > A cos50  -> 1/3
    # img2 (20deg): A cos20 > C cos40 > B cos70  -> 1/3
    # img3 (90deg): C cos30 > A cos40 > B cos70  -> 1/3
    # img4 is C's only image: dropped by default, scores 0 otherwise
    assert leave_one_out_map5(emb, labels) == pytest.approx(1.5 / 4)
    assert leave_one_out_map5(emb, labels, drop_singletons=False) == pytest.approx(1.5 / 5)
    assert leave_one_out_map5(emb, labels, k=2) == pytest.approx(0.5 / 4)


# ---------------------------------------------------------------- plots (smoke)


def test_plots_return_figures(tmp_path):
    from PIL import Image

    sweep = pd.DataFrame({"threshold": [0.2, 0.5], "map5": [0.4, 0.6], "new_share": [0.1, 0.5]})
    assert len(plots.plot_threshold_sweep(sweep, 0.5).axes) == 1

    log = pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0], "lr": [1e-3, 5e-4]})
    assert len(plots.plot_training_curves(log).axes) == 2  # loss, lr
    log = log.assign(valid_loss=[2.5, 1.5], valid_map5=[0.2, 0.3])
    assert len(plots.plot_training_curves(log).axes) == 3  # loss, MAP@5, lr
    # validate_every > 1 logs NaN on the skipped epochs: the validation lines join the validated epochs only
    log = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0], "lr": [1e-3, 5e-4, 0.0],
                        "valid_loss": [np.nan, 2.5, 1.5], "valid_map5": [np.nan, 0.2, 0.3]})
    fig = plots.plot_training_curves(log)
    valid_line = [ln for ln in fig.axes[0].lines if ln.get_label() == "valid"][0]
    assert list(valid_line.get_xdata()) == [2, 3]
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.2, 0.3]

    paths = {}
    for name in ["q0", "q1", "gA", "gB"]:
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 6), (100, 150, 200)).save(paths[name])
    t = table([("q0", "A", 0.9), ("q0", "B", 0.4), ("q1", "A", 0.8)])
    pred = predict(t, 0.5, images=["q0", "q1"])  # q0: A new B | q1: A new
    truth = {"q0": "A", "q1": "B"}
    chosen = plots.select_examples(pred, truth, n=2)
    assert chosen == ["q0", "q1"]  # one right (q0), one wrong (q1)
    queries, truths, top = plots.example_tiles(
        chosen, pred, t, truth, {"q0": paths["q0"], "q1": paths["q1"]}, {"A": paths["gA"], "B": paths["gB"]}
    )
    assert top[0] == [(paths["gA"], "A", 0.9), (None, NEW, top[0][1][2]), (paths["gB"], "B", 0.4)]
    fig = plots.plot_retrieval_examples(queries, truths, top, n_rows=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4  # 2 rows x (query + 3 predictions)
    assert fig.axes[1].title.get_color() == plots.RIGHT  # q0's A is right
    assert fig.axes[2].title.get_color() == plots.WRONG
    with pytest.raises(FileNotFoundError, match="missing"):
        plots.plot_retrieval_examples([tmp_path / "absent.png"], ["A"], [[]], n_rows=1)


def test_select_examples_is_deterministic_and_mixed():
    images = [f"i{n}" for n in range(10)]
    pred = pd.DataFrame({"image": images, "predictions": ["A B"] * 10})
    truth = {i: ("A" if n < 7 else "B") for n, i in enumerate(images)}  # 7 right, 3 wrong
    a = plots.select_examples(pred, truth, n=4, seed=5)
    assert a == plots.select_examples(pred, truth, n=4, seed=5)
    assert sum(truth[i] == "A" for i in a) == 2 and len(a) == 4
    b = plots.select_examples(pred, truth, n=8)  # only 3 wrong: right ones fill in
    assert sum(truth[i] == "B" for i in b) == 3 and len(b) == 8


def test_search_index_choice_flat_ivf_auto(monkeypatch):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(2000, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:50]
    flat_s, flat_i = retrieval.search(gallery, queries, 5, use_gpu=False, index="flat")
    auto_s, auto_i = retrieval.search(gallery, queries, 5, use_gpu=False)  # 2,000 rows: below FLAT_BELOW
    np.testing.assert_array_equal(auto_i, flat_i)
    ivf_s, ivf_i = retrieval.search(gallery, queries, 5, use_gpu=False, index="ivf")
    # A row's own IVF cell is always probed (it is the cell nearest to it), so each query finds itself first.
    np.testing.assert_array_equal(ivf_i[:, 0], np.arange(50))
    np.testing.assert_allclose(ivf_s[:, 0], 1.0, atol=1e-5)
    # Structureless vectors: the default 2 of 51 cells find little, so nprobe is raised until the sampled recall
    # reaches 0.99 (ann.calibrate_nprobe); the search as a whole then agrees with the exact one almost everywhere.
    assert ann.recall_at_k(flat_i, ivf_i, 5) >= 0.97
    monkeypatch.setattr(ann, "FLAT_BELOW", 1000)  # "auto" switches to IVF at the size threshold ...
    monkeypatch.setattr(ann, "IVF_MIN_QUERIES", 51)  # ... but not for fewer queries than pay for the build
    np.testing.assert_array_equal(retrieval.search(gallery, queries, 5, use_gpu=False)[1], flat_i)
    monkeypatch.setattr(ann, "IVF_MIN_QUERIES", 50)
    auto2_s, auto2_i = retrieval.search(gallery, queries, 5, use_gpu=False)
    np.testing.assert_array_equal(auto2_i, ivf_i)
    with pytest.raises(ValueError, match="index must be"):
        retrieval.search(gallery, queries, 5, index="hnsw")
