"""bad_images=error|skip: unreadable images stop the run, or are listed and skipped (common.data.unreadable)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.config import ExtractConfig
from common.core import paths, store
from common.data import unreadable
from common.data.competition import DataError
from common.data.demo import TINY_DEMO, make_demo


@pytest.fixture
def broken(isolated, tmp_path_factory):
    """The tiny demo as ``inputs/broken`` with one truncated train image and one truncated test image."""
    master = make_demo(tmp_path_factory.mktemp("m") / "demo_tiny", **TINY_DEMO)
    root = shutil.copytree(master, isolated / "inputs" / "broken")
    train = pd.read_csv(root / "train.csv", dtype=str)["image"]
    test = pd.read_csv(root / "sample_submission.csv", dtype=str)["image"]
    for path in (root / "train_images" / train.iloc[2], root / "test_images" / test.iloc[4]):
        path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG, as a real detection set had
    return root, train.iloc[2], test.iloc[4]


def test_error_is_the_default(broken):
    root, bad_train, _ = broken
    with pytest.raises(DataError, match=rf"{bad_train}: unreadable or truncated image"):
        unreadable.open_checked(ExtractConfig(data=str(root), exp="e"))


def test_skip_lists_drops_train_and_keeps_test_rows(broken, capsys):
    root, bad_train, bad_test = broken
    comp = unreadable.open_checked(ExtractConfig(data=str(root), exp="e", bad_images="skip"))
    assert bad_train not in set(comp.train["image"]) and len(comp.train) == TINY_DEMO_TRAIN(root) - 1
    assert bad_test in set(comp.test["image"])  # the test image keeps its (submission) row
    placeholder = comp.test.set_index("image").loc[bad_test, "path"]
    assert np.asarray(Image.open(placeholder)).mean() == 128
    assert comp.skipped[["image", "split"]].values.tolist() == [[bad_train, "train"], [bad_test, "test"]]
    assert all("truncated" in r or "Error" in r for r in comp.skipped["reason"])
    out = capsys.readouterr().out
    assert f"skipped unreadable train image {bad_train!r} (dropped from training)" in out
    assert f"skipped unreadable test image {bad_test!r} (kept, read as a grey placeholder)" in out
    listed = store.read_json(paths.exp_dir("e") / "metrics.json")["skipped_images"]
    assert [(r["image"], r["split"]) for r in listed] == [(bad_train, "train"), (bad_test, "test")]
    assert "unreadable images skipped" in comp.summary().index
    # the second open reads the cached check (same files): same answer
    again = unreadable.open_checked(ExtractConfig(data=str(root), exp="e", bad_images="skip"))
    assert again.skipped.equals(comp.skipped)


def test_placeholders_give_each_skipped_test_image_a_crop(broken, tmp_path):
    root, _, bad_test = broken
    comp = unreadable.open_checked(ExtractConfig(data=str(root), exp="e", bad_images="skip"))
    assert bad_test not in set(unreadable.readable(comp.test, comp)["image"])
    unreadable.write_placeholders(comp, tmp_path / "crops")
    assert [p.name for p in (tmp_path / "crops").iterdir()] == [bad_test]


def test_bad_images_takes_two_words():
    with pytest.raises(ValueError, match=r"bad_images='ignore': use one of \['error', 'skip'\]"):
        ExtractConfig(bad_images="ignore")


def TINY_DEMO_TRAIN(root) -> int:  # noqa: N802
    return len(pd.read_csv(root / "train.csv"))
