"""An ESTIMATE of each stage's GPU time for ``params/happywhale.yaml`` on one GPU (not a measurement on a GPU).

Inputs, all measured here on the CPU except the GPU's published peak:

* FLOPs per image of the embedder's forward at the file's image size: ``torch.utils.flop_counter`` through
  :func:`common.engine.throughput.measure_throughput` (what ``python -m common.cli.kaggle estimate`` runs); 2 FLOPs per
  multiply-add. Training costs 3 forwards per image (forward + backward ~ 2x forward).
* JPEG decode + resize speed of one 1024 x 683 JPEG per loader process, in CPU time (:func:`measure`), for the
  loading bound (real Happywhale photos are often larger; stage 01's crops are smaller).
* Stage 04's per-query CPU cost, read from the scale bench's rows (``bench/scale.py``) when given.

Assumptions (stated in the output): Happywhale's counts (51,033 train, 27,956 test images), 5 folds, the file's
epochs, a GPU peak (default one A100: 312 dense bf16 TFLOPS) at a model-FLOPs utilisation (default 0.3: EfficientNet's
depthwise convolutions reach a small share of the tensor-core peak), ``workers`` loader processes. Each stage
takes the larger of its GPU time and its loading time (they overlap).

Usage (from the repository root)::

    nice -n 10 .venv/bin/python -m bench.happywhale_estimate --record
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 51_033, 27_956


def estimate(gflops: float, decode_per_s: float, params: dict, peak_tflops: float, mfu: float, workers: int,
             query_ms: float | None = None) -> list[dict]:
    """Hours per stage on one GPU: ``max(GPU FLOPs / (peak x mfu), images / (decode x workers))``.

    Args:
        gflops: forward GFLOPs per image at ``params['image_size']``.
        decode_per_s: images decoded and resized per second by one loader process.
        params: the parameters file (epochs, n_folds, tta_flip).
        peak_tflops: the GPU's dense peak in the training precision.
        mfu: the assumed share of that peak reached.
        workers: loader processes.
        query_ms: stage 04's measured CPU milliseconds per query image (scale bench), if known.
    """
    folds, epochs = int(params.get("n_folds", 5)), int(params.get("epochs", 20))
    flip = 2 if params.get("tta_flip", True) else 1
    rate = peak_tflops * 1e12 * mfu
    fit = N_TRAIN * (folds - 1) / folds  # training images per fold
    rows = []

    def row(stage: str, images: float, flops: float, note: str) -> None:
        gpu_h, load_h = flops / rate / 3600, images / (decode_per_s * workers) / 3600
        rows.append(dict(stage=stage, images=int(images), pflops=flops / 1e15, gpu_h=gpu_h, load_h=load_h,
                         hours=max(gpu_h, load_h), note=note))

    row("02 train embedder", fit * epochs * folds, 3 * gflops * 1e9 * fit * epochs * folds,
        f"{folds} folds x {epochs} epochs x {fit:,.0f} images, 3 forwards each (fwd + bwd)")
    # validation: each fold's held-out images once per epoch
    row("02 validation", N_TRAIN / folds * epochs * folds, gflops * 1e9 * N_TRAIN / folds * epochs * folds,
        "held-out fold once per epoch")
    row("03 extract", (N_TRAIN + N_TEST) * folds * flip, gflops * 1e9 * (N_TRAIN + N_TEST) * folds * flip,
        f"train + test through {folds} fold models, flip TTA x{flip}")
    if query_ms is not None:
        rows.append(dict(stage="04 retrieve+submit", images=N_TRAIN + N_TEST, pflops=0.0, gpu_h=0.0,
                         load_h=0.0, hours=query_ms * (N_TRAIN + N_TEST) / 1000 / 3600,
                         note=f"CPU: {query_ms:.2f} ms per image measured by bench/scale.py (faiss on CPU)"))
    return rows


def measure(backbone: str, image_size: int, jpeg_size: tuple[int, int] = (1024, 683), n: int = 40) -> dict:
    """Forward GFLOPs per image (torch's flop counter on ``EmbeddingModel.embed``, as
    :func:`common.engine.throughput.measure_throughput`, without its timed forwards) and JPEG decode + resize images per
    CPU-second of one process (``time.process_time``: on a loaded shared machine wall time would count the
    other jobs' time too).

    Args:
        backbone: timm model name (built with ``pretrained="none"``).
        image_size: square input size.
        jpeg_size: width and height of the decoded JPEG.
        n: decodes timed.
    """
    import tempfile
    import time

    import cv2
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from common.data.competition import ImageDataset, build_transforms
    from common.lib.models import EmbeddingModel

    model = EmbeddingModel(backbone, pretrained="none", n_classes=2).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.embed(torch.randn(1, 3, image_size, image_size))
    with tempfile.TemporaryDirectory() as tmp:
        w, h = jpeg_size
        gradient = np.linspace(0, 255, w * h * 3).reshape(h, w, 3).astype(np.uint8)
        noise = np.random.default_rng(0).integers(0, 40, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(f"{tmp}/a.jpg", cv2.add(gradient, noise), [cv2.IMWRITE_JPEG_QUALITY, 90])
        ds = ImageDataset([f"{tmp}/a.jpg"] * n, transform=build_transforms(image_size, False, [0.5] * 3, [0.5] * 3))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.process_time()
        for i in range(n):
            ds[i]
        decode = n / (time.process_time() - t0)
        torch.set_num_threads(threads)
    return {"gflops_per_image": counter.get_total_flops() / 1e9, "decode_images_per_s": decode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params" / "happywhale.yaml"))
    ap.add_argument("--peak-tflops", type=float, default=312.0, help="GPU dense peak (A100 bf16: 312)")
    ap.add_argument("--gpu", default="one NVIDIA A100 (312 dense bf16 TFLOPS)")
    ap.add_argument("--mfu", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--query-ms", type=float, default=None, help="stage 04 CPU ms per image (bench/scale.py)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    from bench._report import append_section, cpu_model, utc_stamp

    params = yaml.safe_load(Path(args.params).read_text())
    measured = measure(params["backbone"].split(".")[0], int(params["image_size"]))
    rows = estimate(measured["gflops_per_image"], measured["decode_images_per_s"], params, args.peak_tflops,
                    args.mfu, args.workers, args.query_ms)
    total = sum(r["hours"] for r in rows)
    lines = ["| stage | images processed | PFLOPs | GPU h | loading h | estimate h | what |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['images']:,} | {r['pflops']:.1f} | {r['gpu_h']:.2f} | {r['load_h']:.2f} | "
              f"{r['hours']:.2f} | {r['note']} |" for r in rows]
    lines.append(f"| total | | | | | {total:.1f} | |")
    text = "\n".join(lines)
    print(json.dumps({k: round(v, 3) for k, v in measured.items()}))
    print(text)
    if args.record:
        cmd = " ".join(["nice -n 10 .venv/bin/python -m bench.happywhale_estimate", *(argv or sys.argv[1:])])
        append_section(ROOT / "bench" / "RESULTS.md", (
            f"\n## ESTIMATE (not measured on a GPU): params/happywhale.yaml on {args.gpu}\n\n"
            f"- command: `{cmd}` (from the repository root)\n"
            f"- date: {utc_stamp()}; machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, load average "
            f"{os.getloadavg()[0]:.2f}\n"
            f"- measured here: {params['backbone']} at {params['image_size']} px = "
            f"{measured['gflops_per_image']:.1f} GFLOPs per forward (torch flop counter, pretrained=none); JPEG "
            f"1024x683 decode + resize {measured['decode_images_per_s']:.0f} images per CPU-second of one process\n"
            f"- assumed: Happywhale's 51,033 train / 27,956 test images; {args.peak_tflops:g} TFLOPS peak at "
            f"{args.mfu:g} utilisation; {args.workers} loader processes; training = 3 forwards per image; each "
            "stage = max(GPU, loading). Stage 01 (detector) and 05/06 are not estimated here.\n\n" + text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
