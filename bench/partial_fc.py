"""Benchmark: stage 05 with Partial FC (``partial_fc``) against every class, on a real set with many classes.

Partial FC bounds the classifier head's training cost when the classes are thousands of individuals
(``bench/scale.py`` at Happywhale's size). This measures what it costs in accuracy, on real data: the individuals
of ``../shared/datasets/dogfaces`` (649 dogs, 2-6 aligned faces each) as classes. Each dog with two or more
images gives one image to the test (a closed-set test: every test image shows a known dog); the rest is
training. Stage 05 trains fold 0 of five (so about 4/5 of the training images) once per ``--sizes`` value and
training seed, and scores the test images: accuracy, balanced accuracy, top-5, and the training seconds.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.partial_fc --sizes 0,64 --seeds 0,1 --record
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from bench._report import append_section, torch_machine_line, utc_stamp  # noqa: E402
from bench.reid_openset import list_images, write_competition  # noqa: E402
from common.config import parse_cli_value  # noqa: E402
from common.core import paths  # noqa: E402

# Stage 05 on 128 px faces: ImageNet EfficientNet-Lite0 (offline weights), the first two blocks frozen, a
# sub-centre ArcFace head over the dogs, as the scale bench's stage 05 has.
BASE = dict(backbone="tf_efficientnet_lite0", pretrained="auto", image_size=128, epochs=6, batch_size=32, lr=1e-3,
            head_lr_mult=10.0, head="subcenter", arc_k=2, freeze_blocks=2, n_folds=5, folds="0",
            label_column="individual_id", use_crops=False, tta_flip=False, num_workers=-1, warmup_epochs=0.5)


def closed_split(table: pd.DataFrame, seed: int) -> pd.Series:
    """``train`` / ``test`` per row: one random image of every individual with two or more images is a test image."""
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=table.index)
    for _, rows in table.groupby("individual_id").groups.items():
        if len(rows) >= 2:
            split[rows[rng.integers(len(rows))]] = "test"
    return split


def run_one(data: Path, partial_fc: int, seed: int, overrides: dict) -> dict:
    """Train (or reuse) one stage-05 run; its fold-0 test report and training seconds."""
    from common.config import ClassifierConfig
    from common.data.competition import open_competition
    from common.stages.train_classifier import run_classification, training_logs

    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    exp = f"bench-pfc-{data.name}-n{partial_fc}-s{seed}" + (f"-{tag}" if tag else "")
    cfg = ClassifierConfig(**{**BASE, **overrides, "partial_fc": partial_fc, "seed": seed, "data": str(data),
                              "exp": exp})
    metrics = run_classification(cfg, open_competition(str(data)))
    logs = training_logs(exp, [0])
    return {**metrics["test_by_fold"]["0"], "partial_fc": partial_fc, "seed": seed, "exp": exp,
            "train_s": float(logs["seconds"].sum()), "epochs": len(logs)}


def table(runs: list[dict], n_classes: int) -> str:
    lines = ["| head scores per training batch | seeds | accuracy | balanced accuracy | top-5 | training s (mean) |",
             "|---|---|---|---|---|---|"]
    for n in sorted({r["partial_fc"] for r in runs}):
        part = [r for r in runs if r["partial_fc"] == n]
        cells = []
        for m in ("accuracy", "balanced_accuracy", "top5"):
            v = np.array([r[m] for r in part], float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f} "
                         f"({', '.join(f'{x:.3f}' for x in v)})")
        label = f"every class ({n_classes})" if n == 0 or n >= n_classes else f"{n} classes (`partial_fc={n}`)"
        lines.append(f"| {label} | {len(part)} | {' | '.join(cells)} | {np.mean([r['train_s'] for r in part]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="dogfaces", help="dogfaces, nyala or lion (../shared/datasets)")
    ap.add_argument("--sizes", default="0,64", help="partial_fc values (0: every class)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="override a BASE value")
    ap.add_argument("--record", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    load, started = os.getloadavg()[0], utc_stamp()
    overrides = {k: parse_cli_value(v) for k, _, v in (item.partition("=") for item in args.p)}
    images = list_images(args.dataset)
    split = closed_split(images, args.split_seed)
    data = write_competition(images, split, paths.working_dir() / "bench" / "partial_fc"
                             / f"{args.dataset}-closed{args.split_seed}")
    n_classes = images.loc[split == "train", "individual_id"].nunique()
    runs, t0 = [], time.perf_counter()
    for n in [int(x) for x in args.sizes.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            runs.append(run_one(data, n, seed, overrides))
            print(f"partial_fc={n} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, top-5 {runs[-1]['top5']:.3f}, "
                  f"{runs[-1]['train_s']:.0f} s of training", flush=True)
    text = table(runs, n_classes)
    print(text)
    if args.record:
        cmd = " ".join(["HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.partial_fc",
                        *(sys.argv[1:] if argv is None else argv)])
        n_test = int((split == "test").sum())
        append_section(ROOT / "bench" / "RESULTS.md", (
            f"\n## Partial FC on {args.dataset}: stage 05 over {n_classes} individuals as classes (bench/partial_fc.py)\n\n"
            f"- command: `{cmd}` (from the repository root)\n- date: {started}; wall time of this call "
            f"{(time.perf_counter() - t0) / 60:.1f} min (runs already cached are reused)\n"
            f"- machine: {torch_machine_line('cpu', load)}\n"
            f"- data: {int((split == 'train').sum())} training images of {n_classes} individuals; {n_test} test images, "
            f"one per individual with two or more images (closed set); fold 0 of 5 trains\n"
            f"- config: {({**BASE, **overrides})}; mean ± sd over seeds, each seed's value in brackets\n\n{text}\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
