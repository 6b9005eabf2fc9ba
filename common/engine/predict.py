"""One batched forward loop with optional horizontal-flip TTA, for embeddings (stage 03) and logits (stage 05)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.core.runtime import amp_context, configure_device, loader_workers, progress, to_memory_format
from common.data.competition import ImageDataset, build_transforms


@torch.no_grad()
def forward_images(
    forward,
    image_files: list[str],
    image_size: int,
    mean: list[float],
    std: list[float],
    batch_size: int = 64,
    tta_flip: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool = True,
    desc: str = "predict",
    n_out: int = 0,
    reduce: Callable[[np.ndarray], Any] | None = None,
    channels_last: bool = True,
    amp_cpu: bool = False,
) -> np.ndarray | list[Any]:
    """``forward`` over images read and resized as in evaluation, averaged with the horizontal flip's output.

    The one batch loop behind :func:`extract` (embeddings) and
    :func:`common.engine.classifier.predict_logits` (logits).

    Args:
        forward: maps a batch ``(N, 3, H, W)`` on ``device`` to ``(N, D)`` (e.g. ``model.embed`` or ``model``).
        image_files: image paths, one output row each, in order.
        image_size: square input size (the training size).
        mean: normalisation mean.
        std: normalisation std.
        batch_size: images per forward pass.
        tta_flip: average each output with that of the image's horizontal flip.
        device: where to run.
        num_workers: loader workers.
        amp: autocast on CUDA.
        desc: progress-bar label.
        n_out: columns of the (empty) result when there are no images.
        reduce: maps each batch's float32 ``(n, D)`` output to what is kept of it (e.g. the top-k classes of
            :func:`common.lib.topk.from_logits`), so the full ``(N, D)`` array never exists.
        channels_last: feed the batches in channels-last layout on CUDA and the CPU (faster on both; only the
            input is converted, which is enough: :func:`common.core.runtime.to_memory_format`).
        amp_cpu: with ``amp``, bf16 autocast on the CPU too (:func:`common.core.runtime.amp_context`).

    Returns:
        float32 ``(len(image_files), D)``; with ``reduce`` the list of its per-batch results, in order.
    """
    device = torch.device(device)
    configure_device(device)
    dataset = ImageDataset(image_files, transform=build_transforms(image_size, False, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(num_workers), pin_memory=device.type == "cuda")
    chunks = []
    for batch in progress(loader, desc=desc, leave=False):
        x = to_memory_format(batch["image"].to(device, non_blocking=True), device, channels_last)
        with amp_context(device, amp, amp_cpu):
            out = forward(x).float()
            if tta_flip:
                out = (out + forward(torch.flip(x, dims=[3])).float()) / 2
        chunks.append(out.cpu() if reduce is None else reduce(out.cpu().numpy()))
    if reduce is not None:
        return chunks
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, n_out), dtype=np.float32)
