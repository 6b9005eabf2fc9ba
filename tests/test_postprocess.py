"""Tests for common.lib.postprocess on hand-made tables: thresholds, pseudo-labels, cleaning, re-distribution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.lib import retrieval
from common.lib.postprocess import (
    candidate_species,
    flag_noisy_labels,
    predict_by_species,
    pseudo_label_summary,
    redistribute_labels,
    select_pseudo_labels,
    threshold_for_share,
    tune_species_thresholds,
    write_clean_table,
    write_pseudo_training_table,
)

NEW = "new_individual"


def table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image", "individual_id", "score"])


# ---------------------------------------------------------------------------------- per-species thresholds
# One candidate per query. With threshold t, a query whose candidate scores >= t ranks it first and
# new_individual second; below t new_individual comes first.
OOF = table([
    ("w1", "A", 0.6), ("w2", "B", 0.6), ("w5", "H", 0.6),  # whale, truth new: 1 at t=.7, 0.5 at t<=.5
    ("w3", "C", 0.8), ("w4", "D", 0.8),                    # whale, truth known: 1 at every t
    ("d1", "E", 0.4),                                      # dolphin, truth new: 1 at t>=.5, 0.5 at t=.3
    ("d2", "F", 0.6), ("d3", "G", 0.6),                    # dolphin, truth known: 1 at t<=.5, 0.5 at t=.7
])
TRUTH = {"w1": NEW, "w2": NEW, "w5": NEW, "w3": "C", "w4": "D", "d1": NEW, "d2": "F", "d3": "G"}
SPECIES = {"w1": "whale", "w2": "whale", "w3": "whale", "w4": "whale", "w5": "whale",
           "d1": "dolphin", "d2": "dolphin", "d3": "dolphin"}
GRID = [0.3, 0.5, 0.7]
# sums of reciprocal ranks        t=.3        t=.5      t=.7
#   whale (5 queries)             3.5         3.5       5
#   dolphin (3 queries)           2.5         3         2
#   all (8)                       6           6.5       7     -> global .7; dolphin alone -> .5


def test_species_thresholds_fall_back_below_min_queries():
    per, best, summary = tune_species_thresholds(OOF, TRUTH, SPECIES, GRID, min_queries=4)
    assert best == 0.7
    assert per == {"dolphin": 0.7, "whale": 0.7}  # dolphin has 3 < 4 queries: global
    s = summary.set_index("species")
    assert s.loc["dolphin", "own"] == False and s.loc["whale", "own"] == True  # noqa: E712
    assert s.loc["dolphin", "n_queries"] == 3
    assert s.loc["dolphin", "map5"] == pytest.approx(2 / 3)      # (1 + .5 + .5) / 3 at .7
    assert s.loc["whale", "map5"] == pytest.approx(1.0)


def test_species_thresholds_own_when_enough_queries():
    per, best, summary = tune_species_thresholds(OOF, TRUTH, SPECIES, GRID, min_queries=3)
    assert best == 0.7 and per == {"dolphin": 0.5, "whale": 0.7}
    s = summary.set_index("species")
    assert s.loc["dolphin", "map5"] == pytest.approx(1.0)          # 3 / 3 at .5
    assert s.loc["dolphin", "map5_global"] == pytest.approx(2 / 3)  # 2 / 3 at .7


def test_species_thresholds_need_a_species_per_query():
    with pytest.raises(ValueError, match="1 truth images have no species, e.g. 'd3'"):
        tune_species_thresholds(OOF, TRUTH, {k: v for k, v in SPECIES.items() if k != "d3"}, GRID)


def test_predict_by_species_uses_the_best_candidate_species():
    test = table([("t1", "A", 0.6), ("t2", "E", 0.6), ("t3", "Z", 0.62), ("t3", "A", 0.1)])
    sp = candidate_species(test, {"A": "whale", "E": "dolphin"})
    assert sp[["t1", "t2"]].tolist() == ["whale", "dolphin"] and pd.isna(sp["t3"])  # t3's best is Z: unknown
    out = predict_by_species(test, sp, {"whale": 0.7, "dolphin": 0.5}, default=0.65,
                             images=["t3", "t2", "t1"])
    assert out["image"].tolist() == ["t3", "t2", "t1"]
    assert out["threshold"].tolist() == [0.65, 0.5, 0.7]
    assert out["predictions"].tolist() == [
        f"{NEW} Z A",   # .62 < default .65
        f"E {NEW}",     # .6 >= dolphin .5
        f"{NEW} A",     # .6 < whale .7
    ]


# ---------------------------------------------------------------------------------- target share of new
SHARE_TABLE = table([("i1", "A", 0.9), ("i1", "B", 0.2), ("i2", "A", 0.5), ("i3", "C", 0.7),
                     ("i4", "D", 0.3)])
ALL = ["i1", "i2", "i3", "i4", "i5"]  # i5 has no candidate: always new


@pytest.mark.parametrize("share, threshold, achieved", [
    (0.4, 0.4, 0.4),   # best scores sorted: -inf (i5), .3, .5, .7, .9; q = 2 -> (.3 + .5) / 2
    (0.2, 0.3, 0.2),   # q = 1: only i5 is new; t = .3 keeps i4 (equal stays above)
    (0.0, 0.3, 0.2),   # q = 0 cannot be reached (i5): the lowest useful threshold
    (0.8, 0.8, 0.8),   # q = 4 -> (.7 + .9) / 2
])
def test_threshold_for_share(share, threshold, achieved):
    t, got = threshold_for_share(SHARE_TABLE, share, images=ALL)
    assert t == pytest.approx(threshold) and got == pytest.approx(achieved)
    first = retrieval.predict(SHARE_TABLE, t, images=ALL)["predictions"].str.split().str[0]
    assert (first == NEW).mean() == pytest.approx(achieved)


def test_threshold_for_share_everything_new():
    t, got = threshold_for_share(SHARE_TABLE, 1.0, images=ALL)
    assert t > 0.9 and got == 1.0


# ------------------------------------------------------------------------------------------ pseudo-labels
PROBS = np.array([[0.90, 0.05, 0.05],   # t1 -> a, 0.90 kept
                  [0.40, 0.35, 0.25],   # t2 -> a, 0.40 < 0.45 dropped
                  [0.05, 0.45, 0.50],   # t3 -> c, 0.50 kept
                  [0.20, 0.45, 0.35]])  # t4 -> b, 0.45 kept (the threshold itself is kept)
TEST_IDS, CLASSES = ["t1", "t2", "t3", "t4"], ["a", "b", "c"]


def test_select_pseudo_labels():
    got = select_pseudo_labels(PROBS, TEST_IDS, CLASSES, threshold=0.45, round_no=1)
    assert list(got.columns) == ["image", "individual_id", "confidence", "round"]
    assert got["image"].tolist() == ["t1", "t3", "t4"]
    assert got["individual_id"].tolist() == ["a", "c", "b"]
    np.testing.assert_allclose(got["confidence"], [0.9, 0.5, 0.45])
    assert (got["round"] == 1).all()
    two = pd.concat([got, select_pseudo_labels(PROBS, TEST_IDS, CLASSES, 0.6, 2)], ignore_index=True)
    summary = pseudo_label_summary(two, n_test=4)
    assert summary["round"].tolist() == [1, 2]
    assert summary["n_images"].tolist() == [3, 1] and summary["n_classes"].tolist() == [3, 1]
    np.testing.assert_allclose(summary["mean_confidence"], [(0.9 + 0.5 + 0.45) / 3, 0.9])
    np.testing.assert_allclose(summary["min_confidence"], [0.45, 0.9])
    np.testing.assert_allclose(summary["share"], [0.75, 0.25])


TRAIN = pd.DataFrame({"image": ["r1", "r2", "r3"], "species": ["whale", "whale", "dolphin"],
                      "individual_id": ["a", "a", "b"], "path": ["/x/r1", "/x/r2", "/x/r3"]})


def test_write_pseudo_training_table(tmp_path):
    pseudo = select_pseudo_labels(PROBS, TEST_IDS, CLASSES, threshold=0.45, round_no=2)
    pseudo = pseudo[pseudo["individual_id"] != "c"]  # c has no training image (no species to fill)
    path = write_pseudo_training_table(TRAIN, pseudo, tmp_path, round_no=2)
    assert path == tmp_path / "train_round2.csv"
    out = pd.read_csv(path, keep_default_na=False)
    assert out["image"].tolist() == ["r1", "r2", "r3", "t1", "t4"]
    assert out["individual_id"].tolist() == ["a", "a", "b", "a", "b"]
    assert out["species"].tolist() == ["whale", "whale", "dolphin", "whale", "dolphin"]  # from the label
    assert out["path"].tolist() == ["/x/r1", "/x/r2", "/x/r3", "", ""]  # per-image: not guessed
    assert out["round"].tolist() == [0, 0, 0, 2, 2]
    assert out["confidence"].tolist()[:3] == ["", "", ""]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_write_pseudo_training_table_one_image_per_label(tmp_path):
    # every label has one image, so `path` is (trivially) one value per label too: it is still not copied,
    # because no two rows share a path; species is shared by both rows (whale) and is copied
    train = pd.DataFrame({"image": ["r1", "r3"], "species": ["whale", "whale"], "individual_id": ["a", "b"],
                          "path": ["/x/r1", "/x/r3"]})
    pseudo = pd.DataFrame({"image": ["t1"], "individual_id": ["b"], "confidence": 0.9, "round": 1})
    out = pd.read_csv(write_pseudo_training_table(train, pseudo, tmp_path, 1), keep_default_na=False)
    assert out["species"].tolist() == ["whale", "whale", "whale"]
    assert out["path"].tolist() == ["/x/r1", "/x/r3", ""]


def test_write_pseudo_training_table_id_clash(tmp_path):
    pseudo = pd.DataFrame({"image": ["t1", "r2"], "individual_id": ["a", "b"], "confidence": 0.9, "round": 1})
    with pytest.raises(ValueError, match="pseudo row 1: image 'r2' is already a training image"):
        write_pseudo_training_table(TRAIN, pseudo, tmp_path, 1)
    dup = pd.DataFrame({"image": ["t1", "t1"], "individual_id": ["a", "b"], "confidence": 0.9, "round": 1})
    with pytest.raises(ValueError, match="pseudo row 1: image 't1' repeated"):
        write_pseudo_training_table(TRAIN, dup, tmp_path, 1)
    assert not list(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------- label cleaning
OOF_PROBS = np.array([[0.90, 0.10],   # r0 label x: agrees
                      [0.20, 0.80],   # r1 label x: predicts y at 0.80 >= 0.7 -> flagged
                      [0.60, 0.40],   # r2 label y: predicts x at 0.60 < 0.7 -> kept
                      [0.95, 0.05]])  # r3 label y: predicts x at 0.95 -> flagged
OOF_IDS = ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("labels", [["x", "x", "y", "y"], np.array([0, 0, 1, 1])])
def test_flag_noisy_labels(labels, tmp_path):
    flagged = flag_noisy_labels(OOF_PROBS, OOF_IDS, ["x", "y"], labels, threshold=0.7)
    assert flagged["image"].tolist() == ["r3", "r1"]  # most confident first
    assert flagged["label"].tolist() == ["y", "x"]
    assert flagged["predicted"].tolist() == ["x", "y"]
    np.testing.assert_allclose(flagged["confidence"], [0.95, 0.80])
    np.testing.assert_allclose(flagged["label_prob"], [0.05, 0.20])
    train = pd.DataFrame({"image": OOF_IDS, "individual_id": ["x", "x", "y", "y"]})
    clean = write_clean_table(train, flagged, tmp_path / "train_clean.csv")
    assert clean["image"].tolist() == ["r0", "r2"]
    assert pd.read_csv(tmp_path / "train_clean.csv")["image"].tolist() == ["r0", "r2"]


def test_flag_noisy_labels_bad_labels():
    with pytest.raises(ValueError, match="row 2: label 'z' is not a class"):
        flag_noisy_labels(OOF_PROBS, OOF_IDS, ["x", "y"], ["x", "x", "z", "y"], 0.7)
    with pytest.raises(ValueError, match="row 1: class index 2 out of range"):
        flag_noisy_labels(OOF_PROBS, OOF_IDS, ["x", "y"], np.array([0, 2, 1, 1]), 0.7)


# -------------------------------------------------------------------------------------- re-distribution
RD = np.array([
    #  a     b     c     d
    [0.90, 0.04, 0.03, 0.03],  # i0 -> a
    [0.80, 0.05, 0.05, 0.10],  # i1 -> a
    [0.70, 0.10, 0.05, 0.15],  # i2 -> a
    [0.55, 0.35, 0.05, 0.05],  # i3 -> a
    [0.60, 0.05, 0.30, 0.05],  # i4 -> a
    [0.10, 0.10, 0.70, 0.10],  # i5 -> c
    [0.20, 0.50, 0.25, 0.05],  # i6 -> b
])
RD_IDS = [f"i{i}" for i in range(7)]


def test_redistribute_labels_order_and_protection():
    # start a 5, b 1, c 1, d 0; k = 2 -> visit d (0), then b (1), then c (1, after b by column order)
    # d: by column d: i2 .15 (a 5 -> 4), i1 .10 (a 4 -> 3): d = 2
    # b: i6 is b already; i3 .35 (a 3 -> 2): b = 2
    # c: i5 is c; i4 .30 would drop a to 1, i6 .25 would drop b to 1, i1/i2 would drop d to 1, i3 b, i0 a:
    #    nothing can move, c stays at 1 (the reference would have taken i4 and left a below k)
    pred, moved = redistribute_labels(RD, RD_IDS, ["a", "b", "c", "d"], k=2)
    assert moved[["image", "from_label", "to_label"]].values.tolist() == [
        ["i2", "a", "d"], ["i1", "a", "d"], ["i3", "a", "b"]]
    np.testing.assert_allclose(moved["score"], [0.15, 0.10, 0.35])
    np.testing.assert_allclose(moved["from_score"], [0.70, 0.80, 0.55])
    assert pred["label"].tolist() == ["a", "d", "d", "b", "a", "c", "b"]
    assert pred["moved"].tolist() == [False, True, True, True, False, False, False]
    assert pred["label"].value_counts().to_dict() == {"a": 2, "d": 2, "b": 2, "c": 1}


def test_redistribute_labels_nothing_to_do():
    pred, moved = redistribute_labels(RD, RD_IDS, ["a", "b", "c", "d"], k=1)
    # d has 0 < 1 predictions: it takes its best image whose class keeps >= 1: i2 (.15, a 5 -> 4)
    assert moved["image"].tolist() == ["i2"]
    pred, moved = redistribute_labels(RD[:, :3], RD_IDS, ["a", "b", "c"], k=1)
    assert moved.empty and not pred["moved"].any()
    assert pred["label"].tolist() == ["a", "a", "a", "a", "a", "c", "b"]
