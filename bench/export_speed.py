"""Benchmark: CPU throughput of eager PyTorch vs the conv-BN-fused model, ONNX Runtime and OpenVINO
(:mod:`common.cli.export`), plus the Fashion-MNIST test accuracy of a trained stage-05 model through each engine.

Speed: stage 05's :class:`~common.lib.models.ClassifierModel` on ``mobilenetv3_small_100`` (random weights:
speed does not depend on them; 10 classes) at 224 px, batch 1 and batch 32, every engine with the same thread
count (``--threads``, default 1: on the shared 2-core machine a second thread mostly fights the other
jobs). The engines are timed in interleaved rounds (``--rounds``, each engine ``--seconds`` per batch size
per round) and each engine's median round is reported, so a load change hits all engines alike; the ratios
to eager come from the same run.

Accuracy: the fold-0 model of a trained plain-CE run of ``bench/classify_fashion.py``
(``working/bench-fmnist600-ce-*/``, tf_efficientnet_lite0 at 32 px) scores the 10,000 Fashion-MNIST test
images through each engine on the same preprocessed tensors (no flip TTA).

Run from the repository root (``--record`` appends a section to bench/RESULTS.md; ~3 min):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.export_speed --record
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common_args import add_record_args, command_line, finish  # noqa: E402
from common.cli import export  # noqa: E402
from common.core import paths  # noqa: E402

ENGINES = ("eager", "fused", "onnxruntime", "openvino")


def build_engines(model: torch.nn.Module, size: int, folder: Path, threads: int) -> dict:
    """``{engine: callable(np batch) -> np logits}`` for the four engines."""
    fused = export.fuse_conv_bn(model, image_size=size)
    onnx_path = export.export_onnx(fused, folder / "model.onnx", size)
    xml = export.export_openvino(onnx_path, folder / "model.xml")

    def torch_fn(m):
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return m(torch.from_numpy(x)).numpy()
        return run

    return {"eager": torch_fn(model.eval()), "fused": torch_fn(fused),
            "onnxruntime": export.OnnxRunner(onnx_path, threads),
            "openvino": export.OpenVinoRunner(xml, threads)}


def images_per_s(fn, x: np.ndarray, seconds: float) -> float:
    """Images per second of ``fn(x)`` over at least ``seconds`` (and 3 calls), after 2 warm-up calls."""
    for _ in range(2):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def speed(args) -> dict[tuple[str, int], float]:
    from common.lib.models import ClassifierModel

    torch.manual_seed(0)
    model = ClassifierModel(args.backbone, 10, pretrained="none").eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        engines = build_engines(model, args.size, Path(tmp), args.threads)
        times: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for batch in (1, args.batch):
                x = rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
                for name in ENGINES:
                    times.setdefault((name, batch), []).append(images_per_s(engines[name], x, args.seconds))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k[0]}@{k[1]} {v[-1]:.1f}"
                                                                for k, v in times.items()), flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(exp: str, threads: int) -> dict[str, float]:
    """Test accuracy of ``exp``'s fold-0 model through every engine, on the same preprocessed tensors."""
    import pandas as pd

    from common.data.competition import ImageDataset, build_transforms, load_competition
    from common.stages.train_classifier import load_classifier

    model, meta = load_classifier(exp, 0)
    cfg, size = meta["config"], int(meta["config"]["image_size"])
    comp = load_competition(Path(cfg["data"]), check_pixels=False)
    truth = pd.read_csv(Path(cfg["data"]) / "test.csv", dtype=str).set_index("image")[cfg["label_column"]]
    y = np.array([meta["classes"].index(c) for c in truth.reindex(comp.test["image"])])
    transform = build_transforms(size, False, meta["mean"], meta["std"])
    ds = ImageDataset(list(comp.test["path"]), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=0)
    x = torch.cat([b["image"] for b in loader]).numpy()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = build_engines(model, size, Path(tmp), threads)
        for name in ENGINES:
            logits = np.concatenate([engines[name](x[i:i + 250]) for i in range(0, len(x), 250)])
            out[name] = float((logits.argmax(1) == y).mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenetv3_small_100")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads for every engine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per engine, batch size and round")
    ap.add_argument("--exp", default="", help="trained stage-05 run for the accuracy check "
                                             "(default: the newest working/bench-fmnist600-ce-*)")
    ap.add_argument("--no-accuracy", action="store_true")
    add_record_args(ap)
    args = ap.parse_args(argv)

    from bench._report import torch_machine_line, utc_stamp

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fps = speed(args)
    acc, exp = {}, args.exp
    if not args.no_accuracy:
        if not exp:
            runs = sorted(paths.working_dir().glob("bench-fmnist600-ce-*"), key=lambda p: p.stat().st_mtime)
            exp = runs[-1].name if runs else ""
        if exp:
            acc = accuracy(exp, args.threads)
        else:
            print("no working/bench-fmnist600-ce-* run: accuracy check skipped "
                  "(run python -m bench.classify_fashion first)")
    import onnxruntime
    import openvino

    command = command_line("export_speed", argv)
    lines = [
        "", f"## Export for CPU inference: {args.backbone} at {args.size} px, eager vs fused vs ONNX Runtime "
        "vs OpenVINO", "",
        f"- command: `{command.strip()}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {torch_machine_line('cpu', load)}; load average at end {os.getloadavg()[0]:.2f}",
        f"- versions: onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
        f"{args.threads} thread(s) for every engine (torch.set_num_threads, ORT intra_op_num_threads, "
        "OpenVINO INFERENCE_NUM_THREADS, f32 precision, LATENCY hint)",
        f"- protocol: ClassifierModel({args.backbone}, 10 classes, random weights), random float32 input; "
        f"engines interleaved, {args.rounds} rounds x {args.seconds:g} s per engine and batch size, median "
        f"round reported; wall time {time.perf_counter() - t0:.0f} s", "",
        f"| engine | batch 1 img/s | x eager | batch {args.batch} img/s | x eager |" + (
            " Fashion-MNIST test acc |" if acc else ""),
        "|---|---|---|---|---|" + ("---|" if acc else ""),
    ]
    for name in ENGINES:
        b1, bn = fps[(name, 1)], fps[(name, args.batch)]
        row = (f"| {name} | {b1:.1f} | {b1 / fps[('eager', 1)]:.2f} | {bn:.1f} | "
               f"{bn / fps[('eager', args.batch)]:.2f} |")
        lines.append(row + (f" {acc[name]:.4f} |" if acc else ""))
    if acc:
        worst = max(abs(acc[n] - acc["eager"]) for n in ENGINES)
        lines += ["", f"accuracy: fold-0 model of `{exp}` on the 10,000 test images, no TTA; largest "
                  f"change vs eager {100 * worst:.2f} points (target <= 0.1)"]
    best = max(fps[(n, 1)] / fps[("eager", 1)] for n in ENGINES[1:])
    verdict = "met" if best >= 2 else "not met"
    lines.append(f"best batch-1 speed-up vs eager: {best:.2f}x (target >= 2x: {verdict})")
    finish(args, "\n".join(lines) + "\n")
    return {"fps": fps, "accuracy": acc}


if __name__ == "__main__":
    main()
