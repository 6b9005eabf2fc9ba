"""Entry point of each torchrun process: ``torchrun --nproc_per_node=N -m common.cli.torchrun --stage 02 ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.core.distributed import LaunchError, barrier, launch_info, setup
from common.data import artefacts
from common.stages import train_embedder


def _config_class(stage: str):
    from common.config import ClassifierConfig, EmbedderConfig

    classes = {"02": EmbedderConfig, "05": ClassifierConfig}
    if stage not in classes:
        raise LaunchError(f"stage {stage!r} does not train: only stages 02 and 05 run under torchrun")
    return classes[stage]


def run_stage(stage: str, config: dict[str, Any]) -> None:
    """Train every requested fold of stage ``stage`` in this process (one of the torchrun processes)."""
    from common.data.unreadable import open_checked

    cfg = _config_class(stage)(**config)
    comp = open_checked(cfg)
    if stage == "02":
        train_embedder.run_training(cfg, comp, _folds(stage, cfg, comp, train_embedder.prepare_folds))
    else:
        from common.engine import classifier as classify_train

        folds = _folds(stage, cfg, comp, classify_train.prepare_folds)
        for fold in cfg.model_folds():  # with full_fit, the model on every image too
            classify_train.train_fold(cfg, comp, folds, fold)


def _folds(stage, cfg, comp, prepare):
    """Rank 0 writes the fold table; the others read it once it is there."""
    from common.core.runtime import resolve_device

    info = setup(resolve_device(cfg.device), cfg.batch_size, cfg.sync_bn)
    table = prepare(cfg, comp) if info.is_main else None
    barrier(info)
    return table if info.is_main else artefacts.read_folds(cfg.exp, stage)


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process (``python -m common.cli.torchrun``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="JSON written by launch(): {'stage': ..., 'config': {...}}")
    parser.add_argument("--stage", help="02 or 05 (by hand, with --params / -p like the runner)")
    parser.add_argument("--params", help="YAML parameters file")
    parser.add_argument("--data")
    parser.add_argument("--exp")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.config:
        spec = json.loads(Path(args.config).read_text())
        stage, config = spec["stage"], spec["config"]
    elif args.stage:
        from common.cli import pipeline

        _config_class(args.stage)  # only a training stage runs here
        params = pipeline.merge_params(args.params, args.param, args.data, args.exp)
        config = pipeline.stage_params(args.stage, params)  # flat keys, then <stage>.key ones over them
        stage = args.stage
    else:
        parser.error("give --config (from launch) or --stage with --params/-p")
    launch_info()  # a half-set environment fails here, before any data is read
    try:
        run_stage(stage, config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
