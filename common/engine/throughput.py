"""How long stage 03 takes on a Kaggle T4: measure the embedder here, estimate there (an estimate, not a timing).

``python -m common.cli.kaggle estimate --backbone tf_efficientnet_lite0 --image-size 160`` prints the model's FLOPs
per image, its forward speed with flip TTA on this machine's CPU, the speed of decoding and resizing a
1024x683 JPEG, and the estimated minutes per 10,000 test images on one T4 (:func:`estimate_t4_minutes`).
"""

from __future__ import annotations

import tempfile

# Published peak of one NVIDIA T4 (datasheet): 8.1 TFLOPS fp32, 65 TFLOPS fp16 with tensor cores (AMP).
T4_TFLOPS = {"fp32": 8.1, "fp16": 65.0}


def measure_throughput(backbone: str, image_size: int, batch_size: int = 32, batches: int = 3,
                       jpeg_size: tuple[int, int] = (1024, 683)) -> dict[str, float]:
    """Measure the embedder's forward throughput with flip TTA here (CPU), its FLOPs, and image loading speed.

    Args:
        backbone: timm model name.
        image_size: input size (pixels).
        batch_size: images per forward pass.
        batches: timed batches (after one warm-up batch).
        jpeg_size: width and height of the JPEG decoded and resized to measure loading (one process).

    Returns:
        ``gflops_per_image`` (one forward, 2 FLOPs per multiply-add), ``cpu_images_per_s`` (with the flip: two
        forwards per image), ``decode_images_per_s``, ``threads``.
    """
    import time

    import cv2
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from common.data.competition import ImageDataset, build_transforms
    from common.lib.models import EmbeddingModel

    model = EmbeddingModel(backbone, pretrained="none", n_classes=2).eval()
    x = torch.randn(batch_size, 3, image_size, image_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.embed(x[:1])
        model.embed(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            model.embed(x), model.embed(torch.flip(x, dims=[3]))
        cpu = batches * batch_size / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        w, h = jpeg_size
        gradient = np.linspace(0, 255, w * h * 3).reshape(h, w, 3).astype(np.uint8)
        noise = np.random.default_rng(0).integers(0, 40, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(f"{tmp}/a.jpg", cv2.add(gradient, noise), [cv2.IMWRITE_JPEG_QUALITY, 90])
        ds = ImageDataset([f"{tmp}/a.jpg"] * 40, transform=build_transforms(image_size, False, [0.5] * 3, [0.5] * 3))
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        decode = len(ds) / (time.perf_counter() - t0)
    return {"gflops_per_image": counter.get_total_flops() / 1e9, "cpu_images_per_s": cpu,
            "decode_images_per_s": decode, "threads": torch.get_num_threads()}


def estimate_t4_minutes(measured: dict[str, float], n_images: int = 10_000, n_folds: int = 1,
                        utilization: float = 0.2, workers: int = 4) -> dict[str, float]:
    """Estimated minutes of stage 03 on one T4 for ``n_images`` test images (an estimate, not a measurement).

    GPU time: FLOPs (two forwards per image with the flip, one model per fold) over the T4's fp16 peak times an
    assumed ``utilization`` (small depthwise-convolution nets reach a small share of the tensor-core peak).
    Loading time: the measured one-process decode speed times ``workers`` loader processes (Kaggle gives 4 CPUs).
    The stage takes the larger of the two, as loading and the GPU overlap.
    """
    flops = measured["gflops_per_image"] * 1e9 * 2 * n_folds * n_images
    gpu = flops / (T4_TFLOPS["fp16"] * 1e12 * utilization) / 60
    load = n_folds * n_images / (measured["decode_images_per_s"] * workers) / 60
    return {"gpu_minutes": gpu, "loading_minutes": load, "stage03_minutes": max(gpu, load)}
