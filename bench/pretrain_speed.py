"""Benchmark: what stage 00 (self-supervised pretraining) and the stage-05 fine-tuning after it cost at a
parameters file's settings, measured in images per second on this machine, and the full-scale cost
extrapolated from those rates.

Data: a generated competition (:func:`common.data.demo.make_demo`) of about ``--images`` train + test images at
``--demo-size`` pixels, made under ``--root``. Image content does not change the model's speed; the decode cost
of these JPEGs is about that of real photos of the same size. Stage 00 runs ``--epochs`` epochs over train + test
(``ssl_use_test``), stage 05 ``--finetune-epochs`` epochs on fold 0, both with the parameters file's other values
(backbone, image size, batch size, AMP, workers); the rate of an epoch is its ``log.csv`` ``images_per_s``,
which counts the data loader (workers are started per epoch) as a run sees it. The first epoch includes the
start (cuDNN autotuning, worker start-up) and is reported apart; the rate used is the median of the others.

The extrapolation multiplies images seen (images x epochs, per fold for stage 05) by the measured seconds per
image: it assumes the same per-image rate on a larger set (true once an epoch is long against the start-up),
and says so in the report.

Run from the repository root on the machine in question (``--record`` appends a section to bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python -m bench.pretrain_speed --params params/ssl_gpu.yaml --record
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("REID_PROGRESS", "text")

import pandas as pd  # noqa: E402

from bench.common_args import add_param_arg, add_record_args, command_line, env_set, finish, parse_overrides  # noqa: E402

SCALES = ((3_000, "Grocery-sized"), (50_000, "a Kaggle-sized set"), (1_000_000, "ACCV WebFG-5000 scale"))
"""Set sizes (train + test images) that the report extrapolates to."""


def steady_rate(log: pd.DataFrame) -> tuple[float, float]:
    """``(first epoch's images/s, median images/s of the later epochs)`` from a stage's ``log.csv``.

    With one epoch only, both are that epoch's rate.

    Args:
        log: rows per epoch with an ``images_per_s`` column.
    """
    if log.empty or "images_per_s" not in log:
        raise ValueError("log.csv has no epochs with images_per_s")
    rates = [float(r) for r in log["images_per_s"]]
    return rates[0], statistics.median(rates[1:] if len(rates) > 1 else rates)


def hours(images: float, epochs: float, rate: float) -> float:
    """Hours to process ``images`` x ``epochs`` images at ``rate`` images per second.

    Args:
        images: images per epoch.
        epochs: epochs.
        rate: measured images per second (> 0).
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    return images * epochs / rate / 3600.0


def fmt_hours(h: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h`` or ``2.5 days``, whichever reads best."""
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def gib(g: float | None) -> str:
    """Peak GPU memory as ``12.3 GiB peak`` (``-`` when not measured, on the CPU)."""
    return "-" if g is None else f"{g:.1f} GiB peak"


def cost_table(params: dict[str, Any], ssl_rate: float, ft_rate: float | None) -> str:
    """Markdown rows: per set size, the full-scale stage-00 and stage-05 time at the measured rates.

    Stage 00 sees every train + test image ``ssl_epochs`` times; stage 05 trains each of ``n_folds`` folds on
    ``(n_folds - 1) / n_folds`` of the train images (taken here as the whole set) for ``epochs`` epochs.

    Args:
        params: the parameters file's values (``ssl_epochs``, ``epochs``, ``n_folds``, ``folds``).
        ssl_rate: stage 00 images per second.
        ft_rate: stage 05 training images per second (None: not measured).
    """
    ssl_epochs = float(params.get("ssl_epochs", 2))
    epochs = float(params.get("epochs", 10))
    n_folds = int(params.get("n_folds", 5))
    folds = params.get("folds", "0")
    n_run = n_folds if str(folds) == "all" else len(str(folds).split(","))
    lines = [f"| images | set | stage 00 ({ssl_epochs:g} epochs) | stage 05 ({n_run} fold(s) x {epochs:g} epochs) |",
             "|---|---|---|---|"]
    for n, what in SCALES:
        ssl = fmt_hours(hours(n, ssl_epochs, ssl_rate))
        ft = "not measured" if ft_rate is None else fmt_hours(
            hours(n * (n_folds - 1) / n_folds, epochs * n_run, ft_rate))
        lines.append(f"| {n:,} | {what} | {ssl} | {ft} |")
    return "\n".join(lines)


def measure(args: argparse.Namespace, params: dict[str, Any], root: Path) -> dict[str, Any]:
    """Generate the data under ``root``, run stage 00 then stage 05 (fold 0) with ``REID_WORKING_DIR`` set by the
    caller, and return their logs and peak memory."""
    import torch

    from common.config import ClassifierConfig, PretrainConfig, for_stage
    from common.data.demo import make_demo
    from common.stages import pretrain_ssl, train_classifier

    per_individual = 6 + 1.5  # make_demo's mean train + test images per individual (4-8, 1-2)
    n_ind = max(12, round(args.images / per_individual))
    t0 = time.perf_counter()
    data = make_demo(root / "inputs" / "speed", n_individuals=n_ind, n_unseen=max(2, n_ind // 5),
                     image_size=tuple(args.demo_size), seed=0)
    made_s = time.perf_counter() - t0
    base = {**params, "data": str(data), "exp": "speed", "pretrained": "speed", "device": args.device,
            "ssl_epochs": args.epochs, "epochs": args.finetune_epochs, "folds": "0"}
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pre = pretrain_ssl.run_pretrain(PretrainConfig.from_params(for_stage("00", base)))
    ssl_log = pretrain_ssl.training_log("speed")
    ssl_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    ft_log, ft_mem = None, None
    if args.finetune_epochs > 0:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train_classifier.run_classification(ClassifierConfig.from_params(for_stage("05", base)))
        ft_log = pd.read_csv(root / "working" / "speed" / "05_classifier" / "fold0" / "log.csv")
        ft_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return {"images": pre["images"], "made_s": made_s, "ssl_log": ssl_log, "ssl_mem": ssl_mem, "ft_log": ft_log,
            "ft_mem": ft_mem, "device": device, "torch": torch.__version__, "metrics": pre}


def report(args: argparse.Namespace, params: dict[str, Any], res: dict[str, Any], command: str, wall: float) -> str:
    """The markdown section for bench/RESULTS.md."""
    from bench._report import cpu_model, utc_stamp

    first, rate = steady_rate(res["ssl_log"])
    ft = steady_rate(res["ft_log"]) if res["ft_log"] is not None else None
    keys = ("backbone", "ssl_method", "ssl_image_size", "ssl_batch_size", "ssl_mask_ratio", "ssl_decoder_dim",
            "ssl_decoder_depth", "image_size", "batch_size", "amp", "num_workers")
    lines = [
        f"## Stage 00 and stage 05 cost at `{args.params}`: measured images/s on {res['device']}, full scale extrapolated",
        "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {res['device']}, nproc {os.cpu_count()}, {cpu_model()}, torch {res['torch']}",
        f"- data: a generated competition (`make_demo`, {args.demo_size[0]} x {args.demo_size[1]} px JPEGs), "
        f"{res['images']} train + test images for stage 00, its train fold 0 for stage 05; made in {res['made_s']:.0f} s",
        "- config: " + ", ".join(f"{k} {params[k]}" for k in keys if k in params) +
        f"; stage 00 {args.epochs} epochs, stage 05 {args.finetune_epochs} epoch(s) on fold 0 (from stage 00's backbone)",
        f"- protocol: images/s from each stage's `log.csv` (loader included, workers started per epoch); the first "
        f"epoch (start-up) apart, the rate is the median of the later ones. Wall time {wall:.0f} s",
        "",
        "| stage | first epoch img/s | steady img/s | epochs | GPU memory |",
        "|---|---|---|---|---|",
        f"| 00 {params.get('ssl_method', 'simclr')} pretraining | {first:.0f} | {rate:.0f} | {len(res['ssl_log'])} "
        f"| {gib(res['ssl_mem'])} |",
    ]
    if ft is not None:
        lines.append(f"| 05 fine-tuning (training steps + validation) | {ft[0]:.0f} | {ft[1]:.0f} | "
                     f"{len(res['ft_log'])} | {gib(res['ft_mem'])} |")
    lines += ["", "Full-scale time at these rates (an extrapolation: same per-image rate on a larger set; loading "
              "real photos larger than the generated ones can be slower):", "",
              cost_table(params, rate, ft[1] if ft is not None else None), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params/ssl_gpu.yaml", help="the parameters file whose cost is measured")
    ap.add_argument("--images", type=int, default=3000, help="about this many train + test images generated")
    ap.add_argument("--demo-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    ap.add_argument("--epochs", type=int, default=4, help="stage 00 epochs measured")
    ap.add_argument("--finetune-epochs", type=int, default=2, help="stage 05 epochs measured on fold 0 (0: skip)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--root", default="", help="where the data and stage outputs go (default: a temporary folder)")
    add_param_arg(ap, "parameters over the file's (for example ssl_batch_size=128 or backbone=vit_small_patch16_224)")
    add_record_args(ap)
    args = ap.parse_args(argv)
    if min(args.images, args.epochs) < 1 or args.finetune_epochs < 0:
        ap.error("--images and --epochs must be >= 1, --finetune-epochs >= 0")

    from common.config import known_params, load_params

    params = {**load_params(args.params), **parse_overrides(args.param, known_params(), "a parameter")}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = Path(args.root or stack.enter_context(tempfile.TemporaryDirectory(prefix="pretrainspeed-")))
        stack.enter_context(env_set("REID_WORKING_DIR", str(root / "working")))
        res = measure(args, params, root)
    text = report(args, params, res, command_line("pretrain_speed", argv), time.perf_counter() - t0)
    finish(args, text)
    res["text"] = text
    return res


if __name__ == "__main__":
    main()
