"""common.data.competition: table validation, competition loading, folds, transforms, dataset, cached pixel check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.data import competition as data
from common.data.competition import DataError

MEAN = STD = (0.5, 0.5, 0.5)


def save_png(path: Path, rgb=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_competition(root: Path, sample_submission: bool = True) -> Path:
    """A valid tiny competition: 4 train images (2 individuals), 2 test images, PNGs of 8x6 pixels."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        save_png(root / "train_images" / name)
    for name in ("t1.png", "t2.png"):
        save_png(root / "test_images" / name, rgb=(0, 0, 255))
    write(root / "train.csv", "image,species,individual_id\n"
                              "a.png,whale,w1\n"      # row 1
                              "b.png,whale,w1\n"      # row 2
                              "c.png,dolphin,d1\n"    # row 3
                              "d.png,dolphin,d1\n")   # row 4
    if sample_submission:
        write(root / "sample_submission.csv", "image,predictions\n"
                                              "t2.png,w1 new_individual\n"  # row 1: order is kept
                                              "t1.png,d1\n")                # row 2
    return root


# -- read_table ----------------------------------------------------------------------------------------------
def test_read_table_ok(tmp_path):
    f = write(tmp_path / "t.csv", "image,species,individual_id,extra\na.png,s,1,x\nb.png,s,007,\n")
    df = data.read_table(f, data.TRAIN_COLUMNS)
    assert df["individual_id"].tolist() == ["1", "007"]  # read as strings: leading zeros survive
    assert df["extra"].tolist() == ["x", ""]  # blanks in other columns are allowed


def test_read_table_missing_column(tmp_path):
    f = write(tmp_path / "t.csv", "image,species\na.png,s\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['individual_id'\]") as err:
        data.read_table(f, data.TRAIN_COLUMNS)
    assert str(f) in str(err.value)


def test_read_table_empty_value_names_file_and_row(tmp_path):
    f = write(tmp_path / "t.csv", "image,species,individual_id\n"
                                  "a.png,s,1\n"  # row 1
                                  "b.png, ,2\n"  # row 2: blank species (a space only)
                                  "c.png,,3\n")  # row 3: empty species
    with pytest.raises(DataError, match=r"t\.csv, row 2: empty value in column 'species'"):
        data.read_table(f, data.TRAIN_COLUMNS)


def test_read_table_duplicate_image(tmp_path):
    f = write(tmp_path / "t.csv", "image,species,individual_id\n"
                                  "a.png,s,1\n"  # row 1
                                  "b.png,s,2\n"  # row 2
                                  "a.png,s,3\n")  # row 3: a.png again
    with pytest.raises(DataError, match=r"t\.csv, row 3: image 'a\.png' appears twice"):
        data.read_table(f, data.TRAIN_COLUMNS)


def test_read_table_boxes_may_repeat_images(tmp_path):
    f = write(tmp_path / "boxes.csv", "image,xmin,ymin,xmax,ymax\na.png,0,0,2,2\na.png,3,3,5,5\n")
    assert len(data.read_table(f, data.BOX_COLUMNS)) == 2


def test_read_table_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_table(tmp_path / "nope.csv", data.TRAIN_COLUMNS)
    f = write(tmp_path / "empty.csv", "")  # 0 bytes: pandas raises EmptyDataError without the file name
    with pytest.raises(DataError, match=r"empty\.csv: not a readable CSV"):
        data.read_table(f, data.TRAIN_COLUMNS)


# -- load_competition ----------------------------------------------------------------------------------------
def test_load_competition_ok(tmp_path):
    root = make_competition(tmp_path / "comp")
    write(root / "boxes.csv", "image,xmin,ymin,xmax,ymax\na.png,1,1,5,4\nt1.png,0,0,8,6\n")
    write(root / "test.csv", "image,individual_id\nt1.png,d1\nt2.png,x9\n")
    comp = data.load_competition(root)
    assert comp.train["image"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
    assert comp.test["image"].tolist() == ["t2.png", "t1.png"]  # sample-submission order
    assert comp.test["path"].tolist() == [str(root / "test_images" / n) for n in ("t2.png", "t1.png")]
    assert comp.boxes["xmax"].tolist() == [5.0, 8.0] and comp.boxes["xmax"].dtype == float
    assert comp.known_individuals == {"w1", "d1"}
    summary = comp.summary()["value"]
    assert summary["train images"] == 4 and summary["test images"] == 2 and summary["species"] == 2
    assert summary["test images of unseen individuals"] == "50.0%"  # x9 is unseen, d1 is known


def test_unknown_image_in_train_names_row(tmp_path):
    root = make_competition(tmp_path / "comp")
    write(root / "train.csv", "image,species,individual_id\n"
                              "a.png,whale,w1\n"     # row 1
                              "b.png,whale,w1\n"     # row 2
                              "zz.png,whale,w1\n")   # row 3: no such file
    with pytest.raises(DataError, match=r"train\.csv, row 3: image 'zz\.png' not found"):
        data.load_competition(root)


def test_unknown_image_in_sample_submission(tmp_path):
    root = make_competition(tmp_path / "comp")
    write(root / "sample_submission.csv", "image,predictions\nt1.png,x\nt9.png,x\n")
    with pytest.raises(DataError, match=r"sample_submission\.csv, row 2: image 't9\.png' not found"):
        data.load_competition(root)


def test_truncated_jpeg_is_named(tmp_path):
    root = make_competition(tmp_path / "comp")
    bad = root / "train_images" / "b.png"
    bad.unlink()
    jpg = root / "train_images" / "b.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: a long file
    Image.fromarray(noise).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # cut it in half
    (root / "train.csv").write_text((root / "train.csv").read_text().replace("b.png", "b.jpg"))
    with pytest.raises(DataError, match=r"b\.jpg: unreadable or truncated image") as err:
        data.load_competition(root)
    assert str(jpg) in str(err.value)
    assert len(data.load_competition(root, check_pixels=False).train) == 4  # structure alone is fine
    with pytest.raises(DataError, match="truncated"):
        data.check_images([root / "train_images" / "a.png", jpg], workers=2)
    data.check_images([root / "train_images" / "a.png"])  # a good file passes


def test_check_images_too_small(tmp_path):
    p = save_png(tmp_path / "dot.png", size=(1, 5))
    with pytest.raises(DataError, match="smaller than 2x2"):
        data.check_images([p])


@pytest.mark.parametrize(
    "boxes, message",
    [
        ("a.png,4,1,4,5\n", r"row 2: box has xmax<=xmin"),  # xmax == xmin
        ("a.png,1,4,5,2\n", r"row 2: box has xmax<=xmin or ymax<=ymin"),  # ymax < ymin
        ("a.png,1,x,5,4\n", r"row 2: ymin is not a number"),
        ("q.png,1,1,5,4\n", r"row 2: image 'q\.png' is neither in train\.csv nor a test image"),
    ],
)
def test_bad_boxes(tmp_path, boxes, message):
    root = make_competition(tmp_path / "comp")
    write(root / "boxes.csv", "image,xmin,ymin,xmax,ymax\n"
                              "b.png,0,0,8,6\n"  # row 1: fine
                              + boxes)           # row 2: the bad one
    with pytest.raises(DataError, match=r"boxes\.csv, " + message):
        data.load_competition(root, check_pixels=False)


def test_truth_with_non_test_image(tmp_path):
    root = make_competition(tmp_path / "comp")
    write(root / "test.csv", "image,individual_id\n"
                             "t1.png,d1\n"   # row 1
                             "a.png,w1\n")   # row 2: a training image
    with pytest.raises(DataError, match=r"test\.csv, row 2: image 'a\.png' is not a test image"):
        data.load_competition(root, check_pixels=False)


def test_no_sample_submission_lists_test_folder(tmp_path):
    root = make_competition(tmp_path / "comp", sample_submission=False)
    save_png(root / "test_images" / "t0.png")
    (root / "test_images" / ".DS_Store").write_bytes(b"\x00\x01")  # Finder litter is not a test image
    (root / "test_images" / ".ipynb_checkpoints").mkdir()  # nor is Jupyter's folder
    comp = data.load_competition(root)
    assert comp.test["image"].tolist() == ["t0.png", "t1.png", "t2.png"]  # name order


def test_empty_train_and_missing_folder(tmp_path):
    root = make_competition(tmp_path / "comp")
    write(root / "train.csv", "image,species,individual_id\n")
    with pytest.raises(DataError, match=r"train\.csv: no rows"):
        data.load_competition(root)
    with pytest.raises(DataError, match="competition folder not found"):
        data.load_competition(tmp_path / "nowhere")


# -- folds ---------------------------------------------------------------------------------------------------
IDS = (["a"] * 5    # 5 images >= 3 folds: in every fold
       + ["b"] * 3  # 3 images: one per fold
       + ["c"] * 2  # fewer than n_folds: absent from one fold
       + ["d"])     # a single image


def test_make_folds_balanced_and_stratified():
    folds = data.make_folds(IDS, n_folds=3, seed=0)
    assert folds.dtype == np.int64 and folds.shape == (11,)
    sizes = np.bincount(folds, minlength=3)
    assert sorted(sizes.tolist()) == [3, 4, 4]  # 11 images: sizes differ by at most one
    ids = np.array(IDS)
    assert set(folds[ids == "a"]) == {0, 1, 2}
    assert sorted(folds[ids == "b"].tolist()) == [0, 1, 2]  # exactly one image per fold
    assert len(set(folds[ids == "c"])) == 2  # two images, two different folds
    assert np.bincount(folds[ids == "a"], minlength=3).tolist() in ([2, 2, 1], [2, 1, 2], [1, 2, 2])


def test_make_folds_seeded():
    ids = [f"i{k // 2}" for k in range(40)]  # 20 individuals x 2 images
    a = data.make_folds(ids, 4, seed=1)
    np.testing.assert_array_equal(a, data.make_folds(ids, 4, seed=1))
    assert not np.array_equal(a, data.make_folds(ids, 4, seed=2))


def test_make_folds_too_few():
    with pytest.raises(DataError, match="2 training images cannot fill 3 folds"):
        data.make_folds(["a", "b"], n_folds=3, seed=0)
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        data.make_folds(["a", "b"], n_folds=1, seed=0)


def test_split_fold():
    train = pd.DataFrame({"image": ["a", "b", "c", "d"]})
    folds = np.array([0, 1, 0, 1])
    fit, valid = data.split_fold(train, folds, 0)
    assert fit["image"].tolist() == ["b", "d"] and valid["image"].tolist() == ["a", "c"]
    assert valid.index.tolist() == [0, 1]  # index reset
    with pytest.raises(DataError, match="fold 2 has 4 training and 0 validation images"):
        data.split_fold(train, folds, 2)
    with pytest.raises(DataError, match="fold 0 has 0 training"):
        data.split_fold(train, np.zeros(4, dtype=int), 0)


# -- images, transforms, dataset -----------------------------------------------------------------------------
def test_read_rgb_channel_order(tmp_path):
    p = save_png(tmp_path / "red.png", rgb=(255, 0, 0))
    img = data.read_rgb(p)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 0, 0]  # RGB, not OpenCV's BGR
    with pytest.raises(DataError, match="cannot be read"):
        data.read_rgb(write(tmp_path / "x.png", "not an image"))


def test_eval_transform_known_values_and_deterministic():
    tf = data.build_transforms(16, train=False, mean=MEAN, std=STD)
    white = np.full((10, 20, 3), 255, np.uint8)
    out = tf(image=white)["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # (255/255 - 0.5) / 0.5
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(tf(image=noise)["image"], tf(image=noise)["image"])


def test_train_transform_shape_and_randomness():
    tf = data.build_transforms(24, train=True, mean=MEAN, std=STD)
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    outs = [tf(image=noise)["image"] for _ in range(4)]
    assert all(o.shape == (24, 24, 3) and o.dtype == np.float32 for o in outs)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # random crops differ


def test_image_dataset(tmp_path):
    red = save_png(tmp_path / "r.png", rgb=(255, 0, 0))
    blue = save_png(tmp_path / "b.png", rgb=(0, 0, 255))
    ds = data.ImageDataset([red, blue], labels=[3, 1], species=[0, 1],
                           transform=data.build_transforms(16, False, MEAN, STD))
    assert len(ds) == 2
    item = ds[1]
    assert sorted(item) == ["image", "label", "species"]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    # blue after normalisation: R = G = (0 - 0.5) / 0.5 = -1, B = (1 - 0.5) / 0.5 = 1
    np.testing.assert_allclose(item["image"][:, 0, 0].numpy(), [-1.0, -1.0, 1.0], atol=1e-6)
    assert item["label"].item() == 1 and item["label"].dtype == torch.int64
    assert item["species"].item() == 1
    raw = data.ImageDataset([red])[0]  # no labels, no transform: raw 0-255 pixels, CHW
    assert sorted(raw) == ["image"] and raw["image"].shape == (3, 6, 8)
    assert raw["image"][:, 0, 0].tolist() == [255.0, 0.0, 0.0]


# -- open_competition ----------------------------------------------------------------------------------------
def test_open_competition_caches_pixel_check(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp")
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "work"))
    calls = []
    real = data.check_images

    def counting(paths, workers=4):
        calls.append(len(paths))
        return real(paths, workers)

    monkeypatch.setattr(data, "check_images", counting)
    comp = data.open_competition(str(root))
    assert calls == [6]  # 4 train + 2 test images decoded once
    assert len(list((tmp_path / "work" / ".checked").glob("*.json"))) == 1
    data.open_competition(str(root))
    assert calls == [6]  # cached: nothing decoded again
    img = root / "train_images" / "a.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a file changed: check again
    data.open_competition(str(root))
    assert calls == [6, 6]
    data.open_competition(str(root), check_pixels=False)
    assert calls == [6, 6]
    assert comp.test["image"].tolist() == ["t2.png", "t1.png"]


def test_open_competition_bad_pixels_not_cached(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp")
    (root / "test_images" / "t1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "work"))
    for _ in range(2):  # the failure is not remembered as a pass
        with pytest.raises(DataError, match=r"t1\.png: unreadable"):
            data.open_competition(str(root))
    assert not list((tmp_path / "work").glob(".checked/*.json"))


def test_build_transforms_crop_scale_and_flip_switches():
    import albumentations as A

    def find(pipeline, kind):
        return next(t for t in pipeline.transforms if isinstance(t, kind))

    default = data.build_transforms(32, True, [0.5] * 3, [0.5] * 3)
    assert find(default, A.RandomResizedCrop).scale == (0.7, 1.0)
    assert find(default, A.HorizontalFlip).p == 0.5
    custom = data.build_transforms(32, True, [0.5] * 3, [0.5] * 3, scale_min=0.3, hflip=False)
    assert find(custom, A.RandomResizedCrop).scale == (0.3, 1.0)
    assert find(custom, A.HorizontalFlip).p == 0.0
