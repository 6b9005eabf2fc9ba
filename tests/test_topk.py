"""The bounded-memory top-k class scores (common.lib.topk): hand-computed cases with k < C, dense and top-k
(k >= C) giving the same ensembles, predictions and metrics, the one reader, and stages 05 -> 06 on the tiny demo
with the top-k layout forced."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.config import ClassifierConfig, EmbedderConfig, EnsembleConfig, ExtractConfig, RetrievalConfig
from common.core import paths, store
from common.lib import ensemble, metrics, postprocess, topk
from common.stages import ensemble_postprocess as ensemble_stage
from common.stages import extract_embeddings, retrieve_submit, train_embedder
from common.stages import train_classifier as classify


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------- unit, by hand
@pytest.mark.parametrize("prob_topk, n_classes, k", [
    (0, 8, 0), (0, 1000, 0), (0, 1001, 100), (0, 15500, 100), (-1, 15500, 0), (5, 8, 5), (20, 8, 8), (50, 15500, 50),
])
def test_resolve_k(prob_topk, n_classes, k):
    assert topk.resolve_k(prob_topk, n_classes) == k


def test_config_doc_states_the_automatic_bound_and_rejects_small_k():
    doc = ClassifierConfig.field_docs()["prob_topk"]
    assert f"dense up to {topk.DENSE_MAX_CLASSES} classes" in doc and f"the {topk.AUTO_K} most" in doc
    for bad in (-2, 1, 4):
        with pytest.raises(ValueError, match=f"prob_topk={bad}"):
            ClassifierConfig(prob_topk=bad)
    ClassifierConfig(prob_topk=5)
    ClassifierConfig(prob_topk=-1)


def hand_members() -> tuple[topk.TopK, topk.TopK]:
    p0 = np.array([[0.5, 0.3, 0.1, 0.06, 0.04]], np.float32)
    p1 = np.array([[0.1, 0.15, 0.6, 0.1, 0.05]], np.float32)
    return topk.from_dense(p0, 2), topk.from_dense(p1, 2)


def test_hand_computed_top2_of_five_classes():
    t0, t1 = hand_members()
    assert t0.index.tolist() == [[0, 1]] and t1.index.tolist() == [[2, 1]]
    np.testing.assert_allclose(t0.rest, [0.2], atol=1e-6)
    np.testing.assert_allclose(t0.floor, [0.2], atol=1e-6)  # min(smallest kept 0.3, rest mass 0.2)
    # mean of the two: c0 (0.5 + 0) / 2 = 0.25 (not kept by t1), c1 (0.3 + 0.15) / 2 = 0.225, c2 (0 + 0.6) / 2 = 0.3
    mean = topk.weighted_mean([t0, t1], [0.5, 0.5])
    assert mean.index.tolist() == [[2, 0]] and mean.index.dtype == np.int32
    np.testing.assert_allclose(mean.value, [[0.30, 0.25]], atol=1e-6)
    np.testing.assert_allclose(mean.rest, [0.45], atol=1e-6)  # 1 - 0.55
    np.testing.assert_allclose(mean.floor, [0.25], atol=1e-6)  # min(0.25, 0.45)
    # the rule for a class outside the kept columns: the floor (label cleaning, blends)
    np.testing.assert_allclose(topk.gather(mean, [0, 0, 0], [2, 1, 4]), [0.30, 0.25, 0.25], atol=1e-6)
    images, classes = ["x"], list("abcde")
    kept = postprocess.select_pseudo_labels(mean, images, classes, 0.3, 1)
    assert kept["individual_id"].tolist() == ["c"] and kept["confidence"].tolist() == pytest.approx([0.3])
    flagged = postprocess.flag_noisy_labels(mean, images, classes, np.array([3]), 0.2)
    assert flagged[["label", "predicted"]].values.tolist() == [["d", "c"]]
    assert flagged["label_prob"].tolist() == pytest.approx([0.25])
    assert ensemble_stage.top5_predictions(mean, classes) == ["c a"]  # at most k classes


def test_hand_computed_logit_mean_fills_a_missing_class_with_the_floor():
    l0 = topk.TopK(np.array([[0, 1]], np.int32), np.array([[2.0, 1.0]], np.float32), np.array([1.0], np.float32), 5)
    l1 = topk.TopK(np.array([[2, 1]], np.int32), np.array([[3.0, 0.5]], np.float32), np.array([0.5], np.float32), 5)
    mean = topk.weighted_mean([l0, l1], [0.5, 0.5], kind="logit")
    # c0: (2 + 0.5) / 2 = 1.25; c1: (1 + 0.5) / 2 = 0.75; c2: (1 + 3) / 2 = 2.0; elsewhere (1 + 0.5) / 2 = 0.75
    assert mean.index.tolist() == [[2, 0]]
    np.testing.assert_allclose(mean.value, [[2.0, 1.25]])
    np.testing.assert_allclose(mean.floor, [0.75])


def test_class_rows_and_redistribution_only_move_to_kept_classes():
    probs = np.array([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.8, 0.15, 0.05]], np.float32)
    top2 = topk.from_dense(probs, 2)  # rows keep {0,1}, {0,1}, {0,2}, {0,1}
    rows, vals = topk.class_rows(top2)(2)
    assert rows.tolist() == [2] and vals.tolist() == pytest.approx([0.4])
    rows, vals = topk.class_rows(top2)(1)
    assert rows.tolist() == [0, 1, 3] and vals.tolist() == pytest.approx([0.3, 0.2, 0.15])
    rows, vals = topk.class_rows(probs)(2)
    assert rows.tolist() == [2, 0, 1, 3]  # dense: every row, by descending prob, ties by row
    images, classes = ["r0", "r1", "r2", "r3"], ["a", "b", "c"]
    pred, moves = postprocess.redistribute_labels(top2, images, classes, 1)
    # b: best row 0 (0.3); c: only row 2 keeps it
    assert moves[["image", "to_label"]].values.tolist() == [["r0", "b"], ["r2", "c"]]
    assert pred["label"].tolist() == ["b", "a", "c", "a"]
    dense_pred, dense_moves = postprocess.redistribute_labels(probs, images, classes, 1)
    assert dense_pred["label"].tolist() == pred["label"].tolist()


def test_from_logits_in_chunks_equals_the_dense_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 7)).astype(np.float32)
    whole, at = topk.from_logits(logits, 7)
    np.testing.assert_allclose(topk.to_dense(whole), softmax(logits), atol=1e-6)
    np.testing.assert_array_equal(at, np.take_along_axis(logits, whole.index.astype(int), 1))
    parts = [topk.from_logits(logits[i:i + 3], 4)[0] for i in range(0, 10, 3)]
    joined = topk.concat(parts, 7)
    assert joined.index.shape == (10, 4)
    np.testing.assert_array_equal(joined.index, np.argsort(-softmax(logits), 1, kind="stable")[:, :4])
    np.testing.assert_allclose(joined.rest, 1 - np.sort(softmax(logits), 1)[:, -4:].sum(1), atol=1e-6)


# --------------------------------------------------------------------------------- dense == top-k (k >= C)
def test_dense_and_full_topk_give_the_same_ensemble_predictions_and_metrics():
    rng = np.random.default_rng(0)
    n, c = 30, 8
    images, classes = [f"i{r}" for r in range(n)], [f"c{j}" for j in range(c)]
    dense, sparse, imgs, cls = [], [], [], []
    for _ in range(3):  # each member in its own row and class order
        rows, cols = rng.permutation(n), rng.permutation(c)
        p = softmax(rng.normal(size=(n, c)) * 2)
        dense.append(p[rows][:, cols])
        sparse.append(topk.from_dense(p[rows][:, cols], c))
        imgs.append([images[r] for r in rows])
        cls.append([classes[j] for j in cols])
    w = [0.2, 0.3, 0.5]
    d, d_img, d_cls = ensemble.ensemble_probs(dense, imgs, cls, w)
    s, s_img, s_cls = ensemble.ensemble_probs(sparse, imgs, cls, w)
    assert isinstance(s, topk.TopK) and (s_img, s_cls) == (d_img, d_cls)
    np.testing.assert_allclose(topk.to_dense(s), d, atol=1e-6)
    y = rng.integers(0, c, n)
    assert metrics.classification_report(y, s, c) == metrics.classification_report(y, d, c)
    assert ensemble_stage.top5_predictions(s, d_cls) == ensemble_stage.top5_predictions(d, d_cls)
    pd.testing.assert_frame_equal(postprocess.select_pseudo_labels(s, d_img, d_cls, 0.3, 1),
                                  postprocess.select_pseudo_labels(d, d_img, d_cls, 0.3, 1), atol=1e-6)
    pd.testing.assert_frame_equal(postprocess.flag_noisy_labels(s, d_img, d_cls, y, 0.3),
                                  postprocess.flag_noisy_labels(d, d_img, d_cls, y, 0.3), atol=1e-6)
    for a, b in zip(postprocess.redistribute_labels(s, d_img, d_cls, 4),
                    postprocess.redistribute_labels(d, d_img, d_cls, 4), strict=True):
        pd.testing.assert_frame_equal(a, b, atol=1e-6)
    table = pd.DataFrame({"image": np.repeat(d_img, 2), "individual_id": ["c0", "other"] * n,
                          "score": rng.uniform(0, 1, 2 * n)})
    pd.testing.assert_frame_equal(ensemble.blend_scores(table, s, d_img, d_cls, 0.4),
                                  ensemble.blend_scores(table, d, d_img, d_cls, 0.4), atol=1e-6)


def test_reader_dense_unchanged_and_topk_errors_name_the_file():
    dense = {"image": np.array(["a"]), "probs": np.array([[0.2, 0.8]], np.float32)}
    assert topk.read_scores(dense, 2) is dense["probs"]
    with pytest.raises(ValueError, match="x.npz.*not \\(N, 3\\)"):
        topk.read_scores(dense, 3, source="x.npz")
    t = topk.from_dense(np.array([[0.2, 0.5, 0.3]], np.float32), 2)
    arrays = {"image": np.array(["a"]), **topk.to_arrays(t)}
    back = topk.read_scores(arrays, 3, source="x.npz")
    np.testing.assert_array_equal(back.index, [[1, 2]])
    with pytest.raises(ValueError, match="x.npz.*row 0.*outside 0..1"):
        topk.read_scores(arrays, 2, source="x.npz")
    with pytest.raises(KeyError, match="x.npz.*topk_prob_fold0"):
        topk.read_scores(arrays, 3, fold=0, source="x.npz")


# ------------------------------------------------------------------------------- stages 05 -> 06, tiny demo
C = 6  # classes of the tiny demo
CLS = dict(backbone="mobilenetv3_small_050", pretrained="none", image_size=32, batch_size=4, n_folds=2,
           folds="all", device="cpu", warmup_epochs=0.5, amp=False, use_crops=False)


@pytest.fixture(scope="module")
def runs(comp, isolated_module, one_torch_thread):
    """Stage-05 runs a, b (dense, then the same fold models predicting again in top-k with k >= C (the tiny demo
    has 6 classes: k = 8 keeps all) and with k = 5) and stage-06 ensembles of each; the arrays and results kept."""
    out: dict = {}
    emb = dict(data=str(comp.root), exp="e", n_folds=2, folds="all", device="cpu")  # an embed member to blend with
    ecfg = EmbedderConfig(**emb, backbone="mobilenetv3_small_050", pretrained="none", image_size=32, epochs=1,
                          batch_size=4, amp=False, use_crops=False, embedding_dim=32)
    train_embedder.run_training(ecfg, comp, train_embedder.prepare_folds(ecfg, comp))
    extract_embeddings.run_extraction(ExtractConfig(**emb, batch_size=16), comp)
    retrieve_submit.run_retrieval(RetrievalConfig(**emb, fold_merge="concat", knn_k=10), comp)
    for prob_topk, tag in ((-1, "dense"), (8, "t8"), (5, "t5")):
        for exp, lr, epochs, tau in (("a", 1e-3, 1, 1.0), ("b", 3e-3, 2, 1.0)):
            cfg = ClassifierConfig(data=str(comp.root), exp=exp, lr=lr, epochs=epochs, prob_topk=prob_topk,
                                   la_posthoc_tau=tau, **CLS)
            out[tag, exp] = classify.run_classification(cfg, comp)
            for split in ("oof", "test"):
                out[tag, exp, split] = store.load_arrays(paths.stage_dir(exp, "05") / f"{split}.npz")
        kw = dict(redistribute_k=2, pseudo_threshold=0.18, clean_threshold=0.18)  # 6 classes, 1-2 epochs: flat
        ens = EnsembleConfig(data=str(comp.root), exp=f"ens_{tag}", members="a,b", device="cpu", soup="greedy", **kw)
        out[tag, "ens"] = ensemble_stage.run_ensemble(ens, comp)
        out[tag, "sub"] = pd.read_csv(paths.submission_path(out[tag, "ens"]["submission"]), dtype=str)
        blend = EnsembleConfig(data=str(comp.root), exp=f"blend_{tag}", members="a,b", embed_members="e",
                               blend_ratio=0.5, knn_k=10, device="cpu")
        out[tag, "blend"] = ensemble_stage.run_ensemble(blend, comp)["retrieval"]
        out[tag, "blend_sub"] = pd.read_csv(paths.submission_path(ensemble_stage.submission_name(blend)), dtype=str)
        for name in ("test.npz", "oof.npz", "flagged.csv", "redistributed.csv", "pseudo_round1.csv", "soup_test.npz",
                     "soup_oof.npz", "soup_steps.csv"):
            path = ensemble_stage.stage_dir(f"ens_{tag}") / name
            out[tag, "06", name] = store.load_arrays(path) if name.endswith("npz") else pd.read_csv(path, dtype=str)
    return out


def test_stage05_writes_the_topk_layout_when_forced(runs):
    dense, t5 = runs["dense", "a", "oof"], runs["t5", "a", "oof"]
    assert runs["dense", "a"]["n_classes"] == C
    assert "probs" in dense and "topk_index" not in dense  # 6 classes: -1 and the automatic rule stay dense
    assert {"topk_index", "topk_prob", "topk_logit", "rest_mass", "label", "fold"} <= set(t5) and "probs" not in t5
    assert t5["topk_index"].dtype == np.int32 and t5["topk_index"].shape == (len(dense["image"]), 5)
    assert t5["topk_prob"].dtype == np.float32
    np.testing.assert_array_equal(t5["image"], dense["image"])
    assert (np.diff(t5["topk_prob"], axis=1) <= 0).all()
    # the same fold models: the kept columns are the dense file's five best, the rest mass what they miss
    best = np.argsort(-dense["probs"], 1, kind="stable")[:, :5]
    np.testing.assert_array_equal(t5["topk_index"], best)
    np.testing.assert_allclose(t5["topk_prob"], np.take_along_axis(dense["probs"], best, 1), atol=1e-6)
    np.testing.assert_allclose(t5["rest_mass"], 1 - t5["topk_prob"].sum(1), atol=1e-6)
    np.testing.assert_allclose(t5["topk_logit"], np.take_along_axis(dense["logits"], best, 1), atol=1e-5)
    test = runs["t5", "a", "test"]
    assert {"topk_index_fold0", "topk_prob_fold0", "rest_mass_fold0", "topk_index_fold1"} <= set(test)
    fold0 = runs["dense", "a", "test"]["probs_fold0"]
    np.testing.assert_array_equal(test["topk_index_fold0"], np.argsort(-fold0, 1, kind="stable")[:, :5])
    assert runs["t5", "a"]["prob_topk"] == 5 and "prob_topk" not in runs["dense", "a"]


def test_stage05_topk_with_every_class_matches_dense(runs):
    for exp in ("a", "b"):
        d, t = runs["dense", exp], runs["t8", exp]
        for key in ("oof", "test", "test_by_fold", "oof_no_posthoc", "test_no_posthoc"):  # adjusted and raw
            assert t[key] == d[key], key
        for split in ("oof", "test"):
            dense = runs["dense", exp, split]["probs"]
            np.testing.assert_allclose(topk.to_dense(topk.read_scores(runs["t8", exp, split], C)), dense, atol=1e-6)
        logits = topk.read_scores(runs["t8", exp, "test"], C, "logits")
        np.testing.assert_allclose(topk.to_dense(logits), runs["dense", exp, "test"]["logits"], atol=1e-5)
    sub_a = pd.read_csv(paths.submission_path("a-classifier"), dtype=str)  # the last run's: t5 of a
    assert sub_a["predictions"].str.split().map(len).eq(5).all()


def test_stage06_consumes_topk_members_like_dense(runs):
    d, t = runs["dense", "ens"], runs["t8", "ens"]
    assert t["weights"] == pytest.approx(d["weights"], abs=1e-6)
    assert t["oof"] == d["oof"] and t["test"] == d["test"]
    assert runs["t8", "sub"]["predictions"].tolist() == runs["dense", "sub"]["predictions"].tolist()
    for name in ("flagged.csv", "redistributed.csv", "pseudo_round1.csv"):
        got, want = runs["t8", "06", name], runs["dense", "06", name]
        pd.testing.assert_frame_equal(got.drop(columns=["confidence", "label_prob"], errors="ignore"),
                                      want.drop(columns=["confidence", "label_prob"], errors="ignore"))
        for col in ("confidence", "label_prob"):
            if col in want:
                np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), atol=1e-6)
    assert t["pseudo"]["kept"] == d["pseudo"]["kept"] > 0 and len(runs["dense", "06", "flagged.csv"]) > 0
    assert t["redistribute"] == d["redistribute"] and d["redistribute"]["moved"] > 0  # something to compare
    np.testing.assert_allclose(topk.to_dense(topk.read_scores(runs["t8", "06", "test.npz"], C)),
                               runs["dense", "06", "test.npz"]["probs"], atol=1e-6)


def test_stage06_on_top5_members_writes_topk_and_known_answers(runs):
    t5 = runs["t5", "ens"]
    test = runs["t5", "06", "test.npz"]
    assert "probs" not in test and test["topk_index"].shape[1] == 5  # union of the members, five best kept
    members = [topk.read_scores(runs["t5", e, "test"], C) for e in ("a", "b")]
    w = [t5["weights"]["a"], t5["weights"]["b"]]
    expected = topk.to_dense(topk.weighted_mean(members, w))  # fill 0 outside a member's five
    got = topk.to_dense(topk.read_scores(test, C))
    kept = np.zeros_like(got, bool)
    np.put_along_axis(kept, test["topk_index"].astype(int), True, 1)
    np.testing.assert_allclose(got[kept], expected[kept], atol=1e-6)
    # by hand for row 0: the weighted sum of the members' kept probabilities of each class
    row = np.zeros(C)
    for m, wi in zip(members, w, strict=True):
        row[m.index[0]] += wi * m.value[0]
    np.testing.assert_allclose(test["topk_prob"][0], np.sort(row)[::-1][:5], atol=1e-6)
    np.testing.assert_allclose(test["rest_mass"], 1 - test["topk_prob"].sum(1), atol=1e-5)
    classes = store.read_json(paths.stage_dir("a", "05") / "classes.json")["classes"]
    redis = runs["t5", "06", "redistributed.csv"]
    sub = runs["t5", "sub"]["predictions"].str.split()
    assert sub.str[0].tolist() == redis["label"].tolist()
    unmoved = redis["moved"] == "False"
    assert (redis["label"][unmoved] == [classes[i] for i in test["topk_index"][unmoved.to_numpy(), 0]]).all()
    assert t5["oof"]["n"] == runs["dense", "ens"]["oof"]["n"] and "pseudo" in t5 and "clean" in t5
    assert (~unmoved).any() and unmoved.any()


def test_a_topk_teacher_stays_topk_and_gives_dense_batch_targets_that_sum_to_one(runs, comp):
    import torch

    from common.engine import classifier as engine_classifier

    oof = runs["t5", "a", "oof"]  # on disk now: the k = 5 run of a
    classes = store.read_json(paths.stage_dir("a", "05") / "classes.json")["classes"]
    images = [str(i) for i in oof["image"][[3, 0]]]
    cfg = ClassifierConfig(data=str(comp.root), exp="student", distill_from="a", **CLS)
    soft = engine_classifier.teacher_targets(cfg, images, classes[::-1])  # columns in another order
    assert isinstance(soft, topk.TopK) and soft.index.shape == (2, 5)  # k columns in memory, not C
    # a batch that holds the rows in another order, one of them twice
    batch = engine_classifier.soft_batch(soft, torch.tensor([1, 0, 1]), torch.device("cpu"))
    assert batch.shape == (3, C) and batch.dtype == torch.float32
    np.testing.assert_array_equal(batch[0].numpy(), batch[2].numpy())
    got = batch[[1, 0]].numpy()
    assert got.shape == (2, C)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    for r, row in enumerate((3, 0)):
        for j, p in zip(oof["topk_index"][row], oof["topk_prob"][row], strict=True):
            assert got[r, C - 1 - j] == pytest.approx(p)
        missing = sorted(set(range(C)) - set(oof["topk_index"][row].tolist()))
        assert got[r, [C - 1 - j for j in missing]] == pytest.approx(oof["rest_mass"][row] / (C - 5))
    # a student trains one fold against the top-k teacher, in both distillation modes
    for mode in ("mix", "kd"):
        student = ClassifierConfig(data=str(comp.root), exp=f"student-{mode}", distill_from="a", distill_mode=mode,
                                   lr=1e-3, epochs=1, **CLS)
        log = classify.train_fold(student, comp, classify.prepare_folds(student, comp), 0)
        assert np.isfinite(log["train_loss"]).all()


def test_inference_only_writes_the_same_topk_test_file(runs, comp):
    # the Kaggle kernel path: the full run's fold models predict the test images again, in the top-k layout
    cfg = ClassifierConfig(data=str(comp.root), exp="a", lr=1e-3, epochs=1, prob_topk=5, la_posthoc_tau=1.0,
                           inference_only=True, **CLS)
    res = classify.run_classification(cfg, comp)
    assert res["inference_only"] and res["prob_topk"] == 5
    got = store.load_arrays(paths.stage_dir("a", "05") / "test.npz", list(comp.test["image"]))
    full = runs["t5", "a", "test"]
    assert set(got) == set(full)
    for name in full:
        if name != "image":
            np.testing.assert_allclose(got[name], full[name], atol=1e-6, err_msg=name)
    assert res["test"] == runs["t5", "a"]["test"]


def test_soups_of_topk_members_keep_their_layout_and_scores(runs):
    dense, t5 = runs["dense", "ens"]["soup"], runs["t5", "ens"]["soup"]
    assert t5["kept"] == dense["kept"]  # greedy: the same accuracies (argmax per batch), the same choices
    pd.testing.assert_frame_equal(runs["t5", "06", "soup_steps.csv"], runs["dense", "06", "soup_steps.csv"])
    assert t5["oof"] == dense["oof"] and t5["test"] == dense["test"]  # accuracy and top-5 need only five columns
    got, want = runs["t5", "06", "soup_test.npz"], runs["dense", "06", "soup_test.npz"]
    assert "probs" not in got and got["topk_index"].shape == (len(want["probs"]), 5)
    np.testing.assert_array_equal(got["topk_index"][:, 0], want["probs"].argmax(1))
    every = runs["t8", "06", "soup_test.npz"]  # k = C: the dense soup's probabilities, in the top-k layout
    np.testing.assert_allclose(topk.to_dense(topk.read_scores(every, C)), want["probs"], atol=1e-6)


def test_retrieval_blend_with_topk_members(runs):
    dense, every, top5 = runs["dense", "blend"], runs["t8", "blend"], runs["t5", "blend"]
    assert every["oof_map5"] == pytest.approx(dense["oof_map5"]) and every["threshold"] == pytest.approx(
        dense["threshold"])
    assert runs["t8", "blend_sub"]["predictions"].tolist() == runs["dense", "blend_sub"]["predictions"].tolist()
    # k = 5 of 6 classes: a pair outside an image's five counts the floor; the blend runs and answers every image
    sub = runs["t5", "blend_sub"]
    assert sub["image"].tolist() == runs["dense", "blend_sub"]["image"].tolist()
    assert sub["predictions"].str.split().map(len).eq(5).all() and 0 <= top5["oof_map5"] <= 1
