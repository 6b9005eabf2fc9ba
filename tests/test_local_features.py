"""Local-feature re-ranking: common.lib.local_features against hand-computed answers, and stage 04 with
``local_features=sift`` on test_submit's hand-made experiment, its images replaced by textures.

Each individual's images are windows of one random texture (its "coat"); the embeddings are test_submit's angles,
so the global ranking is known, and SIFT matches say which texture a test image shows.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from common.config import RetrievalConfig
from common.core import paths, store
from common.data.competition import load_competition
from common.lib import local_features as lf
from common.stages import local_rerank
from common.stages import retrieve_submit as submit
from tests.test_submit import EXP, SAMPLE_ORDER, TEST, TRAIN, TRUTH, cfg_for, make_experiment


def texture(seed: int, side: int = 160) -> np.ndarray:
    """A random blob texture (grey uint8): smooth noise, rich in SIFT keypoints."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC), (3, 3), 0)


def window(tex: np.ndarray, dx: int, dy: int, size: int = 120) -> np.ndarray:
    return np.ascontiguousarray(tex[dy:dy + size, dx:dx + size])


COATS = {"A": 1, "B": 2, "C": 3, "D": 4}


def test_sift_descriptors_shape_type_and_blank_image():
    desc = lf.sift_descriptors(texture(0), side=256, n_features=100)
    assert desc.dtype == np.uint8 and desc.shape[1] == 128 and 20 <= len(desc) <= 100
    assert lf.sift_descriptors(np.full((64, 64), 128, np.uint8)).shape == (0, 128)  # nothing to detect
    rgb = np.repeat(texture(0)[..., None], 3, axis=2)
    assert len(lf.sift_descriptors(rgb, side=256, n_features=100)) == len(desc)  # RGB is converted to grey
    # a small crop gains keypoints when it is upscaled
    small = cv2.resize(texture(0), (60, 60), interpolation=cv2.INTER_AREA)
    assert len(lf.sift_descriptors(small, side=240)) > len(lf.sift_descriptors(small, side=60))
    with pytest.raises(ValueError, match="side must be"):
        lf.sift_descriptors(small, side=8)


def test_root_sift_by_hand():
    d = np.array([[1, 3, 0, 0], [0, 0, 0, 0]], np.uint8)
    np.testing.assert_allclose(lf.root_sift(d), [[0.5, np.sqrt(0.75), 0, 0], [0, 0, 0, 0]], atol=1e-6)


def test_same_coat_matches_far_more_than_another_coat():
    a1, a2 = window(texture(1), 0, 0), window(texture(1), 30, 25)  # two views of one coat, shifted
    b = window(texture(2), 0, 0)
    d = {k: lf.root_sift(lf.sift_descriptors(v, side=240)) for k, v in {"a1": a1, "a2": a2, "b": b}.items()}
    same, other = lf.count_matches(d["a1"], d["a2"]), lf.count_matches(d["a1"], d["b"])
    assert same >= 20 and same > 5 * max(other, 1)
    assert lf.count_matches(d["a1"], d["a1"][:1]) == 0  # fewer than 2 descriptors to compare with


def test_local_similarity_and_fuse_by_hand():
    np.testing.assert_allclose(lf.local_similarity(np.array([0, 20, 60]), half=20), [0, 0.5, 0.75])
    # (0.8 + 0.5) / 2 and (0.8 + 0.75) / 2; with weight 3: (0.8 + 3 * 0.75) / 4
    np.testing.assert_allclose(lf.fuse(np.array([0.8, 0.8]), np.array([20, 60]), weight=1, half=20), [0.65, 0.775])
    np.testing.assert_allclose(lf.fuse(np.array([0.8]), np.array([60]), weight=3, half=20), [0.7625])
    np.testing.assert_allclose(lf.fuse(np.array([0.3]), np.array([99]), weight=0, half=20), [0.3])
    with pytest.raises(ValueError, match="weight"):
        lf.fuse(np.array([0.3]), np.array([1]), weight=-1, half=20)
    with pytest.raises(ValueError, match="half"):
        lf.local_similarity(np.array([1]), half=0)


def test_rerank_by_hand():
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], np.float32)
    idx = np.array([[5, 6, 7, 8], [1, 2, -1, -1]])
    matches = np.array([[0, 60, 20], [0, 0, 0]])
    s, i = lf.rerank(scores, idx, matches, weight=1, half=20, top=3)
    # fused: 0.45, (0.8 + 0.75) / 2 = 0.775, (0.7 + 0.5) / 2 = 0.6; the 4th neighbour is dropped (top=3)
    assert i.tolist() == [[6, 7, 5], [1, 2, -1]]
    np.testing.assert_allclose(s[0], [0.775, 0.6, 0.45], atol=1e-6)
    assert s[1, 2] == -np.inf  # a missing neighbour stays missing and last
    with pytest.raises(ValueError, match="shape"):
        lf.rerank(scores, idx, matches[:, :2], weight=1, half=20, top=3)


def test_pair_matcher_matches_each_pair_once():
    images = {"train/a": window(texture(1), 0, 0), "test/a": window(texture(1), 20, 30),
              "train/b": window(texture(2), 0, 0)}
    desc = {k: lf.sift_descriptors(v, side=240) for k, v in images.items()}
    read = []
    matcher = lf.PairMatcher(lambda k: read.append(k) or desc[k], threads=2)
    gallery = ["train/a", "train/b"]
    m = matcher.matches(["test/a"], gallery, np.array([[1, 0, -1]]))
    assert m.shape == (1, 3) and m[0, 1] > 5 * max(m[0, 0], 1) and m[0, 2] == 0
    again = matcher.matches(["test/a", "train/b"], gallery, np.array([[0, 1], [0, -1]]))
    assert again[0].tolist() == [m[0, 1], m[0, 0]]
    assert len(matcher.cache) == 3  # (test/a, train/a|b), (train/a, train/b)
    assert set(read) == set(images)  # two threads may both fetch an image the cache does not hold yet
    # a cache of two RootSIFT arrays: the same counts, images read again when they were dropped
    small = lf.PairMatcher(lambda k: read.append(k) or desc[k], threads=1, cache_images=2)
    read.clear()
    assert small.matches(["test/a", "train/b"], gallery, np.array([[0, 1], [0, -1]])).tolist() == again.tolist()
    assert len(read) > len(set(read)) and small._get.cache_info().currsize <= 2


def test_descriptor_file_round_trip_row_order_and_memory_map(tmp_path, monkeypatch):
    desc = [np.arange(256, dtype=np.uint8).reshape(2, 128), np.zeros((0, 128), np.uint8),
            np.ones((1, 128), np.uint8), np.full((3, 128), 7, np.uint8)]
    path = tmp_path / "d.npz"
    monkeypatch.setattr(local_rerank, "COPY_ROWS", 2)  # the copy into the .npy in several pieces
    local_rerank.save_descriptors(path, list("wxyz"), desc.__getitem__, key="k1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "d_descriptors.npy"]  # no work files left
    assert local_rerank.complete(path, "k1") and not local_rerank.complete(path, "k2")
    back = local_rerank.load_descriptors(path, list("wxyz"))
    assert list(back) == list("wxyz") and all(np.array_equal(back[k], d) for k, d in zip("wxyz", desc, strict=True))
    assert isinstance(back["z"], np.memmap)  # a view of the mapped file: not read into memory
    with pytest.raises(ValueError, match="d.npz"):
        local_rerank.load_descriptors(path, list("wxzy"))
    local_rerank.save_descriptors(tmp_path / "f.npz", ["a"], lambda i: np.zeros((0, 128), np.uint8))  # no rows
    assert local_rerank.load_descriptors(tmp_path / "f.npz", ["a"])["a"].shape == (0, 128)
    np.save(local_rerank.array_path(path), np.zeros((5, 128), np.uint8))  # a row count the index does not add up to
    with pytest.raises(ValueError, match="counts add up to 6 rows"):
        local_rerank.load_descriptors(path, list("wxyz"))


def test_killed_descriptor_run_resumes_after_the_last_finished_image(tmp_path):
    desc = [np.full((n, 128), n, np.uint8) for n in (2, 0, 1, 3, 2)]
    calls = []

    def dies_at_3(i):
        if i == 3:
            raise KeyboardInterrupt  # killed while image 3 is computed
        calls.append(i)
        return desc[i]

    path = tmp_path / "train.npz"
    with pytest.raises(KeyboardInterrupt):
        local_rerank.save_descriptors(path, list("abcde"), dies_at_3, key="k")
    assert calls == [0, 1, 2] and not local_rerank.complete(path, "k")
    with open(tmp_path / ".train_rows.raw", "ab") as fh:  # a block written after the last count: dropped
        fh.write(b"\x05" * 128)
    calls.clear()
    local_rerank.save_descriptors(path, list("abcde"), lambda i: calls.append(i) or desc[i], key="k")
    assert calls == [3, 4]  # the finished images are not computed again
    back = local_rerank.load_descriptors(path, list("abcde"))
    assert all(np.array_equal(back[k], d) for k, d in zip("abcde", desc, strict=True))
    # work in progress under other settings (another key) is not resumed
    with pytest.raises(KeyboardInterrupt):
        local_rerank.save_descriptors(tmp_path / "test.npz", list("abcde"), dies_at_3, key="old")
    calls.clear()
    local_rerank.save_descriptors(tmp_path / "test.npz", list("abcde"), lambda i: calls.append(i) or desc[i],
                                  key="new")
    assert calls == [0, 1, 2, 3, 4]


def test_auto_side_is_twice_the_median_longer_side_within_bounds(tmp_path):
    def files(*sizes):
        out = []
        for n, (w, h) in enumerate(sizes):
            path = tmp_path / f"{w}x{h}-{n}.png"
            assert cv2.imwrite(str(path), np.zeros((h, w), np.uint8))
            out.append(str(path))
        return out

    assert local_rerank.auto_side(files((130, 100), (120, 140), (150, 90))) == 280  # median longer side 140
    assert local_rerank.auto_side(files((224, 224), (224, 224))) == 448
    assert local_rerank.auto_side(files((60, 40))) == 256  # at least 256
    assert local_rerank.auto_side(files((1600, 1200), (900, 1200))) == 512  # at most 512


def test_known_map5_ignores_new_queries_and_the_threshold():
    table = pd.DataFrame({"image": ["q1", "q1", "q2", "q2", "q3"], "individual_id": ["A", "B", "A", "B", "A"],
                          "score": [0.9, 0.5, 0.2, 0.1, 0.9]})
    truth = pd.Series({"q1": "B", "q2": "A", "q3": "new_individual"})
    assert local_rerank.known_map5(table, truth, "new_individual") == pytest.approx((0.5 + 1) / 2)


@pytest.mark.parametrize("bad", [dict(local_features="orb"), dict(local_side=8), dict(local_side=-1),
                                 dict(local_half=0.0), dict(local_top=0)])
def test_bad_local_parameters_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RetrievalConfig(**bad)


# ------------------------------------------------------------------------------------------- stage 04
def make_textured_comp(root):
    """test_submit's competition with each image a window of its individual's coat (t4's D is unseen)."""
    for n, (image, individual, *_rest) in enumerate(TRAIN):
        path = root / "train_images" / image
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), window(texture(COATS[individual]), 5 * n, 3 * n))
    for n, image in enumerate(TEST):
        path = root / "test_images" / image
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), window(texture(COATS[TRUTH[image]]), 35 - 4 * n, 30))
    pd.DataFrame({"image": [r[0] for r in TRAIN], "species": "whale",
                  "individual_id": [r[1] for r in TRAIN]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": SAMPLE_ORDER, "predictions": "new_individual"}).to_csv(
        root / "sample_submission.csv", index=False)
    pd.DataFrame({"image": sorted(TRUTH), "individual_id": [TRUTH[i] for i in sorted(TRUTH)]}).to_csv(
        root / "test.csv", index=False)
    return load_competition(root, check_pixels=False)


@pytest.fixture
def textured(tmp_path, isolated):
    comp = make_textured_comp(tmp_path / "comp")
    make_experiment(comp)
    return comp


def test_given_weight_puts_the_matching_coat_first(textured):
    # globally t5 (60 deg, coat A) is nearest C (15 deg away), then B (30), then A (50): A ranks third
    plain = submit.run_retrieval(cfg_for(), textured)
    assert plain.submission.set_index("image").loc["t5.png", "predictions"].split()[0] == "C"
    result = submit.run_retrieval(cfg_for(local_features="sift", local_weight=16.0, local_side=240), textured)
    top1 = {r.image: r.predictions.split()[0] for r in result.submission.itertuples()}
    assert top1["t5.png"] == "A" and top1["t1.png"] == "A" and top1["t2.png"] == "B"
    assert result.metrics["local_weight"] == 16.0 and result.metrics["local_weight_source"] == "given"
    assert result.metrics["local_pairs_matched"] > 0
    assert result.metrics["local_side_used"] == 240
    assert submit.run_retrieval(cfg_for(local_features="sift", local_weight=1.0), textured
                                ).metrics["local_side_used"] == 256  # 0 (auto): twice 120 px, at least 256
    assert result.metrics["map5_known"] > plain.metrics["map5_known"]
    out = paths.stage_dir(EXP, "04") / "local"
    assert {p.name for p in out.iterdir()} >= {"train.npz", "test.npz", "pairs.npz"}


def test_weight_chosen_out_of_fold_and_descriptors_reused(textured, monkeypatch):
    result = submit.run_retrieval(cfg_for(local_features="sift", local_side=240), textured)
    written = store.read_json(paths.exp_dir(EXP) / "metrics.json")
    assert [row["weight"] for row in written["local_weight_sweep"]] == list(local_rerank.WEIGHTS)  # numeric order
    sweep = {row["weight"]: row["oof_known_map5"] for row in written["local_weight_sweep"]}
    best = max(sweep.values())
    chosen = result.metrics["local_weight"]
    assert result.metrics["local_weight_source"] == "oof" and sweep[chosen] == best
    assert chosen == min(w for w in local_rerank.WEIGHTS if sweep[w] == best)  # ties: the smallest
    assert written["local_weight"] == chosen

    calls, matched = [], []
    real, real_count = lf.sift_descriptors, lf.count_matches
    monkeypatch.setattr(lf, "sift_descriptors", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lf, "count_matches", lambda *a, **k: matched.append(1) or real_count(*a, **k))
    again = submit.run_retrieval(cfg_for(local_features="sift", local_side=240, local_weight=chosen), textured)
    assert calls == []  # same images and SIFT settings: the stored descriptors are read back
    assert matched == []  # and the stored match counts
    pd.testing.assert_frame_equal(again.submission, result.submission)
    assert (paths.stage_dir(EXP, "04") / "local" / "pairs.npz").exists()
    submit.run_retrieval(cfg_for(local_features="sift", local_side=200, local_weight=1.0), textured)
    assert len(calls) == len(TRAIN) + len(TEST)  # another side: computed again
    assert matched  # and matched again


def test_a_new_test_set_keeps_the_out_of_fold_match_counts(textured):
    cfg = cfg_for(local_features="sift", local_side=240, local_weight=1.0)
    submit.run_retrieval(cfg, textured)
    path = local_rerank.local_dir(cfg) / local_rerank.PAIRS_FILE
    stored = local_rerank.stored_pairs(path, local_rerank.descriptors(cfg, textured, [0]).keys)
    splits = {(a.split("/")[0], b.split("/")[0]) for a, b in stored}
    assert splits == {("train", "train"), ("test", "train")}  # the out-of-fold sweep and the test queries
    image = textured.root / "test_images" / "t1.png"
    assert cv2.imwrite(str(image), window(texture(99), 0, 0)[:100])  # another test set
    keys = local_rerank.descriptors(cfg, textured, [0]).keys
    kept = local_rerank.stored_pairs(path, keys)
    assert kept == {k: v for k, v in stored.items() if k[0].startswith("train/")}  # only train-train is valid
    assert kept
    assert local_rerank.stored_pairs(path, {**keys, "crops": "other"}) == {}  # other crops: none


def test_an_attached_run_s_train_descriptors_are_read_not_recomputed(textured, tmp_path, monkeypatch):
    import shutil

    cfg = cfg_for(local_features="sift", local_side=240)
    first = local_rerank.descriptors(cfg, textured, [0]).rows
    # the finished run, attached to an inference notebook as a dataset; this kernel's working/ has no descriptors
    src = tmp_path / "attached"
    local = paths.stage_dir(EXP, "04") / "local"
    shutil.copytree(local, src / EXP / "04_retrieval" / "local")
    shutil.rmtree(local)
    (src / EXP / "04_retrieval" / "local" / "test.npz").unlink()  # the hidden test set: new images
    monkeypatch.setattr(paths, "attached_dirs", lambda: [src])
    calls = []
    real = lf.sift_descriptors
    monkeypatch.setattr(lf, "sift_descriptors", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = local_rerank.descriptors(cfg, textured, [0]).rows
    assert len(calls) == len(TEST)  # only the test images are computed
    assert not (local / "train.npz").exists()  # the train descriptors are read where they are
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    # a train image that differs from the attached run's: its train descriptors are computed again
    image = textured.root / "train_images" / TRAIN[0][0]
    assert cv2.imwrite(str(image), window(texture(99), 0, 0)[:100])
    calls.clear()
    local_rerank.descriptors(cfg, textured, [0])
    assert len(calls) == len(TRAIN)  # the test descriptors of this kernel are reused


def test_unreadable_image_is_named(textured):
    bad = textured.root / "test_images" / "t3.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="t3.png"):
        submit.run_retrieval(cfg_for(local_features="sift", local_weight=1.0), textured)


def test_inference_only_reuses_the_stored_weight_or_says_what_is_missing(textured):
    submit.run_retrieval(cfg_for(), textured)  # a full run without local features
    with pytest.raises(ValueError, match="local_weight=-1.0: .*metrics.json has no local weight"):
        submit.run_retrieval(cfg_for(local_features="sift", local_side=240, inference_only=True), textured)
    full = submit.run_retrieval(cfg_for(local_features="sift", local_side=240), textured)
    again = submit.run_retrieval(cfg_for(local_features="sift", local_side=240, inference_only=True), textured)
    assert again.metrics["local_weight_source"] == "stored"
    assert again.metrics["local_weight"] == full.metrics["local_weight"]
    pd.testing.assert_frame_equal(again.submission, full.submission)


# ------------------------------------------------------------------------------------------- stage 06
def test_stage_06_reranks_like_stage_04_and_reuses_its_weight_for_inference(textured):
    from common.config import EnsembleConfig
    from common.stages import ensemble_postprocess as ensemble_stage

    local = dict(local_features="sift", local_side=240)
    ens = dict(data=str(textured.root), exp="ens", members="", embed_members=EXP, knn_k=50, oof_new_share=0.0,
               device="cpu", **local)
    # one member, global threshold: stage 04 with fold_merge=concat, the weight chosen out of fold alike
    chosen04 = submit.run_retrieval(cfg_for(fold_merge="concat", **local), textured).metrics
    chosen = ensemble_stage.run_ensemble(EnsembleConfig(**ens), textured)["retrieval"]
    assert chosen["local_weight_source"] == "oof" and chosen["local_weight"] == chosen04["local_weight"]
    assert chosen["local_weight_sweep"] == chosen04["local_weight_sweep"]
    # a given weight: the same re-ranked test scores and threshold as stage 04's
    stage04 = submit.run_retrieval(cfg_for(fold_merge="concat", local_weight=16.0, **local), textured).metrics
    ens["local_weight"] = 16.0
    res = ensemble_stage.run_ensemble(EnsembleConfig(**ens), textured)["retrieval"]
    assert res["local_weight_source"] == "given" and res["local_pairs_matched"] > 0
    assert res["threshold"] == stage04["threshold"] and res["map5"] == pytest.approx(stage04["map5"])
    got = pd.read_csv(paths.stage_dir("ens", "06") / "retrieval_test_scores.csv")
    pd.testing.assert_frame_equal(got, pd.read_csv(paths.stage_dir(EXP, "04") / "test_scores.csv"))
    plain = ensemble_stage.run_ensemble(EnsembleConfig(**{**ens, "exp": "plain", "local_features": "none"}),
                                        textured)["retrieval"]
    assert res["map5_known"] > plain["map5_known"]  # the matching coats move up, as in stage 04
    assert {p.name for p in (paths.stage_dir("ens", "06") / "local").iterdir()} >= {"train.npz", "pairs.npz"}
    # inference_only: the full run's weight (16 was given, -1 now: read back), the same submission
    again = ensemble_stage.run_ensemble(EnsembleConfig(**{**ens, "local_weight": -1.0, "inference_only": True}),
                                        textured)["retrieval"]
    assert again["local_weight_source"] == "stored" and again["local_weight"] == 16.0
    assert again["map5"] == pytest.approx(res["map5"])
    with pytest.raises(ValueError, match="metrics.json has no local weight"):
        ensemble_stage.run_ensemble(EnsembleConfig(**{**ens, "exp": "plain", "local_weight": -1.0,
                                                      "inference_only": True}), textured)
