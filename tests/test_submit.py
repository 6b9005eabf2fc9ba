"""Stage 04 (common.stages.retrieve_submit) on a hand-made experiment whose answers can be worked out on paper.

Embeddings are 2-d unit vectors at chosen angles, so every similarity is the cosine of an angle difference.
Fold 1's embeddings are fold 0's rotated by 90 degrees: every within-fold cosine is the same, so both folds
(and both ``fold_merge`` modes) must give the hand-computed answers, while mixing one fold's gallery with the
other's queries would not.

Training images (angle, individual, fold)::

    a1   0  A  0        a2  10  A  1
    b1  90  B  0        b2 100  B  1
    c1  45  C  0        (C has no image in fold 1: out of fold it is a new individual)

Test images (angle, truth): t1 5 A, t2 95 B, t3 45 C, t4 270 D (unseen), t5 60 A.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from common.config import RetrievalConfig
from common.core import paths, store
from common.data.competition import load_competition
from common.stages import retrieve_submit as submit

NEW = "new_individual"
EXP = "fake"
TRAIN = [  # image, individual, fold, angle; rows of train.csv in this (unsorted) order
    ("b2.png", "B", 1, 100.0),
    ("a1.png", "A", 0, 0.0),
    ("c1.png", "C", 0, 45.0),
    ("a2.png", "A", 1, 10.0),
    ("b1.png", "B", 0, 90.0),
]
TEST = {"t1.png": 5.0, "t2.png": 95.0, "t3.png": 45.0, "t4.png": 270.0, "t5.png": 60.0}
TRUTH = {"t1.png": "A", "t2.png": "B", "t3.png": "C", "t4.png": "D", "t5.png": "A"}
SAMPLE_ORDER = ["t5.png", "t1.png", "t4.png", "t2.png", "t3.png"]
COS35 = math.cos(math.radians(35))  # 0.8192: c1 against a2, the closest wrong answer


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def write_png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((8, 8, 3), value, np.uint8))


pytestmark = pytest.mark.usefixtures("isolated")


def make_comp(root, with_truth: bool = True):
    for i, (image, *_rest) in enumerate(TRAIN):
        write_png(root / "train_images" / image, 20 * i)
    for i, image in enumerate(TEST):
        write_png(root / "test_images" / image, 100 + 20 * i)
    pd.DataFrame({"image": [r[0] for r in TRAIN], "species": "whale",
                  "individual_id": [r[1] for r in TRAIN]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": SAMPLE_ORDER, "predictions": "new_individual"}).to_csv(
        root / "sample_submission.csv", index=False)
    if with_truth:
        pd.DataFrame({"image": sorted(TRUTH), "individual_id": [TRUTH[i] for i in sorted(TRUTH)]}).to_csv(
            root / "test.csv", index=False)
    return load_competition(root, check_pixels=False)


def make_experiment(comp, exp: str = EXP, folds=(0, 1)) -> None:
    """``02_embedder/folds.csv`` and ``03_embeddings/fold{k}/{train,test}.npz`` written by hand."""
    by_image = {r[0]: r for r in TRAIN}
    folds_table = pd.DataFrame(
        # rows in another order than train.csv: the stage must map them by image id
        [(image, by_image[image][1], "whale", by_image[image][2]) for image in sorted(by_image)],
        columns=["image", "individual_id", "species", "fold"],
    )
    store.write_csv(paths.stage_dir(exp, "02") / "folds.csv", folds_table)
    for k in folds:
        rotate = 90.0 * k
        train = np.array([unit(by_image[i][3] + rotate) for i in comp.train["image"]], np.float32)
        test = np.array([unit(TEST[i] + rotate) for i in comp.test["image"]], np.float32)
        folder = paths.stage_dir(exp, "03") / f"fold{k}"
        store.save_arrays(folder / "train.npz", comp.train["image"], embeddings=train)
        store.save_arrays(folder / "test.npz", comp.test["image"], embeddings=test)


def cfg_for(**overrides) -> RetrievalConfig:
    return RetrievalConfig(**{**dict(exp=EXP, n_folds=2, folds="all", knn_k=50, oof_new_share=0.0), **overrides})


@pytest.fixture
def comp(tmp_path):
    return make_comp(tmp_path / "comp")


# Threshold 0.82 (tuned): every candidate at or above it ranks before new_individual.
EXPECTED_082 = {
    "t5.png": "C B new_individual A",  # C cos15=.966, B cos30=.866, A cos50=.643 -> A at rank 4
    "t1.png": "A new_individual C B",  # A cos5=.996, C cos40=.766, B cos85=.087
    "t4.png": "new_individual A C B",  # A cos270=0, C cos225=-.707, B cos170=-.985
    "t2.png": "B new_individual C A",  # B cos5, C cos50=.643, A cos85
    "t3.png": "C new_individual A B",  # C 1, A cos35=.819 (just below .82), B cos45=.707
}


@pytest.mark.parametrize("fold_merge", ["mean", "concat"])
def test_run_retrieval_known_answers(comp, fold_merge):
    make_experiment(comp)
    result = submit.run_retrieval(cfg_for(fold_merge=fold_merge), comp)

    # out-of-fold truth: c1's individual C has no image in fold 1, so it is new_individual
    assert result.oof_truth.to_dict() == {"a1.png": "A", "b1.png": "B", "c1.png": NEW,  # fold 0 queries
                                          "a2.png": "A", "b2.png": "B"}  # fold 1 queries
    c1 = result.oof_scores[result.oof_scores["image"] == "c1.png"].set_index("individual_id")["score"]
    assert c1.to_dict() == pytest.approx({"A": COS35, "B": math.cos(math.radians(55))}, abs=1e-6)

    # sweep: below cos35 c1 ranks new_individual second (0.5); from 0.82 to 0.98 all five are right;
    # at 1.0 the four known images rank their individual second (0.5 each) and c1 is right
    sweep = result.sweep.set_index(result.sweep["threshold"].round(2))
    assert sweep.loc[0.80, "map5"] == pytest.approx((4 + 0.5) / 5)
    assert sweep.loc[0.80, "map5_new"] == pytest.approx(0.5)
    assert sweep.loc[0.82, "map5"] == pytest.approx(1.0)
    assert sweep.loc[0.98, "map5"] == pytest.approx(1.0)  # cos10 = .985 still clears it
    assert sweep.loc[1.00, "map5"] == pytest.approx((4 * 0.5 + 1) / 5)
    assert sweep.loc[1.00, "new_share"] == pytest.approx(1.0)
    assert result.threshold == pytest.approx(0.82)  # the lowest of the best thresholds

    sub = pd.read_csv(paths.submission_path(EXP))
    assert sub["image"].tolist() == SAMPLE_ORDER
    assert dict(zip(sub["image"], sub["predictions"], strict=True)) == EXPECTED_082
    pd.testing.assert_frame_equal(sub, result.submission)

    expected = {
        "exp": EXP, "threshold": pytest.approx(0.82), "threshold_tuned": True,
        "new_share": pytest.approx(0.2),  # t4 only
        "oof_map5": pytest.approx(1.0), "folds": [0, 1], "fold_merge": fold_merge, "n_test": 5,
        "test_folds": [0, 1],  # full_fit off: the folds answer the test
        "map5": pytest.approx((1 + 1 + 1 + 1 + 0.25) / 5),  # t5's A at rank 4 -> 1/4
        "map5_known": pytest.approx((1 + 1 + 1 + 0.25) / 4), "map5_new": pytest.approx(1.0),
        "n": 5, "n_known": 4, "n_new": 1, "top1": pytest.approx(0.8),
        # new_individual first for every image, out of fold: the sweep's 1.0 row -> (4 * 0.5 + 1) / 5
        "oof_map5_all_new": pytest.approx(0.6), "all_new_chosen": False,
        "n_labelled": 5, "n_unlabelled": 0,
        # the best threshold on the test itself: at or below cos50 = .643 t5's A ranks 3rd (1/3), not 4th
        "test_best_threshold": pytest.approx(0.0), "test_map5_best": pytest.approx((4 + 1 / 3) / 5),
        "test_map5_all_new": pytest.approx((0.5 + 0.5 + 0.5 + 1 + 0.25) / 5),
        # the four known images ranked without new_individual: t1-t3 first, t5's A third
        "test_map5_known_ranking": pytest.approx((1 + 1 + 1 + 1 / 3) / 4),
        "oof_true_new_share": pytest.approx(0.2),  # c1 of 5 out-of-fold queries
        # 4 known and 1 new out-of-fold queries, 5 test queries: too few to trust the estimate
        # the four known queries' top-1 is cos10, c1's (new) cos35: perfectly separated
        "estimate_reliable": False, "oof_known_new_auc": pytest.approx(1.0), "tuned_for_new_share": None, "tuned_for_new_share_source": "minimax",
        # minimax: from 0.82 to 0.98 every query is right, no regret at any share; the lowest of them wins
        "oof_objective": pytest.approx(0.0), "oof_objective_all_new": pytest.approx(-0.45),
    }
    estimate = result.metrics.pop("test_new_share_estimate")
    assert 0.0 <= estimate <= 1.0
    assert result.metrics == expected
    assert store.read_json(paths.exp_dir(EXP) / "metrics.json") == {**expected, "test_new_share_estimate": estimate}
    out = paths.stage_dir(EXP, "04")
    assert store.read_json(out / "metrics.json") == {**expected, "test_new_share_estimate": estimate}
    for name in ("oof_scores.csv", "oof_truth.csv", "threshold_sweep.csv", "test_scores.csv", "_done.json"):
        assert (out / name).exists(), name
    truth_csv = pd.read_csv(out / "oof_truth.csv")
    written = dict(zip(truth_csv["image"], truth_csv["individual_id"], strict=True))
    assert written == result.oof_truth.to_dict()


def test_fixed_threshold_is_used_as_given(comp):
    make_experiment(comp)
    result = submit.run_retrieval(cfg_for(new_threshold=0.5), comp)
    assert result.threshold == 0.5
    assert dict(zip(result.submission["image"], result.submission["predictions"], strict=True)) == {
        "t5.png": "C B A new_individual",  # all three >= .5: A at rank 3
        "t1.png": "A C new_individual B",
        "t4.png": "new_individual A C B",
        "t2.png": "B C new_individual A",
        "t3.png": "C A B new_individual",
    }
    m = result.metrics
    assert m["threshold"] == 0.5 and m["threshold_tuned"] is False
    assert m["oof_map5"] == pytest.approx((4 + 1 / 3) / 5)  # c1 -> "A B new_individual": 1/3
    assert m["map5"] == pytest.approx((4 + 1 / 3) / 5)  # t5 -> A at rank 3


def test_missing_fold_is_left_out_and_reported(comp):
    make_experiment(comp, folds=(0,))
    result = submit.run_retrieval(cfg_for(), comp)  # folds="all" asks for 0 and 1; only 0 exists
    assert result.metrics["folds"] == [0]
    assert set(result.oof_truth.index) == {"a1.png", "b1.png", "c1.png"}  # fold 0's images only
    assert result.metrics["map5"] == pytest.approx(0.85)


def test_no_embeddings_is_a_clear_error(comp):
    with pytest.raises(FileNotFoundError, match="03_embeddings: run stage 03 first"):
        submit.run_retrieval(cfg_for(), comp)


def test_wrong_row_order_is_caught(comp):
    make_experiment(comp)
    folder = paths.stage_dir(EXP, "03") / "fold0"
    emb = store.load_arrays(folder / "test.npz")
    store.save_arrays(folder / "test.npz", emb["image"][::-1], embeddings=emb["embeddings"][::-1])
    with pytest.raises(ValueError, match=r"fold0.test\.npz: row 0 is image"):
        submit.run_retrieval(cfg_for(), comp)


def test_plot_examples_with_and_without_truth(comp, tmp_path):
    make_experiment(comp)
    cfg = cfg_for(n_examples=4)
    fig = submit.plot_examples(cfg, comp, submit.run_retrieval(cfg, comp))
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.images]) >= 4  # query tiles and gallery tiles drawn

    no_truth = make_comp(tmp_path / "comp_no_truth", with_truth=False)
    assert no_truth.truth is None
    make_experiment(no_truth, exp="fake2")
    cfg2 = dataclasses.replace(cfg, exp="fake2")
    result = submit.run_retrieval(cfg2, no_truth)
    assert "map5" not in result.metrics and result.metrics["oof_map5"] == pytest.approx(1.0)
    fig2 = submit.plot_examples(cfg2, no_truth, result)  # falls back to out-of-fold queries
    assert isinstance(fig2, Figure)


def test_hide_individuals_reaches_the_target_share():
    # queries: a x3, b x1, c x1, d x5 (10 images); d is naturally unseen (not in the gallery) -> 5/10 new
    valid = pd.Series(["a", "a", "a", "b", "c", "d", "d", "d", "d", "d"])
    gallery = pd.Series(["a", "b", "c", "x"])
    assert submit.hide_individuals(valid, gallery, 0.5, seed=0) == set()  # 5/10 already new
    assert submit.hide_individuals(valid, gallery, 0.0, seed=0) == set()
    hidden = submit.hide_individuals(valid, gallery, 0.6, seed=0)  # needs one more new image
    assert len(hidden) == 1 and hidden <= {"a", "b", "c"}
    new_images = 5 + valid.isin(hidden).sum()
    assert new_images >= 6
    everything = submit.hide_individuals(valid, gallery, 1.0, seed=0)  # all 10 queries new
    assert everything == {"a", "b", "c"}
    # deterministic for a seed
    assert submit.hide_individuals(valid, gallery, 0.6, seed=3) == submit.hide_individuals(valid, gallery, 0.6, seed=3)


def test_test_csv_covering_part_of_the_test_set_is_scored_on_labelled_images_only(tmp_path):
    comp = make_comp(tmp_path / "part")
    partial = {"t1.png": "A", "t4.png": "D"}  # 2 of the 5 test images are labelled
    pd.DataFrame({"image": list(partial), "individual_id": list(partial.values())}).to_csv(
        comp.root / "test.csv", index=False)
    comp = load_competition(comp.root, check_pixels=False)
    make_experiment(comp)
    metrics = submit.run_retrieval(cfg_for(), comp).metrics
    # threshold 0.82: t1 "A new_individual C B" (1), t4 "new_individual A C B" (1); the others are not scored
    assert metrics["n"] == 2 and metrics["n_labelled"] == 2 and metrics["n_unlabelled"] == 3
    assert metrics["map5"] == pytest.approx(1.0)
    assert metrics["n_known"] == 1 and metrics["n_new"] == 1


def test_threshold_never_below_all_new_out_of_fold(comp):
    make_experiment(comp)
    # a grid whose only thresholds are 0.0 and 0.1: c1 (new, A at cos35) ranks new_individual second -> 4.5/5 = 0.9;
    # all new_individual scores 0.6, so the grid's best wins
    result = submit.run_retrieval(cfg_for(threshold_max=0.1, threshold_step=0.1, share_policy="oof"), comp)
    assert result.threshold == pytest.approx(0.0) and not result.metrics["all_new_chosen"]
    # with test_new_share=1 only the new queries count: all-new scores 1 (c1 right) and beats every threshold <= 0.1
    forced = submit.run_retrieval(cfg_for(threshold_max=0.1, threshold_step=0.1, test_new_share=1.0, force=True),
                                  comp)
    assert forced.threshold == submit.ALL_NEW and forced.metrics["all_new_chosen"]
    assert forced.metrics["oof_objective"] == pytest.approx(1.0)
    assert forced.metrics["oof_objective_all_new"] == pytest.approx(1.0)
    assert (forced.submission["predictions"].str.split().str[0] == NEW).all()


def test_tune_reweights_the_sweep_to_the_share_passed(comp):
    make_experiment(comp)
    oof, truth = submit.oof_scores(cfg_for(), comp, [0, 1])
    plain, sweep = submit.tune(cfg_for(), oof, truth)
    assert plain == pytest.approx(0.82) and sweep["objective"].equals(sweep["map5"])
    # share 1: only c1 (new) counts; it is right from 0.82 up, and all-new too: the lowest best threshold wins
    all_new_only, sweep1 = submit.tune(cfg_for(), oof, truth, share=1.0)
    assert all_new_only == pytest.approx(0.82)
    assert sweep1["objective"].to_numpy() == pytest.approx(sweep1["map5_new"].fillna(0).to_numpy())
    # share 0: only the four known queries count; they are right at every threshold up to cos10: 0.0 wins
    known_only, _ = submit.tune(cfg_for(), oof, truth, share=0.0)
    assert known_only == pytest.approx(0.0)
    # the share passed wins over test_new_share; NaN falls back to it
    assert submit.tune(cfg_for(test_new_share=0.0), oof, truth, share=float("nan"))[0] == pytest.approx(0.0)


def test_leave_self_out_by_hand():
    angles = [0.0, 10.0, 20.0, 90.0]
    gallery = np.array([unit(a) for a in angles], np.float32)
    ids = np.array(["g0", "g1", "g2", "g3"])
    queries = np.array([unit(0.0), unit(45.0)], np.float32)
    scores, idx = submit.leave_self_out(gallery, queries, ids, np.array(["g0", "outsider"]), k=2)
    # g0 is its own best match and is dropped; the outsider (45 deg) keeps its two best, g2 (25) and g1 (35)
    assert idx.tolist() == [[1, 2], [2, 1]]
    assert scores[0] == pytest.approx([math.cos(math.radians(10)), math.cos(math.radians(20))], abs=1e-6)
    assert scores[1] == pytest.approx([math.cos(math.radians(25)), math.cos(math.radians(35))], abs=1e-6)


def test_oof_gallery_all_is_every_other_training_image(comp):
    make_experiment(comp)
    table = submit.read_folds(EXP)
    emb = submit.load_fold_embeddings(EXP, 0, "train", comp.train["image"])
    scores, truth, known = submit.fold_oof_scores(cfg_for(oof_gallery="all"), emb, comp.train["image"], table, 0)
    got = {(r.image, r.individual_id): r.score for r in scores.itertuples()}
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    # fold 0's queries a1 (0), c1 (45), b1 (90) against all five images but themselves: fold 0's own images
    # are gallery too (c1 is a candidate of a1 and b1); c1 has no other image, so it is new
    assert got == pytest.approx({
        ("a1.png", "A"): cos(10), ("a1.png", "C"): cos(45), ("a1.png", "B"): cos(90),
        ("c1.png", "A"): cos(35), ("c1.png", "B"): cos(45),
        ("b1.png", "B"): cos(10), ("b1.png", "C"): cos(45), ("b1.png", "A"): cos(80),
    }, abs=1e-6)
    assert truth.to_dict() == {"a1.png": "A", "c1.png": NEW, "b1.png": "B"}
    assert known == {"A", "B", "C"}
    # the default gallery is the other fold only: no C candidates
    fold_scores, fold_truth, _ = submit.fold_oof_scores(cfg_for(), emb, comp.train["image"], table, 0)
    assert set(fold_scores["individual_id"]) == {"A", "B"} and fold_truth.to_dict() == truth.to_dict()
