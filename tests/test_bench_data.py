"""The dataset converters of bench/embedder_reid.py, checked on the real data in ../shared/datasets.

Known answers are the counts the datasets README states: lion train 75 lions / 594 images, val 19 lions /
146 images; Omniglot small1 136 characters x 20 drawers, small2 106 other characters x 20 drawers (small2's
zip holds 156 characters: its Greek and Latin, 24 + 26 characters, are small1's very files and are left out).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.competition import DataError, load_competition

pytestmark = pytest.mark.shared

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def _bench():
    return importlib.import_module("bench.embedder_reid")


@pytest.fixture(scope="module")
def bench():
    if not SHARED.is_dir():
        pytest.skip(f"real-data converters: ../shared/datasets not found ({SHARED})")
    return _bench()


def _counts(table: pd.DataFrame, split: str) -> tuple[int, int]:
    part = table[table["split"] == split]
    return len(part), part["individual_id"].nunique()


def test_lion_listing_counts(bench):
    table = bench.list_dataset("lion", SHARED)
    assert _counts(table, "fit") == (594, 75)
    assert _counts(table, "eval") == (146, 19)
    assert set(table["species"]) == {"lion"}
    # every image keeps its lion's name as its folder: the id is "<lion>__<file>"
    assert (table["image"].str.split("__").str[0] == table["individual_id"]).all()


def test_omniglot_listing_counts(bench):
    table = bench.list_dataset("omniglot", SHARED)
    fit, ev = table[table["split"] == "fit"], table[table["split"] == "eval"]
    assert _counts(table, "fit") == (136 * 20, 136)
    assert _counts(table, "eval") == (106 * 20, 106)
    # 20 drawers per character, on both sides
    assert set(fit["individual_id"].value_counts()) == {20}
    assert set(ev["individual_id"].value_counts()) == {20}
    # the species is the alphabet, the first part of the individual id
    assert (table["individual_id"].str.split("__").str[0] == table["species"]).all()
    # the alphabets small2 shares with small1 are gone from the scored part
    assert fit["species"].value_counts().to_dict() == {
        "Korean": 800, "Latin": 520, "Balinese": 480, "Greek": 480, "Early_Aramaic": 440}
    assert ev["species"].value_counts().to_dict() == {
        "Japanese_(katakana)": 940, "Sanskrit": 840, "Tagalog": 340}


def test_lion_competition_and_folds(bench, tmp_path):
    root = bench.convert("lion", tmp_path, SHARED)
    comp = load_competition(root, check_pixels=False)
    assert len(comp.train) == 594 + 146
    assert len(comp.test) == 0
    assert len(list((root / "train_images").iterdir())) == 740
    folds = bench.fold_table(comp, pd.read_csv(root / "splits.csv", dtype=str))
    assert list(folds.columns) == ["image", "individual_id", "species", "fold"]
    assert np.bincount(folds["fold"]).tolist() == [146, 594]  # fold 0 = the unseen lions
    unseen = set(folds.loc[folds["fold"] == 0, "individual_id"])
    assert len(unseen) == 19 and not unseen & set(folds.loc[folds["fold"] == 1, "individual_id"])
    # a second call reuses the converted folder (no rewrite)
    stamp = (root / "train.csv").stat().st_mtime_ns
    assert bench.convert("lion", tmp_path, SHARED) == root
    assert (root / "train.csv").stat().st_mtime_ns == stamp


def test_omniglot_competition(bench, tmp_path):
    root = bench.convert("omniglot", tmp_path, SHARED)
    comp = load_competition(root, check_pixels=False)
    assert len(comp.train) == (136 + 106) * 20
    splits = pd.read_csv(root / "splits.csv", dtype=str)
    assert splits["split"].value_counts().to_dict() == {"fit": 2720, "eval": 2120}
    # the PNG bytes are copied unchanged: the first image decodes to 105x105 black and white
    from common.data.competition import read_rgb

    pixels = read_rgb(comp.train["path"].iloc[0])
    assert pixels.shape == (105, 105, 3)
    assert set(np.unique(pixels).tolist()) <= {0, 255}


def test_missing_split_is_an_error(bench, tmp_path):
    root = bench.convert("lion", tmp_path, SHARED)
    comp = load_competition(root, check_pixels=False)
    splits = pd.read_csv(root / "splits.csv", dtype=str).iloc[1:]  # first image loses its split
    with pytest.raises(DataError, match="splits.csv.*has no fit/eval split"):
        bench.fold_table(comp, splits)


def test_missing_folder_names_it(bench, tmp_path):
    with pytest.raises(DataError, match="lion/train: folder not found"):
        bench.list_lion(tmp_path / "lion")
