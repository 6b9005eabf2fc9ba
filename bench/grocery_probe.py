"""Benchmark: a linear probe of the offline ImageNet backbones on grocery (frozen features, logistic regression).

``bench/grocery.py`` fine-tunes stage 05 on grocery; on two CPU cores its budget allows small images and few epochs
(best val accuracy so far 0.638: Lite0, 160 px, 5 epochs). This measures what the backbones give with no
fine-tuning at all, at larger input sizes: each image of the official train and val splits goes once through the
frozen backbone (no augmentation), its feature map is pooled (average, and GeM with p = 3), the features are
standardised, and a multinomial logistic regression (scikit-learn, L2 penalty ``C``) is fitted on train and scored
on val: accuracy, balanced accuracy, top-5.

Nothing here is random (the features and the solver are deterministic), so the rows have no seed spread to report.
The features are kept under ``working/bench/grocery_probe/<backbone>-<size>.npz`` with their image names (read
back in order), so a second call only refits the heads.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.grocery_probe \
        --backbones tf_efficientnet_lite0:224 tf_efficientnet_lite2:288 --record
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from bench._report import append_section, torch_machine_line, utc_stamp  # noqa: E402
from bench.grocery_data import read_classes, read_split  # noqa: E402
from common.core import paths, store  # noqa: E402

SOURCE = ROOT.parent / "shared" / "datasets" / "grocery"
POOLS = ("avg", "gem")


def pooled_features(model: torch.nn.Module, files: Sequence[str], image_size: int, mean: Sequence[float],
                    std: Sequence[float], batch_size: int = 32, num_workers: int = 1) -> dict[str, np.ndarray]:
    """Average- and GeM-pooled (p = 3) features of ``files`` through ``model`` (eval mode, no augmentation), by the
    project's one batched forward loop (:func:`common.engine.predict.forward_images`, no flip).

    Args:
        model: returns feature maps ``(N, C, H, W)`` (as :func:`common.lib.models.create_backbone` builds).
        files: image paths, in the order of the returned rows.
        image_size: square input size (plain resize, as stage 05 evaluates).
        mean: normalisation mean (0-1 scale).
        std: normalisation std (0-1 scale).
        batch_size: images per forward pass.
        num_workers: loader worker processes.

    Returns:
        ``{"avg": (N, C), "gem": (N, C)}`` float32 arrays.
    """
    from common.engine.predict import forward_images
    from common.lib.models import GeM

    model.eval()
    gem = GeM(3.0, learnable=False)

    def both(x: torch.Tensor) -> torch.Tensor:  # the two poolings side by side: one pass through the backbone
        fmap = model(x).float()
        return torch.cat([fmap.mean((2, 3)), gem(fmap)], 1)

    out = forward_images(both, list(files), image_size, list(mean), list(std), batch_size=batch_size,
                         tta_flip=False, num_workers=num_workers, desc="probe features")
    half = out.shape[1] // 2
    return {"avg": out[:, :half], "gem": out[:, half:]}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, n_classes: int,
          c: float) -> dict[str, float]:
    """Fit a standardised multinomial logistic regression on train; its accuracy, balanced accuracy and top-5 on test.

    Args:
        train_x: ``(N, D)`` training features.
        train_y: class index per training row (``0..n_classes-1``; every class present).
        test_x: ``(M, D)`` test features.
        test_y: class index per test row.
        n_classes: number of classes.
        c: inverse L2 strength (scikit-learn's ``C``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from common.lib.metrics import classification_report

    missing = sorted(set(range(n_classes)) - set(np.asarray(train_y).tolist()))
    if missing:
        raise ValueError(f"probe: classes {missing[:5]} have no training row")
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(train_x), train_y)
    scores = clf.predict_log_proba(scaler.transform(test_x))  # columns are clf.classes_ = 0..n_classes-1
    rep = classification_report(test_y, scores, n_classes)
    return {k: float(rep[k]) for k in ("accuracy", "balanced_accuracy", "top5")}


def split_features(backbone: str, image_size: int, split: str, files: Sequence[str], images: Sequence[str],
                   threads: int) -> tuple[dict[str, np.ndarray], float]:
    """One split's pooled features (read back from ``working/`` when stored) and the seconds spent computing them."""
    from common.core.weights import backbone_normalization
    from common.lib.models import create_backbone

    path = paths.working_dir() / "bench" / "grocery_probe" / f"{backbone}-{image_size}-{split}.npz"
    if path.exists():
        arrays = store.load_arrays(path, expected_image=list(images))
        return {k: arrays[k] for k in POOLS}, 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        mean, std = backbone_normalization(backbone, "auto")
        feats = pooled_features(create_backbone(backbone, "auto"), files, image_size, mean, std)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    store.save_arrays(path, list(images), **feats)
    return feats, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0:224"],
                    help="timm name:input size pairs (offline weights: tf_efficientnet_lite0/1/2, mobilenetv2_100)")
    ap.add_argument("--c", type=float, nargs="+", default=[0.05, 0.5], help="inverse L2 strengths to try")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the feature extraction")
    ap.add_argument("--source", default=str(SOURCE), help="the grocery folder")
    ap.add_argument("--record", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    load, started, t_all = os.getloadavg()[0], utc_stamp(), time.perf_counter()
    source = Path(args.source)
    classes = read_classes(source)
    train, val = read_split(source, "train", classes), read_split(source, "test", classes)
    names = sorted(train["fine"].unique())
    index = {n: i for i, n in enumerate(names)}
    y_train, y_val = train["fine"].map(index).to_numpy(), val["fine"].map(index).to_numpy()
    lines = ["| backbone | input px | pooling | C | val accuracy | val balanced accuracy | val top-5 | feature s |",
             "|---|---|---|---|---|---|---|---|"]
    best = 0.0
    for item in args.backbones:
        backbone, _, size = item.partition(":")
        size = int(size or 224)
        f_train, s_train = split_features(backbone, size, "train", train["file"], train["image"], args.threads)
        f_val, s_val = split_features(backbone, size, "val", val["file"], val["image"], args.threads)
        seconds = f"{s_train + s_val:.0f}" if s_train + s_val else "stored"
        for pool in POOLS:
            for c in args.c:
                r = probe(f_train[pool], y_train, f_val[pool], y_val, len(names), c)
                best = max(best, r["accuracy"])
                lines.append(f"| {backbone} | {size} | {pool} | {c:g} | {r['accuracy']:.3f} | "
                             f"{r['balanced_accuracy']:.3f} | {r['top5']:.3f} | {seconds} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.record:
        cmd = " ".join(["HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.grocery_probe",
                        *(sys.argv[1:] if argv is None else argv)])
        append_section(ROOT / "bench" / "RESULTS.md", (
            "\n## Grocery Store Dataset: linear probe of the offline backbones (frozen features, logistic regression)"
            f"\n\n- command: `{cmd}` (from the repository root)\n- date: {started}; wall time of this call "
            f"{(time.perf_counter() - t_all) / 60:.1f} min (stored features are reused)\n"
            f"- machine: {torch_machine_line('cpu', load)}\n"
            f"- data: {source.name}: official train split ({len(train)} images) to fit, official val split "
            f"({len(val)} images) scored; {len(names)} fine classes; images are 224 px on the long side\n"
            "- method: one pass of each image through the frozen ImageNet backbone (plain resize, no augmentation), "
            "average or GeM (p = 3) pooling, standardised, multinomial logistic regression (scikit-learn, L2, C); "
            "deterministic, so no seed spread\n"
            f"- best val accuracy: {best:.3f}; published fine-grained test accuracy 0.860 (Antioquia, 2021)\n\n"
            + text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
