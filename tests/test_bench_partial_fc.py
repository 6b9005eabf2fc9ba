"""bench/partial_fc.py: the closed-set split and the table, on hand-made rows (the runs themselves need ../shared)."""

from __future__ import annotations

import pandas as pd

from bench import partial_fc as bench


def test_closed_split_takes_one_test_image_of_each_individual_with_two_or_more():
    table = pd.DataFrame({"individual_id": ["a", "a", "a", "b", "c", "c"]})
    split = bench.closed_split(table, seed=0)
    test = table[split == "test"]
    assert sorted(test["individual_id"]) == ["a", "c"]  # b has one image: it stays in train
    assert split.loc[table["individual_id"] == "b"].tolist() == ["train"]
    assert split.equals(bench.closed_split(table, seed=0))  # deterministic
    draws = {tuple(bench.closed_split(table, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the image drawn depends on the seed


def test_table_gives_mean_sd_and_each_seed():
    runs = [dict(partial_fc=n, accuracy=a, balanced_accuracy=a, top5=a + 0.1, train_s=t)
            for n, a, t in ((0, 0.5, 100), (0, 0.7, 120), (64, 0.4, 60), (64, 0.6, 80))]
    lines = bench.table(runs, n_classes=600).splitlines()
    assert lines[2].startswith("| every class (600) | 2 | 0.600 ± 0.141 (0.500, 0.700) |")
    assert lines[2].endswith("| 110 |")
    assert lines[3].startswith("| 64 classes (`partial_fc=64`) | 2 | 0.500 ± 0.141 (0.400, 0.600) |")
