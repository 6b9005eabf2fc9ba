"""The long-tailed Fashion-MNIST converter of bench/classify_fashion.py, checked on the real IDX files.

Known answers: Fashion-MNIST has 60,000 training and 10,000 test images, 1,000 test images per class; its first
training label is 9 (Ankle boot) and its second 0 (T-shirt/top). The per-class counts of the exponential
profile n_c = round(n_max * 100 ** (-c / 9)) are written out by hand below.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.competition import DataError, load_competition, read_rgb

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
NAMES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]

# n_max = 600 (the benchmark's): 600 * 100 ** (-c / 9) for c = 0..9
COUNTS_600 = [
    600,  # 600.0
    360,  # 359.69
    216,  # 215.63
    129,  # 129.27
    77,  # 77.49
    46,  # 46.46
    28,  # 27.85
    17,  # 16.70
    10,  # 10.01
    6,  # 6.0: 600 / 100
]
# n_max = 100 (small, for the conversion tests): 100 * 100 ** (-c / 9)
COUNTS_100 = [
    100,  # 100.0
    60,  # 59.95
    36,  # 35.94
    22,  # 21.54
    13,  # 12.92
    8,  # 7.74
    5,  # 4.64
    3,  # 2.78
    2,  # 1.67
    1,  # 1.0: 100 / 100
]


def _bench():
    return importlib.import_module("bench.classify_fashion")


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def shared():
    if not (SHARED / "fashion-mnist").is_dir():
        pytest.skip(f"Fashion-MNIST converter: ../shared/datasets not found ({SHARED / 'fashion-mnist'})")
    return SHARED


@pytest.fixture(scope="module")
def converted(bench, shared, tmp_path_factory) -> Path:
    return bench.convert(tmp_path_factory.mktemp("fmnist"), shared, n_max=100)


def test_counts_by_hand(bench):
    assert bench.long_tail_counts(600) == COUNTS_600
    assert sum(COUNTS_600) == 1489
    assert bench.long_tail_counts(100) == COUNTS_100
    assert COUNTS_600[0] / COUNTS_600[-1] == 100  # the imbalance ratio


@pytest.mark.shared
def test_idx_headers(bench, shared):
    labels = bench.read_idx(shared / "fashion-mnist" / "train-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (60_000,) and labels.dtype == np.uint8
    assert labels[:2].tolist() == [9, 0]  # Ankle boot, T-shirt/top
    images, test_labels = bench.load_split(shared / "fashion-mnist", "test")
    assert images.shape == (10_000, 28, 28)
    assert np.bincount(test_labels).tolist() == [1000] * 10


@pytest.mark.shared
def test_converted_competition(converted, shared, bench):
    comp = load_competition(converted, check_pixels=False)
    assert comp.train["species"].unique().tolist() == ["clothing"]
    counts = comp.train["individual_id"].value_counts()
    assert [int(counts[n]) for n in NAMES] == COUNTS_100
    # the balanced test set: every test image, 1,000 per class, ground truth in test.csv
    assert len(comp.test) == 10_000
    assert comp.truth["individual_id"].value_counts().to_dict() == {n: 1000 for n in NAMES}
    assert comp.truth["image"].tolist() == comp.test["image"].tolist()
    # first n_c of each class in file order: training image 0 is the one Ankle boot kept, image 1 a T-shirt
    assert comp.train.loc[comp.train["individual_id"] == "Ankle_boot", "image"].tolist() == ["train_00000.png"]
    assert comp.train["image"].iloc[1] == "train_00001.png"
    assert comp.train["individual_id"].iloc[1] == "T-shirt_top"
    # the PNGs are grey and read back as 3 equal channels holding the IDX pixels
    images, _ = bench.load_split(shared / "fashion-mnist", "train")
    pixels = read_rgb(comp.train["path"].iloc[1])
    assert pixels.shape == (28, 28, 3)
    np.testing.assert_array_equal(pixels[..., 0], images[1])
    np.testing.assert_array_equal(pixels[..., 2], images[1])
    classes = pd.read_csv(converted / "classes.csv")
    assert classes["n_train"].tolist() == COUNTS_100 and classes["n_test"].tolist() == [1000] * 10


def _listing(root: Path) -> str:
    """Hash of every file's name and bytes under root (the marker's timestamps excluded)."""
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "_done.json"):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.mark.shared
def test_deterministic_and_reused(converted, bench, shared, tmp_path):
    again = bench.convert(tmp_path, shared, n_max=100)
    assert sorted(p.name for p in (again / "train_images").iterdir()) == sorted(
        p.name for p in (converted / "train_images").iterdir())
    assert _listing(again) == _listing(converted)
    # a second call with the same parameters reuses the folder (no rewrite)
    stamp = (again / "train.csv").stat().st_mtime_ns
    assert bench.convert(tmp_path, shared, n_max=100) == again
    assert (again / "train.csv").stat().st_mtime_ns == stamp


def test_wrong_magic_names_the_file(bench, tmp_path):
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    # an image file's magic (0x00000803, 3 dimensions) where labels (0x00000801) are expected
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (1).to_bytes(4, "big") * 3 + b"\0"))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: wrong IDX magic number 0x00000803, "
                                        r"expected 0x00000801"):
        bench.read_idx(bad, 1)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\0\0"))
    with pytest.raises(DataError, match=r"short\.gz: wrong IDX magic number none"):
        bench.read_idx(short, 1)
    size = tmp_path / "size.gz"  # header says 3 labels, 2 bytes follow
    size.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + b"\1\2"))
    with pytest.raises(DataError, match=r"size\.gz: 2 data bytes, but the header's shape \(3,\) needs 3"):
        bench.read_idx(size, 1)


def test_bad_file_stops_the_conversion(bench, tmp_path):
    folder = tmp_path / "shared" / "fashion-mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: file not found"):
        bench.convert(tmp_path / "work", tmp_path / "shared", n_max=100)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: not a readable gzip file"):
        bench.convert(tmp_path / "work", tmp_path / "shared", n_max=100)
    assert not (tmp_path / "work" / "fmnist_lt100").exists()


def test_score_and_posthoc_by_hand(bench):
    classes = ["Ankle_boot", "Bag", "Sneaker", "T-shirt_top"]
    counts = [1, 1, 1, 97]  # prior .01 x3, .97: post hoc adds 4.605 to the rare classes, 0.030 to the head
    y = np.array([0, 1, 2, 3, 3])
    scores = np.array([
        [0.0, -5.0, -5.0, 0.5],  # Ankle_boot: head wins (wrong); adjusted 4.61 vs 0.53: right
        [-5.0, 1.0, -5.0, 0.0],  # Bag: right, stays right
        [-5.0, -5.0, -5.0, 0.0],  # Sneaker: wrong, stays wrong (-0.39 vs 0.03)
        [-5.0, -5.0, -5.0, 3.0],  # T-shirt: right, stays right
        [0.0, -5.0, -5.0, 0.1],  # T-shirt: right; adjusted Ankle_boot 4.61 vs 0.13: wrong
    ])
    got = bench.score(y, scores, classes, counts)
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["balanced_accuracy"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert got["tail_accuracy"] == pytest.approx((0 + 1 + 0) / 3)  # Sneaker, Bag, Ankle_boot
    assert got["balanced_posthoc"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)


def test_verdict(bench):
    assert bench.verdict({"key": "ls", "balanced_accuracy": 0.60}, 0.55, 0.02) == "yes (+5.0 pts)"
    assert bench.verdict({"key": "ls", "balanced_accuracy": 0.56}, 0.55, 0.02) == "within seed noise (+1.0 pts)"
    assert bench.verdict({"key": "ls", "balanced_accuracy": 0.50}, 0.55, 0.02) == "NO (-5.0 pts)"
    assert bench.verdict({"key": "ce_seed1", "balanced_accuracy": 0.50}, 0.55, 0.02) == "-"
    # rows without training: their change on every plain-CE seed's model decides, not the band
    paired = {"key": "tta", "balanced_accuracy": 0.551}
    assert bench.verdict({**paired, "paired": [0.01, 0.002, 0.03]}, 0.55, 0.05) == "yes on all 3 seeds " \
        "(+1.0, +0.2, +3.0 pts)"
    assert bench.verdict({**paired, "paired": [0.01, -0.002]}, 0.55, 0.05) == "mixed over 2 seeds (+1.0, -0.2 pts)"
    assert bench.verdict({**paired, "paired": [-0.01]}, 0.55, 0.0) == "NO on 1 seed (-1.0 pts)"
