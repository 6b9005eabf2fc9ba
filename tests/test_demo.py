"""Tests for common.data.demo: layout, determinism, exact boxes, unseen share, markers and atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.core.store import read_json
from common.data import demo
from common.data.demo import (
    MARKER,
    TINY_DEMO,
    animal_template,
    ensure_demo,
    make_demo,
    plan_demo,
    render_image,
)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("tiny") / "demo_tiny", **TINY_DEMO)


def test_plan_default_counts_and_unseen_share() -> None:
    train, test = plan_demo()
    assert list(train.columns) == ["image", "species", "individual_id"]
    assert list(test.columns) == ["image", "species", "individual_id", "unseen"]
    assert train["individual_id"].nunique() == 48  # 60 - 12 unseen
    assert test["individual_id"].nunique() == 60  # every individual has 1-2 test images
    assert set(train["species"]) == {"humpback_whale", "bottlenose_dolphin", "blue_whale"}
    per_ind = train["individual_id"].value_counts()
    assert per_ind.between(4, 8).all() and test["individual_id"].value_counts().between(1, 2).all()
    # unseen flag == "not in train", and about a fifth of the test images
    assert (test["unseen"] == ~test["individual_id"].isin(train["individual_id"])).all()
    assert 0.12 <= test["unseen"].mean() <= 0.28
    # the 12 unseen individuals are spread over the 3 species (4 each)
    assert test[test["unseen"]].groupby("species")["individual_id"].nunique().tolist() == [4, 4, 4]
    images = pd.concat([train["image"], test["image"]])
    assert images.is_unique and images.str.fullmatch(r"[0-9a-f]{14}\.jpg").all()
    assert train["image"].is_monotonic_increasing and test["image"].is_monotonic_increasing


def test_plan_depends_on_seed_and_rejects_bad_arguments() -> None:
    a, _ = plan_demo(seed=0)
    b, _ = plan_demo(seed=1)
    assert set(a["image"]).isdisjoint(b["image"]) and set(a["individual_id"]).isdisjoint(b["individual_id"])
    with pytest.raises(ValueError, match="n_unseen"):
        plan_demo(n_individuals=5, n_unseen=5)
    with pytest.raises(ValueError, match="images_per_individual"):
        plan_demo(images_per_individual=(3, 2))
    with pytest.raises(ValueError, match="test_per_individual"):
        plan_demo(test_per_individual=(0, 2))
    with pytest.raises(ValueError, match="n_species"):
        plan_demo(n_species=5)


def test_layout_and_columns(tiny: Path) -> None:
    train = pd.read_csv(tiny / "train.csv")
    test = pd.read_csv(tiny / "test.csv")
    sub = pd.read_csv(tiny / "sample_submission.csv")
    boxes = pd.read_csv(tiny / "boxes.csv")
    assert list(train.columns) == ["image", "species", "individual_id"]
    assert list(test.columns) == ["image", "individual_id"]
    assert list(sub.columns) == ["image", "predictions"]
    assert list(boxes.columns) == ["image", "xmin", "ymin", "xmax", "ymax"]
    plan_train, plan_test = plan_demo(**{k: v for k, v in TINY_DEMO.items() if k != "image_size"})
    pd.testing.assert_frame_equal(train, plan_train)
    pd.testing.assert_frame_equal(test, plan_test[["image", "individual_id"]])
    assert train["individual_id"].nunique() == 6 and test["individual_id"].nunique() == 8
    # sample submission: the test images in test.csv order, five ids starting with new_individual
    assert sub["image"].tolist() == test["image"].tolist()
    preds = sub["predictions"].str.split(" ")
    assert (preds.str.len() == 5).all() and (preds.str[0] == "new_individual").all()
    assert set(preds.iloc[0][1:]) <= set(train["individual_id"])
    # one box per train and test image, and every image file is a 160x120 JPEG
    assert sorted(boxes["image"]) == sorted([*train["image"], *test["image"]])
    for folder, table in (("train_images", train), ("test_images", test)):
        assert sorted(p.name for p in (tiny / folder).iterdir()) == sorted(table["image"])
        img = cv2.imread(str(tiny / folder / table["image"].iloc[0]))
        assert img.shape == (120, 160, 3)
    marker = read_json(tiny / MARKER)
    assert marker["args"]["image_size"] == [160, 120] and marker["counts"]["train_images"] == len(train)
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temp folder left over


def test_deterministic_bytes(tmp_path: Path, tiny: Path) -> None:
    again = make_demo(tmp_path / "again", **TINY_DEMO)
    assert _hashes(again) == _hashes(tiny)
    other = make_demo(tmp_path / "other", **{**TINY_DEMO, "seed": 1})
    assert _hashes(other) != _hashes(tiny)


def test_boxes_in_bounds_and_enclose_animal(tiny: Path) -> None:
    boxes = pd.read_csv(tiny / "boxes.csv")
    assert (boxes["xmin"] >= 0).all() and (boxes["ymin"] >= 0).all()
    assert (boxes["xmax"] <= 160).all() and (boxes["ymax"] <= 120).all()
    assert (boxes["xmax"] > boxes["xmin"]).all() and (boxes["ymax"] > boxes["ymin"]).all()
    widths = (boxes["xmax"] - boxes["xmin"]) / 160
    assert widths.min() >= 0.05 and widths.max() <= 0.5  # 12-45 % of the width, narrower when rotated
    train = pd.read_csv(tiny / "train.csv").set_index("image")
    ratios = []
    for row in boxes.itertuples(index=False):
        folder = "train_images" if row.image in train.index else "test_images"
        img = cv2.imread(str(tiny / folder / row.image)).astype(np.float32)
        inside = np.zeros(img.shape[:2], bool)
        inside[row.ymin:row.ymax, row.xmin:row.xmax] = True
        ring = np.zeros_like(inside)  # the 8 pixels of sea around the box (a sky band elsewhere must not count)
        ring[max(0, row.ymin - 8):row.ymax + 8, max(0, row.xmin - 8):row.xmax + 8] = True
        ring &= ~inside
        diff = np.abs(img - np.median(img[ring], axis=0)).mean(axis=2)  # distance from the local sea colour
        ratios.append(diff[inside].mean() / diff[ring].mean())
    ratios = np.array(ratios)
    assert np.median(ratios) > 2.5 and ratios.min() > 1.5, ratios


def test_render_box_is_tight_bbox_of_mask() -> None:
    for species in demo.SPECIES:
        img, alpha, (x0, y0, x1, y1) = render_image("00000000abcdef.jpg", species, "0123456789ab", 0, (320, 240))
        assert img.shape == (240, 320, 3) and img.dtype == np.uint8
        solid = alpha > 0.5
        assert solid[y0:y1, x0:x1].sum() == solid.sum()  # all of the animal inside
        # tight: the mask touches each side of the box
        assert solid[y0].any() and solid[y1 - 1].any() and solid[:, x0].any() and solid[:, x1 - 1].any()


def test_same_species_differ_only_by_markings() -> None:
    a_rgb, a_mask = animal_template("bottlenose_dolphin", "0123456789ab")
    b_rgb, b_mask = animal_template("bottlenose_dolphin", "ba9876543210")
    again_rgb, _ = animal_template("bottlenose_dolphin", "0123456789ab")
    np.testing.assert_array_equal(a_rgb, again_rgb)
    both = (a_mask > 0.5) & (b_mask > 0.5)
    iou = both.sum() / ((a_mask > 0.5) | (b_mask > 0.5)).sum()
    assert 0.85 < iou < 1.0  # same silhouette up to the notches
    changed = (np.abs(a_rgb - b_rgb).max(axis=2) > 30)[both].mean()
    assert 0.01 < changed < 0.5  # the markings, not the whole body
    fluke_rgb, _ = animal_template("humpback_whale", "0123456789ab")
    assert fluke_rgb.shape != a_rgb.shape


def test_marker_overwrite_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = dict(n_individuals=3, n_unseen=1, images_per_individual=(1, 1), test_per_individual=(1, 1),
                 image_size=(64, 48))
    out = make_demo(tmp_path / "d", **small)
    first = out / "train.csv"
    os.utime(first, (1, 1))
    assert make_demo(out, **small) == out and first.stat().st_mtime == 1  # complete demo: no work
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_demo(out, **{**small, "seed": 3})
    make_demo(out, **{**small, "seed": 3}, overwrite=True)
    assert read_json(out / MARKER)["args"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a folder that is not a demo is never touched, even with overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a demo"):
        make_demo(other, **small, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="image_size"):
        make_demo(tmp_path / "too_small", image_size=(32, 32))
    assert not (tmp_path / "too_small").exists()

    # a run killed half way leaves neither the folder nor its temp folder
    calls = {"n": 0}
    real = demo.render_image

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "render_image", dying)
    with pytest.raises(KeyboardInterrupt):
        make_demo(tmp_path / "killed", **small)
    assert not (tmp_path / "killed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ensure_demo(tmp_path: Path) -> None:
    elsewhere = tmp_path / "comp"
    assert ensure_demo(elsewhere) == elsewhere and not elsewhere.exists()  # not a demo name: untouched
    made = ensure_demo(tmp_path / "demo_tiny")
    assert read_json(made / MARKER)["args"]["n_individuals"] == TINY_DEMO["n_individuals"]
    os.utime(made / "train.csv", (1, 1))
    ensure_demo(made)
    assert (made / "train.csv").stat().st_mtime == 1  # existing: returned untouched
