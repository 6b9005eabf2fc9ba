"""Benchmark: does the channels-last memory format speed up training and extraction on the CPU?

``channels_last`` (a shared training parameter, default on) is applied on CUDA only (:func:`common.core.runtime.
to_memory_format`), where it is faster under AMP. This measures whether the CPU would gain from it too: stage 02's
:class:`~common.lib.models.EmbeddingModel` (random weights: speed does not depend on them; GeM, 512-d neck, ArcFace
over ``--classes`` individuals) timed in the default contiguous layout (NCHW) and in channels-last (NHWC), at each
``--sizes``:

* a training step: forward, ArcFace loss, backward, AdamW step (batch ``--batch``);
* extraction: forward under ``torch.inference_mode`` (batch ``--extract-batch``).

The two layouts are timed in interleaved rounds (``--rounds``, each ``--seconds`` per case and round), and each
case's median round is reported, so a load change hits both alike; the ratio comes from the same run.

Run from the repository root (``--record`` appends a section to bench/RESULTS.md; ~5 min at the defaults):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.cpu_memory_format --record
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common_args import add_record_args, command_line, finish  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def build(backbone: str, classes: int, layout: torch.memory_format, seed: int = 0) -> tuple:
    """``(model, optimizer)``: a fresh EmbeddingModel (random weights) in ``layout``, and its AdamW."""
    from common.lib.models import EmbeddingModel

    torch.manual_seed(seed)
    model = EmbeddingModel(backbone, pretrained="none", n_classes=classes).to(memory_format=layout)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step (forward with labels, cross-entropy on the ArcFace logits, backward, AdamW); the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x, y)["logits"], y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def extract(model, x: torch.Tensor) -> torch.Tensor:
    """The embeddings of ``x`` (eval mode, inference mode)."""
    model.eval()
    with torch.inference_mode():
        return model(x)["embedding"]


def images_per_s(fn, n_images: int, seconds: float) -> float:
    """Images per second of ``fn()`` (``n_images`` each call) over at least ``seconds`` and 2 calls, after one
    warm-up call."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls * n_images / (time.perf_counter() - t0)


def same_outputs(backbone: str, classes: int, size: int) -> float:
    """Largest absolute difference between the two layouts' embeddings of the same batch (same weights): the
    layouts must compute the same function."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    outs = [extract(build(backbone, classes, fmt)[0], x.contiguous(memory_format=fmt)) for fmt in LAYOUTS.values()]
    return float((outs[0] - outs[1]).abs().max())


def measure(args) -> dict[tuple[str, int, str], float]:
    """``{(case, size, layout): median images/s}`` over the interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    models = {name: build(args.backbone, args.classes, fmt) for name, fmt in LAYOUTS.items()}
    times: dict[tuple[str, int, str], list[float]] = {}
    for r in range(args.rounds):
        for size in args.sizes:
            xt = torch.randn(args.batch, 3, size, size, generator=gen)
            yt = torch.randint(0, args.classes, (args.batch,), generator=gen)
            xe = torch.randn(args.extract_batch, 3, size, size, generator=gen)
            for name, fmt in LAYOUTS.items():
                model, opt = models[name]
                a, b = xt.contiguous(memory_format=fmt), xe.contiguous(memory_format=fmt)
                times.setdefault(("train", size, name), []).append(
                    images_per_s(functools.partial(train_step, model, opt, a, yt), args.batch, args.seconds))
                times.setdefault(("extract", size, name), []).append(
                    images_per_s(functools.partial(extract, model, b), args.extract_batch, args.seconds))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c}@{s} {n} {v[-1]:.1f}"
                                                            for (c, s, n), v in times.items()), flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def report(args, ips: dict, max_diff: float, load: float, wall: float, argv: list[str] | None) -> str:
    """The markdown section."""
    from bench._report import torch_machine_line, utc_stamp

    rows = []
    for case in ("train", "extract"):
        for size in args.sizes:
            c, cl = ips[(case, size, "contiguous")], ips[(case, size, "channels_last")]
            what = f"training step (batch {args.batch})" if case == "train" else f"extraction (batch {args.extract_batch})"
            rows.append(f"| {what} | {size} | {c:.1f} | {cl:.1f} | {cl / c:.2f} |")
    return "\n".join([
        "",
        f"## Channels-last on the CPU: stage 02's embedding model, training step and extraction ({args.backbone})",
        "",
        f"- command: `{command_line('cpu_memory_format', argv)}` (from the repository root)",
        f"- date: {utc_stamp()}; wall time {wall / 60:.1f} min",
        f"- machine: {torch_machine_line('cpu', load)}",
        f"- config: EmbeddingModel({args.backbone}, random weights, GeM, 512-d neck, ArcFace over {args.classes} "
        f"individuals), AdamW; {args.rounds} interleaved rounds of {args.seconds:g} s per case, median round",
        f"- same function: the two layouts' embeddings of one batch differ by at most {max_diff:.1e}",
        "",
        "| case | px | contiguous images/s | channels-last images/s | channels-last / contiguous |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 256])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--extract-batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="timing per case, layout and round")
    add_record_args(ap)
    args = ap.parse_args(argv)
    if min(args.sizes) < 32 or args.rounds < 1 or args.seconds < 0 or args.threads < 1:
        raise SystemExit("--sizes >= 32, --rounds >= 1, --seconds >= 0, --threads >= 1")

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    max_diff = same_outputs(args.backbone, args.classes, min(args.sizes))
    ips = measure(args)
    finish(args, report(args, ips, max_diff, load, time.perf_counter() - t0, argv))
    return {"images_per_s": ips, "max_diff": max_diff}


if __name__ == "__main__":
    main()
