"""Stage 01 (common.stages.crop_images) without a detector: ``crop=none``, CAM boxes, ``crops_from``, the boxes.csv check.

The detector path itself (train, predict, crop) runs in tests/test_notebooks.py.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
from matplotlib.figure import Figure

from common.config import CropConfig
from common.core import paths, store
from common.data import artefacts
from common.data.competition import DataError, load_competition
from common.data.fingerprint import stage_fingerprint
from common.engine import detector as detect
from common.stages import crop_images as crop_stage

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture(autouse=True)
def no_detector(monkeypatch):
    """No test here may reach the detector."""
    for name in ("setup_ultralytics", "train_detector", "predict_boxes"):
        monkeypatch.setattr(detect, name, _forbidden(name))


def _forbidden(name):
    def boom(*args, **kwargs):
        raise AssertionError(f"detect.{name} must not be called")

    return boom


def fake_finished_crops(comp, exp: str) -> None:
    """A finished stage 01 of ``exp`` with a crop per image, boxes.csv and metrics.json."""
    out = paths.stage_dir(exp, "01")
    for split, table in (("train", comp.train), ("test", comp.test)):
        (out / "crops" / split).mkdir(parents=True)
        for image, path in zip(table["image"], table["path"], strict=True):
            shutil.copyfile(path, out / "crops" / split / image)
    boxes = pd.DataFrame({"split": "train", "image": comp.train["image"], "xmin": 0, "ymin": 0, "xmax": 10,
                          "ymax": 10, "conf": 0.9, "fallback": False})
    store.write_csv(out / "boxes.csv", boxes)
    store.write_json(out / "metrics.json", {"held-out train": {"map50": 0.75}})
    store.mark_done(out, {"exp": exp})


def test_crop_false_writes_only_the_marker(comp):
    cfg = CropConfig(data=str(comp.root), exp="nocrop", crop=False)
    result = crop_stage.run_crop(cfg, comp)
    out = paths.stage_dir("nocrop", "01")
    assert store.stage_done(out, stage_fingerprint(cfg))
    assert store.read_json(out / "metrics.json") == {
        "note": "crop=none: full images are used", "crop_method": "full images (crop=none: full images are used)"}
    assert sorted(p.name for p in out.iterdir()) == ["_done.json", "metrics.json"]  # no crops/, no boxes.csv
    assert result.boxes.empty
    assert result.image_dirs == {"train": comp.root / "train_images", "test": comp.root / "test_images"}
    assert result.metrics_table()["note"].tolist() == ["crop=none: full images are used"]
    assert isinstance(result.plot_samples(), Figure)
    # stage 02 then reads the full images
    assert not artefacts.crops_available("nocrop")
    assert artefacts.image_paths(comp.train, "nocrop", "train", False) == comp.train["path"].tolist()


def test_force_starts_the_stage_over(comp):
    cfg = CropConfig(data=str(comp.root), exp="nocrop", crop=False)
    crop_stage.run_crop(cfg, comp)
    junk = paths.stage_dir("nocrop", "01") / "old.txt"
    junk.write_text("left by an earlier run")
    crop_stage.run_crop(cfg, comp)
    assert junk.exists()  # not forced: untouched
    crop_stage.run_crop(CropConfig(data=str(comp.root), exp="nocrop", crop=False, force=True), comp)
    assert not junk.exists()


def test_crops_from_links_the_other_experiments_crops(comp):
    fake_finished_crops(comp, "src")
    cfg = CropConfig(data=str(comp.root), exp="dst", crops_from="src")
    result = crop_stage.run_crop(cfg, comp)
    out = paths.stage_dir("dst", "01")
    link = out / "crops"
    assert link.is_dir()
    if link.is_symlink():  # relative, so the working folder can move
        assert not os.path.isabs(os.readlink(link))
        assert link.resolve() == (paths.stage_dir("src", "01") / "crops").resolve()
    assert sorted(p.name for p in (link / "test").iterdir()) == sorted(comp.test["image"])
    assert result.boxes["image"].tolist() == comp.train["image"].tolist()
    assert result.metrics == {"held-out train": {"map50": 0.75}, "crops_from": "src"}
    assert store.stage_done(out, stage_fingerprint(cfg))
    assert artefacts.crops_available("dst")
    crops = artefacts.image_paths(comp.train, "dst", "train", True)
    assert all(os.path.exists(p) for p in crops) and crops[0].startswith(str(link))

    again = crop_stage.run_crop(cfg, comp)  # rerun: the link is replaced, not nested
    assert not (link / "crops").exists()
    assert again.metrics == result.metrics


def test_crops_from_an_unfinished_experiment_is_a_clear_error(comp):
    cfg = CropConfig(data=str(comp.root), exp="dst", crops_from="src")
    with pytest.raises(FileNotFoundError, match=r"src.01_crop: stage 01 of experiment 'src' has not finished"):
        crop_stage.run_crop(cfg, comp)
    assert not store.stage_done(paths.stage_dir("dst", "01"))


def test_crops_from_an_experiment_of_full_images_uses_full_images(comp):
    # e.g. the runner's --baseline (crops_from=<exp>) after a crop=none run
    crop_stage.run_crop(CropConfig(data=str(comp.root), exp="src", crop=False), comp)
    result = crop_stage.run_crop(CropConfig(data=str(comp.root), exp="dst", crops_from="src"), comp)
    assert result.metrics["crop_method"] == "full images (crops_from=src: that experiment used full images)"
    assert store.stage_done(paths.stage_dir("dst", "01"))
    assert not (paths.stage_dir("dst", "01") / "crops").exists()


@pytest.fixture
def no_boxes(tiny_demo_root, tmp_path):
    root = tmp_path / "no_boxes"
    shutil.copytree(tiny_demo_root, root)
    (root / "boxes.csv").unlink()
    comp = load_competition(root, check_pixels=False)
    assert comp.boxes is None
    return comp


def test_missing_boxes_csv_with_crop_detector(no_boxes):
    root = no_boxes.root
    with pytest.raises(DataError, match=r"no_boxes/boxes\.csv not found: crop=detector needs boxes"):
        crop_stage.run_crop(CropConfig(data=str(root), exp="c", crop="detector"), no_boxes)
    assert not store.stage_done(paths.stage_dir("c", "01"))
    # crop=False needs no boxes
    crop_stage.run_crop(CropConfig(data=str(root), exp="c", crop=False), no_boxes)


def test_auto_without_boxes_uses_cam_boxes(no_boxes, monkeypatch):
    from common.engine import localise

    tried = []

    def offline(name, *args, **kwargs):  # what resolve_detector_model raises for a hub name while offline
        tried.append(name)
        raise RuntimeError("must be downloaded, but we are offline")

    monkeypatch.setattr(localise, "zero_shot_boxes", offline)
    monkeypatch.setattr(detect, "setup_ultralytics", lambda *a, **k: None)
    cfg = CropConfig(data=str(no_boxes.root), exp="cam", detector_model="yolo11n.pt", cam_imgsz=64, box_conf=0.0)
    result = crop_stage.run_crop(cfg, no_boxes)
    assert tried == ["yolo11n.pt"]
    out = paths.stage_dir("cam", "01")
    metrics = store.read_json(out / "metrics.json")
    assert metrics["crop_method"].startswith("class activation maps of the ImageNet classifier")
    assert result.method == metrics["crop_method"]
    assert "zero-shot yolo11n.pt unavailable" in metrics["tried"][0]
    assert metrics["train_fallback_share"] == 0.0  # box_conf=0: every image with a map has its box
    for split in ("train", "test"):  # the median area share of the crops written to boxes.csv
        rows = result.boxes[result.boxes["split"] == split]
        area = (rows["crop_xmax"] - rows["crop_xmin"]) * (rows["crop_ymax"] - rows["crop_ymin"])
        assert metrics[f"{split}_crop_area_median"] == pytest.approx((area / (rows["width"] * rows["height"])).median())
        assert 0 < metrics[f"{split}_crop_area_median"] <= 1
    for split, table in (("train", no_boxes.train), ("test", no_boxes.test)):
        assert sorted(p.name for p in (out / "crops" / split).iterdir() if p.suffix != ".csv") == sorted(
            table["image"])
    assert set(result.boxes["split"]) == {"train", "test"} and len(result.boxes) == len(no_boxes.train) + len(
        no_boxes.test)
    assert artefacts.crops_available("cam")
    png = result.show_samples()
    assert png.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_without_boxes_or_classifier_uses_full_images(no_boxes, monkeypatch):
    from common.engine import localise

    monkeypatch.setattr(localise, "cam_available", lambda *a: False)
    cfg = CropConfig(data=str(no_boxes.root), exp="full")
    result = crop_stage.run_crop(cfg, no_boxes)
    assert result.boxes.empty
    assert result.method.startswith("full images (no boxes.csv and no way to find boxes: no offline ImageNet")
    assert not artefacts.crops_available("full")


def test_crops_from_itself_is_refused_and_keeps_the_crops(comp):
    fake_finished_crops(comp, "self")
    with pytest.raises(ValueError, match="crops_from='self' is this experiment itself"):
        crop_stage.run_crop(CropConfig(data=str(comp.root), exp="self", crops_from="self"), comp)
    crops = paths.stage_dir("self", "01") / "crops" / "train"
    assert sorted(p.name for p in crops.iterdir()) == sorted(comp.train["image"])
