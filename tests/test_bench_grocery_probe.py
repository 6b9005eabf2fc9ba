"""bench/grocery_probe.py: pooled features of known images, the logistic-regression probe on separable features,
and the whole command on a two-class grocery-shaped folder (the real backbone, tiny images, stored features reused).

Known answers: an identity "backbone" on a constant-colour image pools to the colour itself (average and GeM alike,
GeM clamping zeros at 1e-6); well separated clusters are classified perfectly, and labels shifted by one class
are all wrong.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench import grocery_probe


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 12) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), rgb[::-1], dtype=np.uint8))  # OpenCV writes BGR
    return str(path)


def test_pooled_features_of_constant_images_are_their_colours(tmp_path):
    files = [write_image(tmp_path / "a.png", (255, 0, 51)), write_image(tmp_path / "b.png", (0, 102, 255))]
    feats = grocery_probe.pooled_features(torch.nn.Identity(), files, 8, (0.0,) * 3, (1.0,) * 3, batch_size=1,
                                          num_workers=0)
    np.testing.assert_allclose(feats["avg"], [[1.0, 0.0, 0.2], [0.0, 0.4, 1.0]], atol=1e-6)
    np.testing.assert_allclose(feats["gem"], [[1.0, 1e-6, 0.2], [1e-6, 0.4, 1.0]], atol=1e-6)
    assert feats["avg"].dtype == np.float32 and feats["avg"].shape == (2, 3)


def test_probe_separates_clusters_and_counts_wrong_labels_as_wrong():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    y_train = np.repeat(np.arange(3), 20)
    x_train = centres[y_train] + rng.normal(0, 0.5, (60, 3))
    y_test = np.array([0, 1, 2, 2])
    x_test = centres[y_test] + rng.normal(0, 0.5, (4, 3))
    assert grocery_probe.probe(x_train, y_train, x_test, y_test, 3, 1.0) == {
        "accuracy": 1.0, "balanced_accuracy": 1.0, "top5": 1.0}
    shifted = grocery_probe.probe(x_train, y_train, x_test, (y_test + 1) % 3, 3, 1.0)
    assert shifted["accuracy"] == 0.0 and shifted["top5"] == 1.0  # three classes: every class is in the top 5
    with pytest.raises(ValueError, match=r"classes \[3\] have no training row"):
        grocery_probe.probe(x_train, y_train, x_test, y_test, 4, 1.0)


def grocery_folder(root: Path) -> Path:
    """Two fine classes (red and blue images) in the official layout: classes.csv, train.txt, val.txt."""
    (root).mkdir(parents=True)
    (root / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int)\nRed,0,Colour,0\n"
        "Blue,1,Colour,0\n")
    for split, n in (("train", 4), ("val", 2)):
        lines = []
        for cls, (name, rgb) in enumerate((("Red", (220, 20, 20)), ("Blue", (20, 20, 220)))):
            for i in range(n):
                rel = f"{split}/Colour/{name}/{name}_{i:03d}.png"
                write_image(root / rel, tuple(int(v + 10 * i) for v in rgb), size=24)
                lines.append(f"{rel}, {cls}, 0")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_command_on_a_tiny_folder_scores_and_reuses_its_features(isolated, capsys):
    source = grocery_folder(isolated / "grocery")
    argv = ["--source", str(source), "--backbones", "tf_efficientnet_lite0:32", "--c", "1", "--threads", "1"]
    assert grocery_probe.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tf_efficientnet_lite0")]
    assert len(rows) == 4  # printed as measured, then in the table: avg and gem
    cells = rows[0].strip("|").split("|")
    assert [c.strip() for c in cells[:4]] == ["tf_efficientnet_lite0", "32", "avg", "1"]
    assert float(cells[4]) == 1.0  # red against blue
    stored = sorted(p.name for p in (isolated / "working" / "bench" / "grocery_probe").glob("*.npz"))
    assert stored == ["tf_efficientnet_lite0-32-train.npz", "tf_efficientnet_lite0-32-val.npz"]
    assert grocery_probe.main(argv) == 0
    assert "| stored |" in capsys.readouterr().out  # the second call read the features back
