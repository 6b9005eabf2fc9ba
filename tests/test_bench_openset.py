"""The open-set split of bench/reid_openset.py: whole individuals held out as new, one image of about half of
the others with three or more images as known test images, deterministic."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

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


def test_open_set_split_with_a_known_share():
    bench = _bench()
    # 40 individuals with 10 images each, 5 singletons
    rows = [(f"i{k}", f"i{k}_{j}.jpg") for k in range(40) for j in range(10)]
    rows += [(f"s{k}", f"s{k}.jpg") for k in range(5)]
    table = pd.DataFrame(rows, columns=["individual_id", "image"])
    split = bench.open_set_split(table, seed=1, known_share=0.25)
    assert split.equals(bench.open_set_split(table, seed=1, known_share=0.25))
    train_ids = set(table.loc[split == "train", "individual_id"])
    test = table[split == "test"]
    new = set(test["individual_id"]) - train_ids
    assert len(new) == 9  # round(0.2 * 45)
    known = test[test["individual_id"].isin(train_ids)]
    assert not known["individual_id"].str.startswith("s").any()  # a singleton stays in train (or is new)
    eligible = table[~table["individual_id"].isin(new) & table["individual_id"].str.startswith("i")]
    assert 0.18 < len(known) / len(eligible) < 0.32  # about a quarter of their images
    kept = table[split == "train"]["individual_id"].value_counts()
    assert (kept.reindex(sorted(set(eligible["individual_id"]))) >= 1).all()  # each keeps a gallery image


def test_paired_differences_match_seeds_and_skip_missing_values():
    bench = _bench()
    imagenet = [{"seed": 0, "map5": 0.60, "map5_known": 0.30}, {"seed": 1, "map5": 0.70, "map5_known": None}]
    ssl = [{"seed": 1, "map5": 0.65, "map5_known": 0.2}, {"seed": 0, "map5": 0.62, "map5_known": 0.35},
           {"seed": 2, "map5": 0.9, "map5_known": 0.9}]  # seed 2 has no ImageNet run: left out
    assert bench.paired(imagenet, ssl, "map5") == pytest.approx([-0.05, 0.02])
    assert bench.paired(imagenet, ssl, "map5_known") == pytest.approx([0.05])  # seed 1's ImageNet value is missing


def test_ssl_params_pretrain_at_the_run_size_from_imagenet():
    bench = _bench()
    args = argparse.Namespace(dataset="nyala", tag="full", ssl="simclr", ssl_epochs=6)
    pre = bench.ssl_params(args, {"image_size": 160, "epochs": 10}, Path("/tmp/comp"))
    assert pre["exp"] == "bench-openset-nyala-full-ssl-simclr6"
    assert (pre["ssl_method"], pre["ssl_epochs"], pre["ssl_image_size"], pre["ssl_pretrained"]) == ("simclr", 6, 160, "auto")
    assert pre["data"] == "/tmp/comp" and pre["epochs"] == 10  # the run's own parameters are kept
