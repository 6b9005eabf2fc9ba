"""Launch a training stage on several processes with torchrun (the entry point is :mod:`common.cli.torchrun`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common.core.distributed import LaunchError, in_launch, launch_info


def launch(stage: str, config: dict[str, Any], nproc: int, log_dir: Path) -> None:
    """Run one training stage on ``nproc`` local processes with torchrun and wait; raise if it fails.

    Args:
        stage: ``02`` or ``05``.
        config: the stage config as a dict (``cfg.to_dict()``).
        nproc: processes (one per GPU on CUDA).
        log_dir: where the config handed to the processes is written (the stage folder).
    """
    if launch_info().enabled:
        raise LaunchError("launch() called inside a torchrun process")
    if config.get("device", "auto") != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise LaunchError(f"nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA devices")
    from common.core import store

    config_file = store.write_json(Path(log_dir) / f"launch_{stage}.json", {"stage": stage, "config": config})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "common.cli.torchrun", "--config", str(config_file)]
    print("launching:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # stream into the notebook (and papermill's log)
        print(line, end="", flush=True)
        tail = (tail + [line])[-30:]
    if proc.wait() != 0:
        raise RuntimeError(f"distributed training (stage {stage}, nproc={nproc}) failed with exit code "
                           f"{proc.returncode}; last lines:\n{''.join(tail)}")


def train_elsewhere(stage: str, cfg, out: Path):
    """When ``cfg.nproc > 1`` and this is not a torchrun process, train the stage's folds with :func:`launch` and
    return ``cfg`` with ``force`` off, so that the caller reads the finished folds instead of retraining them;
    otherwise return ``cfg`` unchanged (the caller trains in this process). Shared by stages 02 and 05.

    Args:
        stage: ``02`` or ``05``.
        cfg: the stage config (a :class:`~common.config.TrainConfig`).
        out: the stage folder (where the launch config is written).
    """
    if cfg.nproc <= 1 or in_launch():
        return cfg
    launch(stage, cfg.to_dict(), cfg.nproc, out)
    return dataclasses.replace(cfg, force=False)
