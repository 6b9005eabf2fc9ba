"""Per-image read speed: one JPEG file per image (what the loaders read) vs one uint8 memmap shard.

For each synthetic competition (``common.data.synth``, 96 x 72 px) the script reads every train image in a seeded
random order (a training epoch's access pattern) in one process:

* ``jpeg``: ``cv2.imread`` of ``train_images/<id>.jpg`` (the loader's decode, ``common.data.competition``), then BGR -> RGB;
* ``memmap``: the same images decoded once into one ``(n, H, W, 3)`` uint8 ``.npy`` file, opened with
  ``np.load(mmap_mode="r")`` and copied row by row.

It prints CPU microseconds per image (``time.process_time``: wall time on a loaded shared machine would count
other jobs) and bytes on disk per image. The page cache is warm (the
files were just written; caches are not dropped on a shared machine), so this compares decode and file-open
costs, not disk seeks.

Usage (from the repository root; folders outside the repository)::

    nice -n 10 .venv/bin/python -m bench.read_speed --root /tmp/reid_read --sizes 1000 5000 20000 --record
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_jpeg(paths: list[str]) -> float:
    """CPU seconds (user + system of this process) to decode every path with ``cv2.imread`` (BGR -> RGB)."""
    t = time.process_time()
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return time.process_time() - t


def build_shard(paths: list[str], out: Path) -> Path:
    """Decode ``paths`` once into one uint8 ``.npy`` (all images must share a size)."""
    first = cv2.imread(paths[0], cv2.IMREAD_COLOR)
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(paths), *first.shape))
    for i, p in enumerate(paths):
        arr[i] = cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    arr.flush()
    del arr
    return out


def read_shard(shard: Path, order: np.ndarray) -> float:
    """CPU seconds (user + system, page faults included) to copy every row of the memmap in ``order``."""
    t = time.process_time()
    arr = np.load(shard, mmap_mode="r")
    for i in order:
        np.array(arr[i])
    return time.process_time() - t


def measure(folder: Path, seed: int = 0) -> dict[str, float]:
    """Both read paths on ``folder``'s train images in one seeded random order."""
    train = pd.read_csv(folder / "train.csv")
    order = np.random.default_rng(seed).permutation(len(train))
    paths = [str(folder / "train_images" / train["image"][i]) for i in range(len(train))]
    shard = build_shard(paths, folder.parent / f".{folder.name}_shard.npy")
    try:
        jpeg_s = read_jpeg([paths[i] for i in order])
        mm_s = read_shard(shard, order)
        jpeg_bytes = sum(os.path.getsize(p) for p in paths)
        shard_bytes = shard.stat().st_size
    finally:
        shard.unlink(missing_ok=True)
    n = len(paths)
    return dict(images=n, jpeg_us=1e6 * jpeg_s / n, memmap_us=1e6 * mm_s / n, jpeg_kb=jpeg_bytes / n / 1024,
                memmap_kb=shard_bytes / n / 1024)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/reid_read")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    from bench._report import append_section, cpu_model, utc_stamp
    from common.data.synth import make_synth

    load, started = os.getloadavg()[0], utc_stamp()
    lines = ["| images (train + test) | train images read | JPEG CPU us/img | memmap CPU us/img | JPEG / memmap | "
             "JPEG KB/img | memmap KB/img |", "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        folder = make_synth(Path(args.root) / f"synth_{n}", n)
        r = measure(folder)
        lines.append(f"| {n:,} | {r['images']:,} | {r['jpeg_us']:.0f} | {r['memmap_us']:.1f} | "
                     f"{r['jpeg_us'] / r['memmap_us']:.0f}x | {r['jpeg_kb']:.1f} | {r['memmap_kb']:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.record:
        cmd = " ".join(["nice -n 10 .venv/bin/python -m bench.read_speed", *(argv or sys.argv[1:])])
        append_section(ROOT / "bench" / "RESULTS.md", (
            "\n## Per-image read speed: JPEG files vs one uint8 memmap shard (96 x 72 px synthetic images)\n\n"
            f"- command: `{cmd}` (from the repository root)\n"
            f"- date: {started}; machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, load average at "
            f"start {load:.2f}; CPU time of one process (user + system), page cache warm, random order\n\n"
            + text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
