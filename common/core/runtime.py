"""The execution environment: device choice, seeding, mixed precision and progress bars.

Progress bars: in an interactive Jupyter kernel ``tqdm.auto`` draws a widget; under papermill a widget is
invisible in the log, so the runner sets ``REID_PROGRESS=text`` and bars are written as plain text lines to
stderr at most every ``REID_PROGRESS_INTERVAL`` seconds (default 10), which papermill's ``--log-output``
streams and the executed notebook keeps.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def worker_init(worker_id: int) -> None:
    """DataLoader worker seeding: NumPy, ``random`` and the dataset's albumentations pipeline.

    Each worker holds a copy of the transform with the same seed; albumentations 2.x draws from its own
    generators, not NumPy's, so without reseeding them every worker would augment identically.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def amp_context(device: torch.device, enabled: bool, cpu: bool = False):
    """Autocast on CUDA (bf16 where the GPU supports it, else fp16); on the CPU bf16 only when ``cpu`` is set;
    a no-op when disabled.

    Args:
        device: where the forward runs.
        enabled: mixed precision at all (the configs' ``amp``).
        cpu: bf16 autocast on the CPU too (the configs' ``amp_cpu``): faster where the CPU has bf16 instructions
            (AVX512-BF16, AMX; ``bench/cpu_bf16.py`` measures it), slower where it emulates them.
    """
    if not enabled or device.type not in ("cuda", "cpu") or (device.type == "cpu" and not cpu):
        return nullcontext()
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    """fp16 autocast needs loss scaling; bf16 and fp32 do not."""
    return enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar suited to where the code runs (see the module docstring)."""
    if os.environ.get("REID_PROGRESS", "") == "text":
        from tqdm import tqdm

        kwargs.setdefault("mininterval", float(os.environ.get("REID_PROGRESS_INTERVAL", "10")))
        kwargs.setdefault("ascii", True)
        return tqdm(iterable, **kwargs)
    if os.environ.get("REID_PROGRESS", "") == "off":
        from tqdm import tqdm

        kwargs["disable"] = True
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """``LambdaLR`` factor: linear warmup over ``warmup_steps``, then a cosine from 1 to 0 at ``total_steps``.

    Args:
        total_steps: optimiser steps of the whole run (the schedule is stepped every batch).
        warmup_steps: steps of linear warmup (0 = none).
    """

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return fn


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one, else all of them)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def loader_workers(num_workers: int, world_size: int = 1) -> int:
    """Data-loader workers per process: ``num_workers`` as given, or, when negative, sized to the machine
    (the CPU cores this process may use, shared by the ``world_size`` processes, one left to the main loop,
    at most 8).

    Args:
        num_workers: the configured value (``-1`` = auto).
        world_size: training processes on this machine.
    """
    if num_workers >= 0:
        return num_workers
    return max(0, min(8, usable_cores() // max(1, world_size) - 1))


def configure_device(device: torch.device) -> None:
    """Speed settings for CUDA: cuDNN autotuning (fixed input sizes) and TF32 matmuls; nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_memory_format(x: torch.Tensor | torch.nn.Module, device: torch.device, channels_last: bool):
    """``x`` in channels-last layout on CUDA or the CPU when asked (4-d tensors and modules), else unchanged.

    Faster on both: under AMP on CUDA, and 1.3-1.7x for Lite0 training and extraction in float32 on a 2-core CPU
    (``bench/cpu_memory_format.py``, bench/RESULTS.md). The layout changes only rounding, not results.
    """
    if not channels_last or device.type not in ("cuda", "cpu"):
        return x
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        return x
    return x.to(memory_format=torch.channels_last)


def set_train_mode(model: torch.nn.Module, norm_eval: bool = False) -> torch.nn.Module:
    """``model.train()``; with ``norm_eval`` every BatchNorm layer is put back in eval mode (running statistics
    frozen, as mmpretrain's ``norm_eval``), while its affine parameters still train."""
    model.train()
    if norm_eval:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model
