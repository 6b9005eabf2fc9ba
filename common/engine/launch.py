"""Launch a training stage on several processes with torchrun (the entry point is :mod:`common.cli.torchrun`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common.core.distributed import LaunchError, in_launch, launch_info


def torchrun_args(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "",
                  rdzv_id: str = "reid") -> list[str]:
    """torchrun's arguments: ``--standalone`` on one machine, else a ``c10d`` rendezvous of ``nnodes`` machines.

    Args:
        nproc: processes on this machine.
        nnodes: machines.
        node_rank: this machine's rank.
        rdzv_endpoint: ``host:port`` every machine reaches (needed when ``nnodes > 1``).
        rdzv_id: the job id all machines share (the experiment and stage).
    """
    if nnodes <= 1:
        return ["--standalone", f"--nproc_per_node={nproc}"]
    if ":" not in rdzv_endpoint:
        raise LaunchError(f"nnodes={nnodes} needs rdzv_endpoint=host:port, got {rdzv_endpoint!r}")
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}", f"--nproc_per_node={nproc}"]


def launch(stage: str, config: dict[str, Any], nproc: int, log_dir: Path, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "") -> None:
    """Run one training stage on ``nproc`` local processes with torchrun and wait; raise if it fails.

    Args:
        stage: ``02`` or ``05``.
        config: the stage config as a dict (``cfg.to_dict()``).
        nproc: processes on this machine (one per GPU on CUDA).
        log_dir: where the config handed to the processes is written (the stage folder).
        nnodes: machines; above 1, every machine calls this with its ``node_rank`` and the same
            ``rdzv_endpoint`` (see :func:`torchrun_args`).
        node_rank: this machine's rank.
        rdzv_endpoint: ``host:port`` of the c10d rendezvous.
    """
    if launch_info().enabled:
        raise LaunchError("launch() called inside a torchrun process")
    if config.get("device", "auto") != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise LaunchError(f"nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA devices")
    from common.core import store

    config_file = store.write_json(Path(log_dir) / f"launch_{stage}.json", {"stage": stage, "config": config})
    rdzv_id = f"{config.get('exp', 'reid')}-{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           *torchrun_args(nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id),
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
    nnodes = getattr(cfg, "nnodes", 1)
    if (cfg.nproc <= 1 and nnodes <= 1) or in_launch():
        return cfg
    launch(stage, cfg.to_dict(), cfg.nproc, out, nnodes, getattr(cfg, "node_rank", 0),
           getattr(cfg, "rdzv_endpoint", ""))
    missing = [k for k in cfg.model_folds() if not (Path(out) / f"fold{k}" / "_done.json").exists()]
    if getattr(cfg, "node_rank", 0) > 0 and missing:  # global rank 0 wrote the models on node 0's disk
        raise LaunchError(f"node_rank={cfg.node_rank} finished its share of stage {stage}; the models were "
                          f"written on node 0 ({Path(out) / f'fold{missing[0]}'} is not on this machine): run "
                          "the later stages on node 0, or share the working directory between the machines")
    return dataclasses.replace(cfg, force=False)
