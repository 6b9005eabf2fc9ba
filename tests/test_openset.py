"""Open-set validation: a fold's new individuals are left out of its training (stage 02's fold table and
``fold_split``), the test's new share estimated from its scores, and sweeps re-weighted to a share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import isolate_dirs

from common.config import EmbedderConfig
from common.data.artefacts import fold_split
from common.data.competition import load_competition
from common.data.demo import make_demo
from common.lib import openset
from common.stages.train_embedder import prepare_folds


def test_choose_new_individuals_by_hand():
    # fold 0 holds 4 images: A (2 images, also in fold 1), B (1, also in fold 1), C (1, only in fold 0: new
    # anyway). share 0.5 -> 2 of 4 must be new: C gives 1, so one of A, B is chosen (both in the other fold).
    ids = ["A", "A", "B", "C", "A", "B", "D", "D"]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    new_fold = openset.choose_new_individuals(ids, folds, 0.5, seed=0)
    chosen0 = {i for i, f in zip(ids, new_fold, strict=True) if f == 0}
    assert chosen0 in ({"A"}, {"B"})
    # an individual is new in one fold at most, and every one of its images carries that fold
    for ind in set(ids):
        assert len({f for i, f in zip(ids, new_fold, strict=True) if i == ind}) == 1
    assert (openset.choose_new_individuals(ids, folds, 0.0, seed=0) == -1).all()
    with pytest.raises(ValueError, match="oof_new_share=1.0"):
        openset.choose_new_individuals(ids, folds, 1.0, seed=0)


@pytest.fixture
def comp(tmp_path, monkeypatch):
    isolate_dirs(tmp_path, monkeypatch)
    root = make_demo(tmp_path / "demo_open", n_individuals=14, n_unseen=2, images_per_individual=(3, 6),
                     image_size=(64, 48), seed=3)
    return load_competition(root, check_pixels=False)


def test_a_folds_new_individuals_are_absent_from_its_training(comp):
    cfg = EmbedderConfig(data=str(comp.root), exp="open", n_folds=3, folds="all", oof_new_share=0.3)
    table = prepare_folds(cfg, comp)
    assert set(table.columns) >= {"image", "individual_id", "fold", "new_fold"}
    for k in range(3):
        fit, valid, _ = fold_split(cfg, comp, table, k)
        new_k = set(table.loc[table["new_fold"] == k, "individual_id"])
        assert new_k, f"fold {k}: no individual treated as new"
        assert not new_k & set(fit["individual_id"]), f"fold {k} trains on its new individuals"
        assert new_k <= set(valid["individual_id"])  # and they are among its queries
        # about 30% of the fold's queries are strangers to its model (later folds may run short of candidates)
        share = (~valid["individual_id"].isin(set(fit["individual_id"]))).mean()
        assert 0.2 <= share <= 0.6, share
    # the plain split (no new_fold column) trains on every individual of the other folds
    fit0, _, _ = fold_split(cfg, comp, table.drop(columns="new_fold"), 0)
    assert set(table.loc[table["new_fold"] == 0, "individual_id"]) <= set(fit0["individual_id"])


def test_estimate_new_share_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    known, new = rng.normal(0.8, 0.05, 2000), rng.normal(0.5, 0.08, 2000)
    for share in (0.2, 0.5):
        n_new = int(share * 1000)
        test = np.concatenate([rng.normal(0.5, 0.08, n_new), rng.normal(0.8, 0.05, 1000 - n_new)])
        assert openset.estimate_new_share(known, new, test) == pytest.approx(share, abs=0.04)
    assert np.isnan(openset.estimate_new_share(known, np.array([]), known))


def test_share_sweep_and_top1_by_hand():
    sweep = pd.DataFrame({"threshold": [0.1, 0.5], "map5_known": [0.9, 0.6], "map5_new": [0.2, 1.0]})
    assert openset.share_sweep(sweep, 0.25).tolist() == pytest.approx([0.725, 0.7])
    table = pd.DataFrame({"image": ["a", "a", "b"], "individual_id": ["X", "Y", "X"], "score": [0.3, 0.7, 0.1]})
    assert openset.top1_scores(table, ["b", "a", "c"]).tolist() == [0.1, 0.7, -1.0]
    with pytest.raises(ValueError, match="test_new_share=1.5"):
        openset.share_sweep(sweep, 1.5)


def test_stage_04_hides_individuals_itself_when_stage_02_left_none_out():
    # A fold table whose new_fold marks nobody (stage 02 with oof_new_share=0) must not leave stage 04 without
    # simulated strangers: it then hides oof_new_share of the individuals from the gallery itself.
    from common.config import RetrievalConfig
    from common.stages.retrieve_submit import fold_oof_scores

    ids = [f"ind{i // 2}" for i in range(40)]  # 20 individuals, 2 images each, one in each fold
    table = pd.DataFrame({"image": [f"im{i}.jpg" for i in range(40)], "individual_id": ids,
                          "fold": [i % 2 for i in range(40)], "new_fold": -1})
    emb = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cfg = RetrievalConfig(exp="x", knn_k=5, oof_new_share=0.5)
    _, truth, gallery = fold_oof_scores(cfg, emb, table["image"], table, 0)
    assert (truth == cfg.new_label).mean() >= 0.3 and len(gallery) < 20
    marked = table.assign(new_fold=[0 if i in ("ind0", "ind1") else -1 for i in ids])
    _, truth, gallery = fold_oof_scores(cfg, emb, marked["image"], marked, 0)
    assert set(truth[truth == cfg.new_label].index) == {"im0.jpg", "im2.jpg"} and len(gallery) == 18


def test_estimate_reliable_needs_enough_queries_on_every_side_and_separation():
    assert openset.estimate_reliable(20, 20, 50)
    assert not openset.estimate_reliable(19, 20, 50)
    assert not openset.estimate_reliable(20, 19, 50)
    assert not openset.estimate_reliable(20, 20, 49)
    assert openset.estimate_reliable(20, 20, 50, auc=0.65)
    assert not openset.estimate_reliable(20, 20, 50, auc=0.64)
    assert not openset.estimate_reliable(20, 20, 50, auc=float("nan"))


def test_separation_by_hand_and_against_sklearn():
    # known 0.9, 0.5; new 0.5, 0.1: pairs (k > n) = (.9,.5) (.9,.1) (.5,.1) = 3, one tie (.5,.5) = 0.5 -> 3.5 / 4
    assert openset.separation(np.array([0.9, 0.5]), np.array([0.5, 0.1])) == pytest.approx(0.875)
    assert openset.separation(np.array([0.1]), np.array([0.9])) == 0.0
    assert np.isnan(openset.separation(np.array([]), np.array([0.9])))
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    known, new = rng.normal(0.7, 0.1, 300).round(2), rng.normal(0.6, 0.1, 200).round(2)  # rounded: many ties
    labels = np.r_[np.ones(300), np.zeros(200)]
    assert openset.separation(known, new) == pytest.approx(roc_auc_score(labels, np.r_[known, new]))


def test_kernel_density_matches_scipy_and_integrates_to_one():
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(2)
    sample = rng.normal(0.5, 0.1, 400)
    grid = np.linspace(-0.5, 1.5, 4001)
    dens = openset.kernel_density(sample, grid)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    iqr = np.subtract(*np.percentile(sample, [75, 25])) / 1.34
    h = 0.9 * min(np.std(sample), iqr) * 400 ** -0.2
    ref = gaussian_kde(sample, bw_method=h / np.std(sample, ddof=1))(grid)
    assert dens == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_kernel_density_on_many_points_interpolates_a_grid_within_its_bound():
    rng = np.random.default_rng(3)
    sample = rng.normal(0.5, 0.1, 2000)
    at = np.sort(rng.uniform(0.2, 0.8, 3 * openset.GRID_POINTS))
    exact = np.concatenate([openset.kernel_density(sample, at[i : i + 4000]) for i in range(0, len(at), 4000)])
    fast = openset.kernel_density(sample, at)
    # the bound: (step / h)^2 / 8 of a kernel's peak, with step <= h / 8
    assert np.abs(fast - exact).max() <= exact.max() / 64 / 8
    assert not np.array_equal(fast, exact)  # the grid was used
    # a grid too coarse for the bandwidth (points spread far wider than the sample): exact
    wide = np.linspace(-50, 50, openset.GRID_POINTS + 1)
    assert openset.kernel_density(sample, wide) == pytest.approx(
        np.concatenate([openset.kernel_density(sample, wide[:4000]), openset.kernel_density(sample, wide[4000:])]))


def test_share_for_tuning_given_then_estimated_then_oof():
    from common.config import RetrievalConfig
    from common.stages.retrieve_submit import share_for_tuning

    good = {"test_new_share_estimate": 0.6, "estimate_reliable": True}
    assert share_for_tuning(RetrievalConfig(test_new_share=0.3), good) == (0.3, "given")
    assert share_for_tuning(RetrievalConfig(test_new_share=0.3, share_policy="oof"), good) == (0.3, "given")
    assert share_for_tuning(RetrievalConfig(), good) == (0.6, "estimated")
    assert share_for_tuning(RetrievalConfig(share_policy="oof"), good) == (None, "oof")
    assert share_for_tuning(RetrievalConfig(share_policy="minimax"), good) == (None, "minimax")
    assert share_for_tuning(RetrievalConfig(), {**good, "estimate_reliable": False}) == (None, "minimax")
    assert share_for_tuning(RetrievalConfig(), {**good, "test_new_share_estimate": None}) == (None, "minimax")


def test_max_regret_by_hand():
    sweep = pd.DataFrame({"threshold": [0.1, 0.2, 0.3], "map5_known": [0.9, 0.6, 0.8], "map5_new": [0.2, 1.0, 0.6]})
    # share 0.1: objectives .83 .64 .78 -> regrets 0 .19 .05; share 0.9: .27 .96 .62 -> regrets .69 0 .34
    assert openset.max_regret(sweep).tolist() == pytest.approx([0.69, 0.19, 0.34])
    assert openset.max_regret(sweep, (0.1, 0.1)).tolist() == pytest.approx([0.0, 0.19, 0.05])
    with pytest.raises(ValueError, match="minimax shares"):
        openset.max_regret(sweep, (0.9, 0.1))


def test_the_full_model_trains_on_every_image_and_every_individual(comp):
    cfg = EmbedderConfig(data=str(comp.root), exp="open", n_folds=3, folds="1", oof_new_share=0.3, full_fit=True)
    assert cfg.model_folds() == [1, 3] and EmbedderConfig(n_folds=3, folds="1").model_folds() == [1]
    table = prepare_folds(cfg, comp)
    fit, valid, _ = fold_split(cfg, comp, table, 3)
    assert sorted(fit["image"]) == sorted(table["image"])  # the individuals new in every fold included
    # the loss is monitored on the first requested fold's validation part, which the full model also trains on
    assert sorted(valid["image"]) == sorted(table.loc[table["fold"] == 1, "image"])
    # without full_fit, fold n_folds does not exist
    with pytest.raises(Exception, match="fold 3"):
        fold_split(EmbedderConfig(data=str(comp.root), exp="open", n_folds=3, folds="1"), comp, table, 3)
