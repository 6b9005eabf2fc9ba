"""The open-set split of bench/reid_openset.py: whole individuals held out as new, one image of about half of
the others with three or more images as known test images, deterministic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return importlib.import_module("bench.reid_openset")


def test_open_set_split():
    bench = _bench()
    # 20 individuals: i0..i9 with 4 images, i10..i19 with 2 images
    rows = [(f"i{k}", f"i{k}_{j}.jpg") for k in range(20) for j in range(4 if k < 10 else 2)]
    table = pd.DataFrame(rows, columns=["individual_id", "image"])
    split = bench.open_set_split(table, seed=0)
    assert split.equals(bench.open_set_split(table, seed=0))  # deterministic
    test_ids = table.loc[split == "test", "individual_id"]
    train_ids = set(table.loc[split == "train", "individual_id"])
    new = set(test_ids) - train_ids
    assert len(new) == 4  # 20% of 20 individuals, all their images in test
    for ind in new:
        assert (split[table["individual_id"] == ind] == "test").all()
    known_test = test_ids[test_ids.isin(train_ids)]
    assert known_test.is_unique  # one image each
    counts = table["individual_id"].value_counts()
    assert (counts[known_test] >= 3).all()
    eligible = [i for i in counts.index if counts[i] >= 3 and i not in new]
    assert len(known_test) == len(eligible) // 2
