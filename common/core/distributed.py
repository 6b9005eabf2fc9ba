"""Multi-process training with ``torch.distributed``: launch, process group, data sharding, DDP wrapping.

The training stages (02, 05) run unchanged in one process. With ``nproc > 1`` the notebook (or a user by hand)
starts ``torchrun``, each process trains on its share of every global batch under
:class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged across processes), and only rank 0
writes checkpoints, logs and models.

Two ways to launch, one code path:

* from the runner or a notebook: ``-p nproc=2``; :func:`launch` runs
  ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m common.cli.torchrun --config <json>``
  and streams its output into the notebook, which then reads the finished fold logs from disk;
* by hand: ``torchrun --nproc_per_node=2 -m common.cli.torchrun --stage 02 --params params/gpu.yaml --exp X``
  (the same parameters files and ``-p key=value`` overrides as the runner).

Why a run on N processes matches a run on one (tested with gloo on CPU): every process draws the same
epoch order (:func:`epoch_order`), process ``r`` takes the ``r``-th slice of each global batch
(:class:`ShardSampler`), so global batch ``k`` holds the same images at any N; augmentation is seeded per
image, not per process (:class:`~common.data.competition.ImageDataset` ``sample_seed``); DDP averages the per-process
mean losses' gradients, which equals the gradient of the global mean. What still differs: BatchNorm in training
mode normalises with per-process statistics unless ``sync_bn`` (CUDA only) or ``norm_eval``; dropout and
CutMix/Mixup draw per process. See https://pytorch.org/docs/stable/notes/ddp.html.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from common.core.runtime import loader_workers, to_memory_format, worker_init

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """A multi-process launch that cannot work (missing torchrun variables, too few GPUs, bad batch size)."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Args:
        rank: global rank (0 writes outputs).
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_info(env: dict[str, str] | None = None) -> DistInfo:
    """Read torchrun's environment variables; a partial set raises :class:`LaunchError` naming what is missing.

    Args:
        env: the environment (default ``os.environ``).
    """
    env = dict(os.environ if env is None else env)
    present = [v for v in _LAUNCH_VARS if v in env]
    if not present:
        return DistInfo()
    missing = [v for v in _LAUNCH_VARS if v not in env]
    if missing:
        raise LaunchError(
            f"incomplete torch.distributed launch: {', '.join(present)} set but {', '.join(missing)} missing. "
            "Start training processes with torchrun (`torchrun --nproc_per_node=N -m common.cli.torchrun --stage 02 "
            "...`) or with the parameter nproc=N, not by setting these variables by hand")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError as err:
        raise LaunchError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise LaunchError(f"inconsistent launch: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def in_launch() -> bool:
    """True inside a multi-process launch (torchrun set ``WORLD_SIZE`` > 1)."""
    return launch_info().enabled


def setup(device: torch.device, batch_size: int, sync_bn: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (a no-op in one process) and check the launch.

    Args:
        device: the device the stage resolved (``cuda``: one GPU per process, NCCL; ``cpu``: gloo).
        batch_size: the global batch, which must split evenly across processes.
        sync_bn: whether synchronised BatchNorm was asked for (CUDA only).
    """
    info = launch_info()
    if sync_bn and device.type != "cuda":
        raise LaunchError("sync_bn=True needs CUDA (torch's SyncBatchNorm has no CPU kernels); use "
                          "norm_eval=True to train with frozen BatchNorm statistics instead")
    if not info.enabled:
        return info
    if batch_size % info.world_size:
        raise LaunchError(f"batch_size={batch_size} does not split over {info.world_size} processes: use a "
                          f"multiple of {info.world_size} (batch_size is the global batch)")
    if device.type == "cuda":
        if torch.cuda.device_count() < info.world_size:
            raise LaunchError(f"{info.world_size} processes but {torch.cuda.device_count()} CUDA devices: use "
                              f"nproc <= {torch.cuda.device_count()} (one process per GPU)")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this process: ``cuda:<local_rank>`` under a CUDA launch, else ``device``."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in one process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over processes (epoch loss, correct, seen); returned unchanged in one process."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def prepare_model(model: torch.nn.Module, info: DistInfo, device: torch.device, sync_bn: bool = False,
                  channels_last: bool = True) -> torch.nn.Module:
    """The model on its device, before the optimiser is built: SyncBatchNorm across processes when asked,
    channels-last on CUDA when asked.

    ``sync_bn`` uses timm's converter, which also converts timm's fused ``BatchNormAct2d`` layers (torch's
    converter would turn them into plain SyncBatchNorm and drop their activation).
    """
    if sync_bn and info.enabled:
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    model = model.to(device)
    return to_memory_format(model, device, channels_last)


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, compile_model: bool = False
         ) -> torch.nn.Module:
    """The module the training loop calls: DDP across processes, optionally ``torch.compile``-d; the plain
    ``model`` in one process without compile. Checkpoints always save ``model`` itself."""
    module = model
    if info.enabled:
        ids = [info.local_rank] if device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile_model:
        module = torch.compile(module)
    return module


def epoch_loader(dataset: torch.utils.data.Dataset, order: Sequence[int], batch_size: int, info: DistInfo,
                 num_workers: int, device: torch.device, seed: int = 0) -> torch.utils.data.DataLoader:
    """This process's loader for one epoch: its :class:`ShardSampler` share of ``order`` in batches of
    ``batch_size / world_size``, pinned memory on CUDA, ``num_workers`` sized by
    :func:`~common.core.runtime.loader_workers`.

    The workers' seeds come from ``seed`` (the loader's own generator), not from the global RNG: starting the
    loader (``iter()``) draws nothing from it, so it can start at any point of the training loop (the next
    epoch's workers fill their queues while this epoch validates) without changing what the model draws.
    """
    sampler = ShardSampler(order, batch_size, info.rank, info.world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=sampler.per_process_batch, sampler=sampler, drop_last=False,
        num_workers=loader_workers(num_workers, info.world_size), pin_memory=device.type == "cuda",
        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(seed))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP (or compiled) wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def epoch_order(n: int, seed: int) -> list[int]:
    """The shuffled order of ``n`` items for one epoch; the same list in every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class ShardSampler(Sampler[int]):
    """Process ``rank``'s share of an epoch order, cut into global batches of ``batch_size``.

    Global batch ``k`` is ``order[k*B:(k+1)*B]``; process ``r`` of ``N`` takes its ``r``-th slice of ``B/N``
    items, so the images of every global batch do not depend on ``N``. Incomplete last batches are dropped
    when the order holds more than one batch (as ``drop_last`` does).

    Args:
        order: the epoch's item order (same list in every process).
        batch_size: the global batch size ``B`` (a multiple of ``world_size``).
        rank: this process's rank.
        world_size: number of processes ``N``.
    """

    def __init__(self, order: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise LaunchError(f"batch_size={batch_size} is not a multiple of world_size={world_size}")
        n_batches = len(order) // batch_size if len(order) > batch_size else 1
        if world_size > 1 and len(order) < batch_size:
            raise LaunchError(f"{len(order)} training images for a global batch of {batch_size}: lower "
                              "batch_size or use fewer processes")
        per = batch_size // world_size
        self.indices = [int(i) for k in range(n_batches)
                        for i in order[k * batch_size + rank * per:k * batch_size + (rank + 1) * per]]
        self.per_process_batch = per
        self.n_batches = n_batches if len(order) else 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------ launching
