"""Tests for common.data.synth: the Happywhale-shaped count distribution, the plan's shares and determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.core.store import read_json
from common.data.synth import MARKER, count_distribution, make_synth, plan_synth


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_count_distribution_matches_happywhale_figures() -> None:
    p = count_distribution()
    k = np.arange(1, len(p) + 1)
    assert len(p) == 400 and p.sum() == pytest.approx(1.0)
    assert (p * k).sum() == pytest.approx(51033 / 15587, abs=1e-3)  # mean images per individual
    assert p[:2].sum() == pytest.approx(0.60, abs=1e-3)  # share with one or two images
    assert np.all(np.diff(p) < 0)  # monotone long tail
    assert count_distribution(a=2.0, q=0.0, k_max=2).tolist() == pytest.approx([0.8, 0.2])  # 1 : 1/4


def test_plan_shape_at_happywhale_size() -> None:
    train, test = plan_synth(78989, seed=0)
    assert len(train) + len(test) == 78989
    assert len(test) == round(78989 * 27956 / 78989)  # Happywhale's test share: 27,956 test images
    per = train["individual_id"].value_counts()
    assert 14500 <= len(per) <= 16700  # Happywhale: 15,587
    assert 0.57 <= (per <= 2).mean() <= 0.63 and 0.35 <= (per == 1).mean() <= 0.42
    assert per.max() >= 50  # a long tail
    assert train["species"].nunique() == 30
    assert (test["unseen"] == ~test["individual_id"].isin(train["individual_id"])).all()
    assert test["unseen"].mean() == pytest.approx(0.2, abs=1e-3)
    images = pd.concat([train["image"], test["image"]])
    assert images.is_unique and images.str.fullmatch(r"[0-9a-f]{14}\.jpg").all()
    assert train["image"].is_monotonic_increasing and test["image"].is_monotonic_increasing
    # each individual has one species
    assert pd.concat([train, test]).groupby("individual_id")["species"].nunique().max() == 1


def test_plan_is_deterministic_per_seed() -> None:
    a_train, a_test = plan_synth(2000, seed=3)
    b_train, b_test = plan_synth(2000, seed=3)
    pd.testing.assert_frame_equal(a_train, b_train)
    pd.testing.assert_frame_equal(a_test, b_test)
    c_train, _ = plan_synth(2000, seed=4)
    assert set(a_train["image"]).isdisjoint(c_train["image"])
    with pytest.raises(ValueError, match="n_images"):
        plan_synth(5)


def test_make_synth_files_are_deterministic(tmp_path: Path) -> None:
    a = make_synth(tmp_path / "a", 60, seed=1)
    b = make_synth(tmp_path / "b", 60, seed=1)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    train, test = plan_synth(60, seed=1)
    assert pd.read_csv(a / "train.csv").equals(train[["image", "species", "individual_id"]])
    assert sorted(p.name for p in (a / "test_images").iterdir()) == test["image"].tolist()
    boxes = pd.read_csv(a / "boxes.csv")
    assert len(boxes) == 60 and boxes["image"].is_monotonic_increasing
    img = cv2.imread(str(a / "train_images" / train["image"][0]))
    assert img.shape == (72, 96, 3)
    row = boxes.set_index("image").loc[train["image"][0]]
    assert 0 <= row.xmin < row.xmax <= 96 and 0 <= row.ymin < row.ymax <= 72
    assert read_json(a / MARKER)["counts"]["train_images"] == len(train)
    assert make_synth(a, 60, seed=1) == a and _hashes(a) == ha  # same arguments: nothing redrawn
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synth(a, 61, seed=1)
    assert _hashes(make_synth(tmp_path / "c", 60, seed=2)) != ha
