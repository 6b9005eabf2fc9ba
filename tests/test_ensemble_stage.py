"""Stage 06 end to end (common.stages.ensemble_postprocess, common.stages.soup, common.stages.ensemble_retrieval) on the tiny demo.

Two stage-05 runs ``a`` and ``b`` (randomly initialised ``mobilenetv3_small_050``, 32 px, 1 epoch, both folds,
same seed so same folds and same initial weights, different learning rates and epochs) and one stage-02/03/04 run ``e``
(the embedder, fold_merge=concat) are built once for the module: about five seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import ClassifierConfig, EmbedderConfig, EnsembleConfig, ExtractConfig, RetrievalConfig
from common.core import paths, store
from common.data.competition import load_competition
from common.stages import ensemble_postprocess as ensemble_stage
from common.stages import extract_embeddings as embed
from common.stages import retrieve_submit as submit
from common.stages import train_classifier as classify
from common.stages import train_embedder

CLS = dict(backbone="mobilenetv3_small_050", pretrained="none", image_size=32, epochs=1, batch_size=4, n_folds=2,
           folds="all", device="cpu", warmup_epochs=0.5, amp=False, use_crops=False)


@pytest.fixture(scope="module")
def comp(comp, isolated_module, one_torch_thread):
    """conftest's tiny demo, with the module's stage-05 runs a, b and stage-02/03/04 run e built."""
    for exp, lr, epochs in (("a", 1e-3, 1), ("b", 3e-3, 3)):
        classify.run_classification(ClassifierConfig(data=str(comp.root), exp=exp, lr=lr, **{**CLS, "epochs": epochs}),
                                    comp)
    emb = dict(data=str(comp.root), exp="e", n_folds=2, folds="all", device="cpu")
    ecfg = EmbedderConfig(**emb, backbone="mobilenetv3_small_050", pretrained="none", image_size=32, epochs=1,
                          batch_size=4, amp=False, use_crops=False, embedding_dim=32)
    train_embedder.run_training(ecfg, comp, train_embedder.prepare_folds(ecfg, comp))
    embed.run_extraction(ExtractConfig(**emb, batch_size=16), comp)
    submit.run_retrieval(RetrievalConfig(**emb, fold_merge="concat", knn_k=10), comp)
    return comp


def ens_cfg(comp, **kw) -> EnsembleConfig:
    return EnsembleConfig(**{"data": str(comp.root), "exp": "ens", "members": "a,b", "device": "cpu", **kw})


def member_arrays(exp: str, split: str) -> dict:
    return store.load_arrays(paths.stage_dir(exp, "05") / f"{split}.npz")


def test_weights_from_oof_accuracy_and_weighted_mean(comp):
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="w"), comp)
    a, b = member_arrays("a", "oof"), member_arrays("b", "oof")
    acc = np.array([(m["probs"].argmax(1) == m["label"]).mean() for m in (a, b)])
    assert (acc > 0).all() and acc[0] != acc[1]  # the weights below are not trivially equal
    raw = (acc / acc.min()) ** 25
    w = raw / raw.sum()
    table = ensemble_stage.members_table("w", res)
    np.testing.assert_allclose(table["oof_accuracy"], acc)
    np.testing.assert_allclose(table["weight"], w, rtol=1e-12)
    assert res["weights"] == pytest.approx({"a": w[0], "b": w[1]}, abs=1e-6)
    out = ensemble_stage.stage_dir("w")
    for split in ("oof", "test"):
        pa, pb = member_arrays("a", split)["probs"], member_arrays("b", split)["probs"]
        got = store.load_arrays(out / f"{split}.npz")["probs"]
        np.testing.assert_allclose(got, w[0] * pa + w[1] * pb, rtol=1e-5, atol=1e-6)
    oof = store.load_arrays(out / "oof.npz")
    assert res["oof"]["accuracy"] == pytest.approx((oof["probs"].argmax(1) == a["label"]).mean())
    # factor 0: the plain mean; rescale keeps the raw factors (rows sum to their mean, ranks unchanged)
    ensemble_stage.run_ensemble(ens_cfg(comp, exp="plain", weight_factor=0.0), comp)
    mean = (member_arrays("a", "test")["probs"] + member_arrays("b", "test")["probs"]) / 2
    np.testing.assert_allclose(store.load_arrays(ensemble_stage.stage_dir("plain") / "test.npz")["probs"], mean,
                               rtol=1e-5, atol=1e-6)
    ensemble_stage.run_ensemble(ens_cfg(comp, exp="scaled", rescale=True), comp)
    scaled = store.load_arrays(ensemble_stage.stage_dir("scaled") / "test.npz")["probs"]
    np.testing.assert_allclose(scaled.sum(1), raw.mean(), rtol=1e-4)
    top = json.loads((paths.exp_dir("w") / "metrics.json").read_text())["ensemble"]
    assert top["oof_accuracy"] == res["oof"]["accuracy"] and top["submission"] == "w-ens2-w25"


def test_submission_name_format_and_redistribution(comp):
    res = ensemble_stage.run_ensemble(ens_cfg(comp, redistribute_k=2), comp)
    assert res["submission"] == "ens-ens2-w25-rd2"
    sub = pd.read_csv(paths.submission_path("ens-ens2-w25-rd2"), dtype=str)
    assert list(sub.columns) == ["image", "predictions"]
    assert sub["image"].tolist() == comp.test["image"].tolist()
    rows = sub["predictions"].str.split()
    assert (rows.map(len) == 5).all() and (rows.map(lambda r: len(set(r))) == 5).all()
    first = rows.str[0]
    redis = pd.read_csv(ensemble_stage.stage_dir("ens") / "redistributed.csv", dtype={"image": str, "label": str})
    assert first.tolist() == redis["label"].tolist()  # the submission answers the re-distributed label first
    probs = store.load_arrays(ensemble_stage.stage_dir("ens") / "test.npz")["probs"]
    classes = store.read_json(ensemble_stage.stage_dir("ens") / "classes.json")["classes"]
    argmax = [classes[i] for i in probs.argmax(1)]
    before, after = pd.Series(argmax).value_counts(), first.value_counts()
    below = [c for c in classes if before.get(c, 0) < 2]
    assert res["redistribute"]["classes_below_k_before"] == len(below) > 0  # something to re-distribute
    assert res["redistribute"]["moved"] == sum(f != a for f, a in zip(first, argmax, strict=True)) > 0
    assert res["redistribute"]["classes_below_k_after"] == sum(after.get(c, 0) < 2 for c in classes)
    assert all(after.get(c, 0) >= 2 for c in classes)  # 13 test images, 6 classes: every class reaches 2


def test_pseudo_label_folder_trains_and_tracks_rounds(comp):
    ensemble_stage.run_ensemble(ens_cfg(comp, exp="p0"), comp)
    test = store.load_arrays(ensemble_stage.stage_dir("p0") / "test.npz")
    top = test["probs"].max(1)
    thr = float(np.sort(top)[len(top) // 2])  # 1 epoch: near-uniform probabilities; keep the upper half
    kept_by_hand = sorted(np.asarray(test["image"])[top >= thr].tolist())
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="p1", pseudo_threshold=thr), comp)
    assert 0 < len(kept_by_hand) < len(comp.test)  # the threshold keeps some, not all
    folder = ensemble_stage.stage_dir("p1") / "pseudo_round1"
    assert res["pseudo"]["kept"] == len(kept_by_hand) and res["pseudo"]["folder"] == str(folder)
    pseudo = load_competition(folder)  # every image decodes through its link
    assert len(pseudo.train) == len(comp.train) + len(kept_by_hand)
    rows = pseudo.train[pseudo.train["round"] == "1"]
    assert sorted(rows["image"]) == kept_by_hand
    species = comp.train.drop_duplicates("individual_id").set_index("individual_id")["species"]
    assert (rows["species"] == rows["individual_id"].map(species)).all()  # species filled from the label
    assert pseudo.test["image"].tolist() == comp.test["image"].tolist()
    assert (ensemble_stage.stage_dir("p1") / "train_round1.csv").exists()
    # stage 05 trains on the folder as it is
    cfg05 = ClassifierConfig(data=str(folder), exp="p1c", lr=1e-3, **{**CLS, "folds": "0"})
    assert classify.run_classification(cfg05)["oof"]["n"] > 0
    # round 2 from the round-1 folder: round 1 is counted, round 1 cannot be written twice
    with pytest.raises(ValueError, match="already holds round 1; use pseudo_round=2"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="p2", data=str(folder), pseudo_threshold=thr), pseudo)
    ensemble_stage.run_ensemble(ens_cfg(comp, exp="p2", pseudo_threshold=thr, pseudo_round=2), pseudo)
    rounds = pd.read_csv(ensemble_stage.stage_dir("p2") / "pseudo_round2" / "pseudo_rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["n_images"].iloc[0] == len(kept_by_hand)
    r2 = load_competition(ensemble_stage.stage_dir("p2") / "pseudo_round2", check_pixels=False)
    assert set(r2.train["round"]) <= {"0", "2"}  # built on the original rows, not on round 1's


def test_label_cleaning_flags_confident_disagreements(comp):
    ensemble_stage.run_ensemble(ens_cfg(comp, exp="cl0"), comp)
    oof = store.load_arrays(ensemble_stage.stage_dir("cl0") / "oof.npz")
    conf, pred = oof["probs"].max(1), oof["probs"].argmax(1)
    wrong = pred != oof["label"]
    thr = float(np.sort(conf[wrong])[wrong.sum() // 2])  # flags the more confident half of the mistakes
    by_hand = set(np.asarray(oof["image"])[wrong & (conf >= thr)].tolist())
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="cl", clean_threshold=thr), comp)
    assert 0 < len(by_hand) < len(comp.train)
    flagged = pd.read_csv(ensemble_stage.stage_dir("cl") / "flagged.csv", dtype={"image": str})
    assert set(flagged["image"]) == by_hand and res["clean"]["flagged"] == len(by_hand)
    cleaned = load_competition(ensemble_stage.stage_dir("cl") / "cleaned", check_pixels=False)
    assert set(cleaned.train["image"]) == set(comp.train["image"]) - by_hand
    fig = ensemble_stage.plot_flagged("cl", comp, res, n=4)
    assert len([ax for ax in fig.axes if ax.images]) == min(4, len(by_hand))


def test_soups_average_the_members_fold_models(comp):
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="su", soup="uniform"), comp)
    assert res["soup"]["kept"] == {"0": ["a", "b"], "1": ["a", "b"]}
    soup = torch.load(ensemble_stage.stage_dir("su") / "soup" / "fold0.pt", weights_only=True)
    sa, sb = (torch.load(paths.stage_dir(e, "05") / "fold0" / "model.pt", weights_only=True) for e in "ab")
    key = next(k for k, v in soup.items() if v.is_floating_point() and not torch.equal(sa[k], sb[k]))
    torch.testing.assert_close(soup[key], (sa[key] + sb[key]) / 2)
    assert res["soup"]["oof"]["n"] == len(comp.train)
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="sg", soup="greedy"), comp)
    steps = pd.read_csv(ensemble_stage.stage_dir("sg") / "soup_steps.csv")
    for k, part in steps.groupby("fold"):
        assert part["candidate_score"].iloc[0] == part["candidate_score"].max()  # starts from the best run
        assert res["soup"]["kept"][str(k)][0] == part["candidate"].iloc[0]


def test_retrieval_side_matches_stage_04_and_blends(comp):
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="r", members="", embed_members="e", knn_k=10), comp)
    assert res["submission"] == "r-emb1-thrglobal"
    # one member, no blend, global threshold: stage 04 with fold_merge=concat, the same numbers
    pd.testing.assert_frame_equal(pd.read_csv(paths.submission_path("r-emb1-thrglobal")),
                                  pd.read_csv(paths.submission_path("e")))
    stage04 = store.read_json(paths.stage_dir("e", "04") / "metrics.json")
    assert res["retrieval"]["threshold"] == stage04["threshold"]
    assert res["retrieval"]["oof_map5"] == pytest.approx(stage04["oof_map5"])
    assert res["retrieval"]["map5"] == pytest.approx(stage04["map5"])
    for key in ("map5_known", "map5_new", "test_best_threshold", "test_map5_best", "test_map5_known_ranking"):
        assert res["retrieval"][key] == pytest.approx(stage04[key]), key  # what stage 04 reports, the same way
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="rb", embed_members="e", knn_k=10, blend_ratio=0.5,
                                              threshold_mode="share", new_share=0.3), comp)
    name = "rb-emb1-ens2-w25-blend0.5-thrshare0.3"
    assert res["submission"] == name
    first = pd.read_csv(paths.submission_path(name))["predictions"].str.split().str[0]
    assert (first == "new_individual").sum() == round(0.3 * len(comp.test))  # 4 of 13 answer new first
    out, ids = ensemble_stage.stage_dir("rb"), {"image": str, "individual_id": str}
    raw = pd.read_csv(paths.stage_dir("e", "04") / "test_scores.csv", dtype=ids)
    both = raw.merge(pd.read_csv(out / "retrieval_test_scores.csv", dtype=ids), on=["image", "individual_id"],
                     suffixes=("_raw", "_blend"))
    probs, classes = store.load_arrays(out / "test.npz")["probs"], store.read_json(out / "classes.json")["classes"]
    rows = both["image"].map({i: r for r, i in enumerate(comp.test["image"])})
    p = probs[rows, both["individual_id"].map(classes.index)]
    assert len(both) == len(raw)  # every retrieved candidate kept, classifier candidates added
    np.testing.assert_allclose(both["score_blend"], 0.5 * both["score_raw"] + 0.5 * p, rtol=1e-6)
    # out of fold, a query made unseen (truth new_individual) never gets its hidden individual back from the
    # classifier: candidates outside the query's gallery are dropped after blending
    truth = pd.read_csv(out / "retrieval_oof_truth.csv", dtype=ids).set_index("image")["individual_id"]
    oof = pd.read_csv(out / "retrieval_oof_scores.csv", dtype=ids)
    own = comp.train.set_index("image")["individual_id"]
    new = truth[truth == "new_individual"].index
    assert len(new) > 0 and not (oof["image"].isin(new) & (oof["individual_id"] == oof["image"].map(own))).any()
    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="rs", members="", embed_members="e", knn_k=10,
                                              threshold_mode="species", species_min_queries=1), comp)
    summary = pd.read_csv(ensemble_stage.stage_dir("rs") / "species_thresholds.csv")
    assert set(summary["species"]) == set(comp.train["species"]) and summary["own"].all()
    assert res["retrieval"]["species_thresholds"] == dict(zip(summary["species"], summary["threshold"],
                                                              strict=True))


def test_clear_errors(comp, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"member 'ghost': .*05_classifier/classes.json not found"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="x", members="a,ghost"), comp)
    other = paths.stage_dir("c", "05")
    shutil.copytree(paths.stage_dir("a", "05"), other)
    info = store.read_json(other / "classes.json")
    store.write_json(other / "classes.json", {**info, "classes": info["classes"][:-1] + ["zebra"]})
    with pytest.raises(ValueError, match=r"member 'c': .*classes.json lists other classes .*'zebra' only in 'c'"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="x", members="a,c"), comp)
    (other / "oof.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"member 'c': .*oof.npz not found"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="x", members="a,c"), comp)
    with pytest.raises(FileNotFoundError, match=r"ghost/02_embedder/folds.csv not found"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="x", embed_members="e,ghost", soup="uniform"), comp)
    with pytest.raises(ValueError, match="nothing to do"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="x", members=""), comp)
    for bad, match in ((dict(members="", pseudo_threshold=0.5), "needs a classifier ensemble"),
                       (dict(blend_ratio=0.5), "set embed_members"), (dict(soup="best"), "soup='best'"),
                       (dict(members="a,a"), "named twice"), (dict(threshold_mode="auto"), "threshold_mode")):
        with pytest.raises(ValueError, match=match):
            ens_cfg(comp, **bad)
    assert not (paths.exp_dir("x") / "06_ensemble" / "metrics.json").exists()  # failed before writing


def test_members_keep_the_out_of_fold_images_they_share_and_weight_by_balanced_accuracy():
    from common.stages.ensemble_members import Member, _keep_oof, member_weights

    def member(exp, images, labels, preds):
        probs = np.eye(2, dtype=np.float32)[preds]
        return Member(exp, ["a", "b"], "individual_id", images, probs, np.array(labels), [], probs[:0],
                      oof_own=len(images))

    # m0 predicted 4 images (labels a a a b, all answered a); m1 predicted 3 of them (one right answer each)
    m0 = member("m0", ["i1", "i2", "i3", "i4"], [0, 0, 0, 1], [0, 0, 0, 0])
    m1 = member("m1", ["i4", "i2", "i1"], [1, 0, 0], [1, 1, 0])
    kept = _keep_oof(m1, ["i1", "i2", "i4"])
    assert kept.oof_images == ["i1", "i2", "i4"] and kept.oof_label.tolist() == [0, 0, 1]
    assert kept.oof_probs.argmax(1).tolist() == [0, 1, 1]
    shared0 = _keep_oof(m0, ["i1", "i2", "i4"])
    # on the shared images: m0 accuracy 2/3, balanced (1 + 0) / 2 = 0.5; m1 accuracy 2/3, balanced (0.5 + 1) / 2
    assert shared0.oof_score() == pytest.approx(2 / 3) and kept.oof_score() == pytest.approx(2 / 3)
    assert shared0.oof_score("balanced_accuracy") == pytest.approx(0.5)
    assert kept.oof_score("balanced_accuracy") == pytest.approx(0.75)
    np.testing.assert_allclose(member_weights([shared0, kept], 2.0, "balanced_accuracy"), [1.0, 1.5 ** 2])


def test_blend_on_cosine_uses_arcface_logits_over_s(comp):
    # member "a" relabelled as an ArcFace run with s = 10: its saved logits / 10 are the cosines blended
    shutil.copytree(paths.stage_dir("a", "05"), paths.stage_dir("ac", "05"))
    for cfg_file in paths.stage_dir("ac", "05").glob("fold*/config.json"):
        meta = store.read_json(cfg_file)
        meta["config"].update(head="arcface", arc_s=10.0)
        store.write_json(cfg_file, meta)
    member = ensemble_stage.load_member("ac")
    logits = store.load_arrays(paths.stage_dir("ac", "05") / "test.npz")["logits"]
    np.testing.assert_allclose(member.test_cosine, logits / 10.0, rtol=1e-6)
    assert ensemble_stage.load_member("a").test_cosine is None  # a linear head has no cosine scale

    res = ensemble_stage.run_ensemble(ens_cfg(comp, exp="rc", members="ac", embed_members="e", knn_k=10,
                                              blend_ratio=0.5, blend_on="cosine"), comp)
    assert res["submission"] == "rc-emb1-ens1-w25-blend0.5cos-thrglobal"
    ids = {"image": str, "individual_id": str}
    raw = pd.read_csv(paths.stage_dir("e", "04") / "test_scores.csv", dtype=ids)
    both = raw.merge(pd.read_csv(ensemble_stage.stage_dir("rc") / "retrieval_test_scores.csv", dtype=ids),
                     on=["image", "individual_id"], suffixes=("_raw", "_blend"))
    rows = both["image"].map({i: r for r, i in enumerate(member.test_images)})
    cos = member.test_cosine[rows, both["individual_id"].map(member.classes.index)]
    np.testing.assert_allclose(both["score_blend"], 0.5 * both["score_raw"] + 0.5 * cos, rtol=1e-5)
    with pytest.raises(ValueError, match=r"blend_on=cosine: member\(s\) \['a'\] have a linear head"):
        ensemble_stage.run_ensemble(ens_cfg(comp, exp="rl", members="a", embed_members="e", knn_k=10,
                                            blend_ratio=0.5, blend_on="cosine"), comp)


# -- inference_only: the full run's submission from attached Kaggle sources ---------------------------------------
def attached_sources(full: list[EnsembleConfig]) -> dict[tuple[str, str], dict[str, object]]:
    """``{(kind, slug): {path inside: source file}}``: each run's weights dataset (what ``common.cli.kaggle build``
    puts in it) and the outputs of the members' inference kernels (their test predictions only)."""
    from common.cli import kaggle

    out = {("datasets", paths.weights_slug(m)): kaggle.weights_files(m, ["05"]) for m in ("a", "b")}
    out[("datasets", paths.weights_slug("e"))] = kaggle.weights_files("e", ["03", "04"])
    for cfg in full:
        out[("datasets", paths.weights_slug(cfg.exp))] = kaggle.weights_files(cfg.exp, ["06"])
    for m in ("a", "b"):
        out[("notebooks", kaggle.kernel_slug(m, "05"))] = {f"{m}/05_classifier/test.npz":
                                                           paths.stage_dir(m, "05") / "test.npz"}
    out[("notebooks", kaggle.kernel_slug("e", "03"))] = {f"e/03_embeddings/fold{k}/test.npz":
                                                         paths.stage_dir("e", "03") / f"fold{k}" / "test.npz"
                                                         for k in (0, 1)}
    return out


def fake_kaggle(root, sources: dict, layout: str, monkeypatch, leave_out: tuple[str, ...] = ()) -> None:
    """A fake /kaggle tree with ``sources`` unpacked under ``input/`` (``slug``: ``input/<slug>``; ``owner``:
    ``input/<datasets|notebooks>/tester/<slug>``), an empty ``working/``, and the environment of a kernel."""
    for (kind, slug), files in sources.items():
        if slug in leave_out:
            continue
        base = root / "input" / slug if layout == "slug" else root / "input" / kind / "tester" / slug
        for rel, src in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, base / rel)
    (root / "working").mkdir(parents=True)
    for var in ("REID_INPUT_DIR", "REID_WORKING_DIR", "REID_SUBMISSIONS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")


def test_inference_only_reproduces_the_full_run_from_attached_sources(comp, tmp_path, monkeypatch):
    import dataclasses

    full = [ens_cfg(comp, exp="inf-sp", embed_members="e", knn_k=10, blend_ratio=0.5, threshold_mode="species",
                    species_min_queries=1),  # stored per-species thresholds
            ens_cfg(comp, exp="inf-gl", members="", embed_members="e", knn_k=10),  # the stored global threshold
            ens_cfg(comp, exp="inf-cl", redistribute_k=2, pseudo_threshold=0.01)]  # classifier only, pseudo skipped
    results = {cfg.exp: ensemble_stage.run_ensemble(cfg, comp) for cfg in full}
    subs = {cfg.exp: pd.read_csv(paths.submission_path(results[cfg.exp]["submission"])) for cfg in full}
    assert "pseudo" in results["inf-cl"] and results["inf-sp"]["retrieval"]["species_thresholds"]
    sources = attached_sources(full)
    for layout in ("slug", "owner"):
        root = tmp_path / layout
        fake_kaggle(root, sources, layout, monkeypatch)
        for cfg in full:
            res = ensemble_stage.run_ensemble(dataclasses.replace(cfg, inference_only=True), comp)
            assert res["inference_only"] and "pseudo" not in res and "model soups" in res["skipped"]
            written = pd.read_csv(root / "working" / "submission.csv")  # what Kaggle scores
            pd.testing.assert_frame_equal(written, subs[cfg.exp])  # == the full run's submission
            pd.testing.assert_frame_equal(pd.read_csv(root / "working" / f"{res['submission']}.csv"), subs[cfg.exp])
            assert res.get("weights") == results[cfg.exp].get("weights")  # from the stored out-of-fold arrays
            if cfg.embed_members:
                ret, ret_full = res["retrieval"], results[cfg.exp]["retrieval"]
                assert ret["threshold"] == ret_full["threshold"]  # stored, not tuned (no out-of-fold search)
                assert ret.get("species_thresholds") == ret_full.get("species_thresholds")
        assert not (root / "working" / "inf-cl" / "06_ensemble" / "pseudo_round1").exists()  # no training folder
        assert not (root / "working" / "a").exists()  # the members were read from the attached sources only
        table = ensemble_stage.summary_table(res)
        assert table.loc["inference only", "value"].startswith("skipped: pseudo-labels, label cleaning")

    # a member's weights dataset, a member's kernel output or the full run's metrics not attached: named
    sp = dataclasses.replace(full[0], inference_only=True)
    for missing, match in (("b-weights", r"ensemble member 'b': .*b/05_classifier/classes.json not found.*"
                                         r"attach the dataset '<owner>/b-weights'"),
                           ("a-05-train-classifier", r"ensemble member 'a': .*a/05_classifier/test.npz not found"
                                                     r".*the kernel that ran stage 05_classifier of 'a'"),
                           ("inf-sp-weights", r"inf-sp/06_ensemble/metrics.json not found: inference_only takes "
                                              r"the blend ratio.*'<owner>/inf-sp-weights'")):
        fake_kaggle(tmp_path / missing, sources, "owner", monkeypatch, leave_out=(missing,))
        with pytest.raises(paths.MissingStageError, match=match):
            ensemble_stage.run_ensemble(sp, comp)
    fake_kaggle(tmp_path / "other-settings", sources, "slug", monkeypatch)
    with pytest.raises(ValueError, match=r"was written by a full run with .*blend0.5.*: run inference with"):
        ensemble_stage.run_ensemble(dataclasses.replace(sp, blend_ratio=0.3), comp)


def shared_name_comp(tmp_path):
    """A competition whose train and test both hold an ``a.jpg`` (red in train, blue in test), as Grocery's do."""
    from PIL import Image

    root = tmp_path / "comp"
    for sub, names, colour in (("train_images", ["a.jpg", "b.jpg"], "red"), ("test_images", ["a.jpg", "c.jpg"], "blue")):
        (root / sub).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (16, 16), colour).save(root / sub / name)
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "species": ["s", "s"], "individual_id": ["x", "y"]}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"image": ["a.jpg", "c.jpg"], "predictions": ["x", "x"]}).to_csv(
        root / "sample_submission.csv", index=False)
    with pytest.warns(UserWarning, match="also in train.csv"):
        return load_competition(root, check_pixels=False)


def colour(path) -> str:
    """The colour of a one-colour image (JPEG moves the values a little: the dominant channel names it)."""
    from PIL import Image

    with Image.open(path) as im:
        return ("red", "green", "blue")[int(np.argmax(im.convert("RGB").getpixel((0, 0))))]


def test_written_folder_links_each_split_to_its_own_file_when_names_are_shared(tmp_path):
    # Grocery's official splits reuse file names (train/Golden-Delicious_001.jpg is not val/Golden-Delicious_001.jpg):
    # the cleaned folder once linked the test name to the training file, so the "test" was training images.
    comp = shared_name_comp(tmp_path)

    train = comp.train.drop(columns=["path"])
    pseudo = pd.DataFrame({"image": ["c.jpg"], "species": ["s"], "individual_id": ["x"], "round": [1]})
    out = ensemble_stage.write_competition(comp, pd.concat([train.assign(round=0), pseudo]), tmp_path / "out")
    assert colour(out / "train_images" / "a.jpg") == "red"  # the training file
    assert colour(out / "test_images" / "a.jpg") == "blue"  # the test file of the same name
    assert colour(out / "train_images" / "c.jpg") == "blue"  # a pseudo-label row: the test file
    clash = pd.DataFrame({"image": ["a.jpg"], "species": ["s"], "individual_id": ["x"], "round": [1]})
    with pytest.raises(ValueError, match=r"'a.jpg' is in the new train.csv twice \(row 3\)"):
        ensemble_stage.write_competition(comp, pd.concat([train.assign(round=0), clash]), tmp_path / "bad")


def test_pseudo_labels_of_test_images_named_like_training_images_get_their_own_name(tmp_path):
    # Grocery's val images reuse the training file names: stage 06 refused every such pseudo-label ("already a
    # training image"). The clashing row is renamed pseudo<round>_<name> and linked to its test file.
    comp = shared_name_comp(tmp_path)
    cfg = EnsembleConfig(data=str(comp.root), exp="pn", members="m", pseudo_threshold=0.6)
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])  # a.jpg -> x, c.jpg -> y
    info = ensemble_stage.write_pseudo_labels(cfg, comp, probs, ["x", "y"], "individual_id", tmp_path / "out")
    assert info["kept"] == 2
    folder = Path(info["folder"])
    train = pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)
    assert train["image"].tolist() == ["a.jpg", "b.jpg", "pseudo1_a.jpg", "c.jpg"]
    assert train["test_image"].tolist() == ["", "", "a.jpg", ""]
    assert train["individual_id"].tolist() == ["x", "y", "x", "y"]

    assert colour(folder / "train_images" / "a.jpg") == "red"
    assert colour(folder / "train_images" / "pseudo1_a.jpg") == "blue"  # the test photo, not the training one
    assert colour(folder / "train_images" / "c.jpg") == "blue"
    kept = pd.read_csv(tmp_path / "out" / "pseudo_round1.csv", dtype=str, keep_default_na=False)
    assert kept["test_image"].tolist() == ["a.jpg", ""]
    # a second round, from the round-1 folder: its own names again, no clash with round 1's rows
    comp1 = load_competition(folder, check_pixels=False)
    cfg2 = dataclasses.replace(cfg, data=str(folder), pseudo_round=2)
    info2 = ensemble_stage.write_pseudo_labels(cfg2, comp1, probs, ["x", "y"], "individual_id", tmp_path / "out2")
    train2 = pd.read_csv(Path(info2["folder"]) / "train.csv", dtype=str, keep_default_na=False)
    assert train2["image"].tolist() == ["a.jpg", "b.jpg", "pseudo2_a.jpg", "c.jpg"]
    assert colour(Path(info2["folder"]) / "train_images" / "pseudo2_a.jpg") == "blue"
    # a new name that is itself a training image's name is refused, naming the test image
    taken = pd.DataFrame({"image": ["a.jpg", "pseudo1_a.jpg"], "individual_id": ["x", "y"]})
    with pytest.raises(ValueError, match="test image 'a.jpg' has a training image's name, and so has its new"):
        ensemble_stage.pseudo_names(pd.DataFrame({"image": ["a.jpg"], "individual_id": ["x"]}), taken, 1)
