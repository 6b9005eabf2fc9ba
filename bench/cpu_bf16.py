"""Benchmark: does bf16 autocast on the CPU (``amp_cpu``) speed up training and prediction?

``amp`` autocasts on CUDA only; ``amp_cpu`` (a shared training parameter, default off) adds bf16 autocast on the
CPU through the same :func:`common.core.runtime.amp_context` that stages 02, 03 and 05 use. Whether it pays
depends on the CPU: with bf16 instructions (AVX512-BF16, AMX) oneDNN runs the convolutions in bf16; without them
it converts and computes in float32, which costs more than it saves. This times, in channels-last (the default
layout), float32 against bf16 autocast on the models of both tracks, at ``--size``:

* stage 05's :class:`~common.lib.models.ClassifierModel` (linear head over ``--classes`` classes) and stage 02's
  :class:`~common.lib.models.EmbeddingModel` (GeM, 512-d neck, ArcFace over ``--classes`` individuals), random
  weights (speed does not depend on them);
* a training step: forward under the context, float32 cross-entropy, backward, AdamW step (batch ``--batch``);
* prediction: forward under the context and ``torch.inference_mode`` (batch ``--predict-batch``);
* a whole stage-05 training epoch (``--epoch-data``, default the generated demo; ``none`` skips it): the
  engine's own loop (:func:`common.engine.classifier.train_fold`) on ``--epoch-images`` images of a competition
  folder, JPEG decoding, augmentation and the optimiser included. The model steps above are the part that bf16
  speeds up; this row says how much of that reaches a real epoch.

The two precisions are timed in interleaved rounds (``--rounds``, each ``--seconds`` per case and round), each
case's median round is reported, and the ratio comes from the same run. The CPU's bf16 flags go in the record.

Run from the repository root (``--record`` appends a section to bench/RESULTS.md; ~8 min at the defaults):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.cpu_bf16 --record

``--epoch-data working/bench/grocery/grocery`` (laid out by ``bench.grocery``) times the epoch on real photos.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.common_args import add_record_args, command_line, env_set, finish  # noqa: E402
from bench.cpu_memory_format import images_per_s  # noqa: E402

PRECISIONS = ("float32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of :data:`BF16_FLAGS` ``/proc/cpuinfo`` lists (empty where it lists none or cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_FLAGS if f in flags]


def build(kind: str, backbone: str, classes: int, seed: int = 0) -> tuple:
    """``(model, optimizer, train_forward, predict_forward)``: a fresh model of ``kind`` (``classifier`` or
    ``embedder``, random weights, channels-last), its AdamW, ``train_forward(x, y)`` -> the logits the loss takes,
    ``predict_forward(x)`` -> what stage 05 or 03 keeps (logits; embeddings), both float32."""
    from common.lib.models import ClassifierModel, EmbeddingModel

    torch.manual_seed(seed)
    if kind == "classifier":
        model = ClassifierModel(backbone, classes, pretrained="none").to(memory_format=torch.channels_last)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), lambda x, y: model(x), lambda x: model(x)
    model = EmbeddingModel(backbone, pretrained="none", n_classes=classes).to(memory_format=torch.channels_last)
    return (model, torch.optim.AdamW(model.parameters(), lr=1e-4), lambda x, y: model(x, y)["logits"],
            lambda x: model.embed(x))


def train_step(model, opt, forward, bf16: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step under ``amp_context(cpu, True, cpu=bf16)``: forward, float32 cross-entropy, backward, AdamW."""
    from common.core.runtime import amp_context

    model.train()
    opt.zero_grad(set_to_none=True)
    with amp_context(torch.device("cpu"), True, cpu=bf16):
        logits = forward(x, y)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def predict(model, forward, bf16: bool, x: torch.Tensor) -> torch.Tensor:
    """``forward(x)`` in float32 (eval mode, inference mode) under the context."""
    from common.core.runtime import amp_context

    model.eval()
    with torch.inference_mode(), amp_context(torch.device("cpu"), True, cpu=bf16):
        return forward(x).float()


def epoch_images_per_s(data: Path, bf16: bool, round_no: int, args, workdir: Path) -> float:
    """Images/s of the first epoch of a fresh stage-05 run on ``data`` (fold 0 of ``--epoch-folds``, capped at
    ``--epoch-images`` images, random weights): :func:`common.engine.classifier.train_fold` with ``amp_cpu=bf16``,
    as the stage runs it. The run trains two epochs and validates after the second only, so the first epoch's
    figure (the engine's ``images_per_s`` log column) is training alone: loading, augmentation and the steps.
    Its outputs go under ``workdir``."""
    from common.config import ClassifierConfig
    from common.data.competition import load_competition
    from common.engine.classifier import prepare_folds, train_fold

    cfg = ClassifierConfig(data=str(data), exp=f"cpu-bf16-epoch-{'bf16' if bf16 else 'float32'}-{round_no}",
                           backbone=args.backbone, pretrained="none", image_size=args.size,
                           batch_size=args.batch, epochs=2, validate_every=2, n_folds=args.epoch_folds, folds="0",
                           max_images=args.epoch_images, amp_cpu=bf16, device="cpu", freeze_blocks=0)
    with env_set("REID_WORKING_DIR", str(workdir)), env_set("REID_PROGRESS", "off"):
        comp = load_competition(data, check_pixels=False)
        log = train_fold(cfg, comp, prepare_folds(cfg, comp), 0)
    return float(log.iloc[0]["images_per_s"])


def epoch_data(choice: str, workdir: Path) -> Path | None:
    """The competition folder of the epoch case: ``none`` -> ``None``; ``demo`` -> the generated demo
    (:func:`common.data.demo.make_demo` defaults, ~300 training images of 320x240) made under ``workdir``;
    otherwise the folder given, which must hold a ``train.csv``."""
    if choice == "none":
        return None
    if choice == "demo":
        from common.data.demo import make_demo

        return make_demo(workdir / "demo")
    path = Path(choice)
    if not (path / "train.csv").is_file():
        raise SystemExit(f"--epoch-data {choice}: no train.csv there (a competition folder, demo or none)")
    return path


def measure_epochs(args, data: Path, workdir: Path) -> dict[str, float]:
    """``{precision: median first-epoch images/s}`` over ``--rounds`` interleaved fresh runs."""
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for precision in PRECISIONS:
            times.setdefault(precision, []).append(
                epoch_images_per_s(data, precision == "bf16", r, args, workdir / "working"))
        print(f"epoch round {r + 1}/{args.rounds}: " + ", ".join(f"{p} {v[-1]:.1f}" for p, v in times.items()),
              flush=True)
    return {p: statistics.median(v) for p, v in times.items()}


def relative_difference(kind: str, backbone: str, classes: int, size: int) -> float:
    """Largest absolute difference between the bf16 and float32 outputs of one batch (same weights), relative to
    the largest float32 output: bf16 keeps ~3 significant digits, so ~1e-2 is expected, not ~1e-6."""
    model, _, _, forward = build(kind, backbone, classes)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    fp32, bf16 = (predict(model, forward, flag, x) for flag in (False, True))
    return float((fp32 - bf16).abs().max() / fp32.abs().max())


def measure(args) -> dict[tuple[str, str, str], float]:
    """``{(model kind, case, precision): median images/s}`` over the interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    built = {kind: build(kind, args.backbone, args.classes) for kind in args.models}
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        xt = torch.randn(args.batch, 3, args.size, args.size, generator=gen).contiguous(
            memory_format=torch.channels_last)
        yt = torch.randint(0, args.classes, (args.batch,), generator=gen)
        xp = torch.randn(args.predict_batch, 3, args.size, args.size, generator=gen).contiguous(
            memory_format=torch.channels_last)
        for kind, (model, opt, train_forward, predict_forward) in built.items():
            for precision in PRECISIONS:
                bf16 = precision == "bf16"
                times.setdefault((kind, "train", precision), []).append(images_per_s(
                    functools.partial(train_step, model, opt, train_forward, bf16, xt, yt), args.batch,
                    args.seconds))
                times.setdefault((kind, "predict", precision), []).append(images_per_s(
                    functools.partial(predict, model, predict_forward, bf16, xp), args.predict_batch,
                    args.seconds))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {c} {p} {v[-1]:.1f}"
                                                            for (k, c, p), v in times.items()), flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def report(args, ips: dict, diffs: dict, flags: list[str], load: float, wall: float,
           argv: list[str] | None, epochs: dict[str, float] | None = None, epoch_what: str = "") -> str:
    """The markdown section."""
    from bench._report import torch_machine_line, utc_stamp

    names = {"classifier": "stage 05 ClassifierModel", "embedder": "stage 02 EmbeddingModel"}
    rows = []
    for kind in args.models:
        for case in ("train", "predict"):
            a, b = ips[(kind, case, "float32")], ips[(kind, case, "bf16")]
            what = f"training step (batch {args.batch})" if case == "train" else f"prediction (batch {args.predict_batch})"
            rows.append(f"| {names[kind]} | {what} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    if epochs:
        a, b = epochs["float32"], epochs["bf16"]
        rows.append(f"| stage 05 (`train_fold`) | one training epoch, {epoch_what} (batch {args.batch}) | {a:.1f} | "
                    f"{b:.1f} | {b / a:.2f} |")
    return "\n".join([
        "",
        f"## bf16 autocast on the CPU (`amp_cpu`): training step and prediction ({args.backbone}, {args.size} px)",
        "",
        f"- command: `{command_line('cpu_bf16', argv)}` (from the repository root)",
        f"- date: {utc_stamp()}; wall time {wall / 60:.1f} min",
        f"- machine: {torch_machine_line('cpu', load)}; bf16 CPU flags: {', '.join(flags) or 'none'}",
        f"- config: random weights, channels-last, {args.classes} classes, AdamW; {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s per case, median round"
        + (f"; the epoch row: {args.rounds} interleaved fresh runs per precision, median, the first epoch of each "
           "(training only: loading, augmentation, steps; no validation)" if epochs else ""),
        "- outputs: bf16 against float32 on one batch, largest difference relative to the largest output: "
        + ", ".join(f"{names[k]} {d:.1e}" for k, d in diffs.items()),
        "",
        "| model | case | float32 images/s | bf16 images/s | bf16 / float32 |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--models", nargs="+", choices=("classifier", "embedder"), default=["classifier", "embedder"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--predict-batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=81)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="timing per case, precision and round")
    ap.add_argument("--epoch-data", default="demo", metavar="DIR|demo|none",
                    help="competition folder whose train.csv images the stage-05 epoch row trains on (demo: the "
                         "generated demo; none: skip the row)")
    ap.add_argument("--epoch-images", type=int, default=320, help="images of --epoch-data used (0: all)")
    ap.add_argument("--epoch-folds", type=int, default=10, help="n_folds of the epoch runs (fold 0 trains)")
    add_record_args(ap)
    args = ap.parse_args(argv)
    if args.size < 32 or args.rounds < 1 or args.seconds < 0 or args.threads < 1:
        raise SystemExit("--size >= 32, --rounds >= 1, --seconds >= 0, --threads >= 1")
    if args.epoch_images < 0 or args.epoch_folds < 2:
        raise SystemExit("--epoch-images >= 0, --epoch-folds >= 2")

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    diffs = {kind: relative_difference(kind, args.backbone, args.classes, min(args.size, 96)) for kind in args.models}
    ips = measure(args)
    with tempfile.TemporaryDirectory(prefix="cpu_bf16_") as tmp:
        data = epoch_data(args.epoch_data, Path(tmp))
        epochs = measure_epochs(args, data, Path(tmp)) if data is not None else None
        what = ""
        if data is not None:
            n = len(pd.read_csv(data / "train.csv", usecols=[0]))
            n = min(n, args.epoch_images) if args.epoch_images else n
            source = "the generated demo" if args.epoch_data == "demo" else f"`{args.epoch_data}`"
            what = f"{n} images of {source}, fold 0 of {args.epoch_folds} held out"
    flags = cpu_flags()
    finish(args, report(args, ips, diffs, flags, load, time.perf_counter() - t0, argv, epochs, what))
    return {"images_per_s": ips, "relative_difference": diffs, "flags": flags, "epoch_images_per_s": epochs}


if __name__ == "__main__":
    main()
