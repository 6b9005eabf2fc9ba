"""A crafted ``.pt`` whose unpickling would run code is refused by every detector loader, payload not run."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.core import paths, store
from common.engine import detector as detect


@pytest.fixture(scope="module", autouse=True)
def yolo_config(tmp_path_factory):
    """Point ultralytics at a throw-away config folder, offline, before anything imports it."""
    detect.setup_ultralytics(tmp_path_factory.mktemp("ultralytics"))


class Payload:
    """Unpickling this calls ``Path(marker).touch()``: the stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def crafted(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "epoch": 3}, path)
    return path


def test_the_payload_runs_under_full_unpickling(tmp_path):
    """The crafted file is a real threat (so the refusals below test something)."""
    marker = tmp_path / "pwned"
    pt = crafted(tmp_path / "evil.pt", marker)
    torch.load(pt, weights_only=False)
    assert marker.exists()


def images(folder: pathlib.Path, n: int = 3) -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"i{i}.png")
        out.append(folder / f"i{i}.png")
    return out


def test_predict_refuses_a_crafted_best_pt(tmp_path):
    marker = tmp_path / "pwned"
    pt = crafted(tmp_path / "exp" / "01_crop" / "detector" / "weights" / "best.pt", marker)
    with pytest.raises(detect.UntrustedCheckpointError, match=r"best.pt: refused to load.*trust_checkpoint=true"):
        detect.predict_boxes(pt, images(tmp_path / "img"), imgsz=32, device="cpu")
    assert not marker.exists()


def test_training_refuses_a_crafted_model_and_a_crafted_last_pt(tmp_path):
    marker = tmp_path / "pwned"
    src = images(tmp_path / "img", 4)
    boxes = pd.DataFrame({"image": [p.name for p in src], "xmin": 2.0, "ymin": 2.0, "xmax": 20.0, "ymax": 20.0})
    data = detect.make_yolo_dataset(boxes, tmp_path / "img", tmp_path / "yolo", 0.25, 0)
    evil_model = crafted(tmp_path / "downloaded.pt", marker)
    with pytest.raises(detect.UntrustedCheckpointError, match="downloaded.pt: refused"):
        detect.train_detector(data, tmp_path / "run1", model=str(evil_model), epochs=1, imgsz=32, batch=2,
                              device="cpu")
    assert not marker.exists()
    # a last.pt planted in a run folder (resumed when the run looks unfinished)
    run = tmp_path / "run2"
    params = {"data": str(pathlib.Path(data).resolve()), "model": "yolov8n.yaml", "epochs": 1, "imgsz": 32,
              "batch": 2, "seed": 0, "freeze": 0}
    store.write_json(run / "train_params.json", params)
    crafted(run / "weights" / "last.pt", marker)
    with pytest.raises(detect.UntrustedCheckpointError, match="last.pt: refused"):
        detect.train_detector(data, run, model="yolov8n.yaml", epochs=1, imgsz=32, batch=2, device="cpu")
    assert not marker.exists()


def test_inference_only_stage_refuses_the_crafted_detector(isolated):
    """Where ``inference_only`` looks for the detector (``<exp>/01_crop/detector/weights/best.pt``)."""
    from common.config import CropConfig
    from common.data.competition import open_competition
    from common.stages.crop_images import run_crop

    marker = isolated / "pwned"
    crafted(paths.stage_dir("kgl", "01") / "detector" / "weights" / "best.pt", marker)
    comp = open_competition("demo_tiny")
    with pytest.raises(detect.UntrustedCheckpointError, match="best.pt: refused"):
        run_crop(CropConfig(data="demo_tiny", exp="kgl", inference_only=True, device="cpu"), comp)
    assert not marker.exists()
