"""Benchmark: exact flat search vs the IVF-Flat index of common.lib.ann on a synthetic 1M-row gallery.

Data (seeded, default 1,000,000 gallery x 2,000 queries x 512-d float32, k=5): a mixture of Gaussians.
``n_centres`` centres are standard normal vectors scaled to unit length; each row picks a centre uniformly,
adds isotropic Gaussian noise of total norm about ``sigma`` (per-dimension std ``sigma / sqrt(d)``) and is
L2-normalised again, so with ``sigma=1`` a row's cosine to its centre is about 0.71 and to another row of the
same centre about 0.5, like embeddings of one individual. Queries are fresh draws of the same mixture (not
gallery rows).

Both indexes are built from the same gallery; build time, query time (all queries in one call), queries per
second, index memory (vectors + ids + centroids, :func:`common.lib.ann.index_bytes`) and the process' resident
memory growth during the build are reported side by side, with recall@k against the exact result for a
sweep of ``nprobe`` (doubling until recall@k reaches ``--target`` and one step further).

Run from the repository root (``--record`` appends a section to bench/RESULTS.md):

    nice -n 10 .venv/bin/python -m bench.ann_speed --record
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench._report import cpu_model, utc_stamp
from bench.common_args import add_record_args, command_line, finish
from common.lib import ann


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/status`` (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mixture(rng: np.random.Generator, centres: np.ndarray, n: int, sigma: float, chunk: int) -> np.ndarray:
    """``n`` unit rows: a uniformly chosen centre plus noise of norm ~``sigma``, normalised (built in chunks)."""
    d = centres.shape[1]
    out = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, d), dtype=np.float32)
        x *= np.float32(sigma / np.sqrt(d))
        x += centres[rng.integers(len(centres), size=m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-centres", type=int, default=20_000)
    ap.add_argument("--n-groups", type=int, default=30, help="group centres the individual centres surround")
    ap.add_argument("--group-sigma", type=float, default=0.5, help="noise norm of centres around groups")
    ap.add_argument("--sigma", type=float, default=1.2, help="noise norm of rows around their centre")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--nlist", type=int, default=None, help="default: common.lib.ann.default_nlist")
    ap.add_argument("--target", type=float, default=0.99, help="recall@k the nprobe sweep must reach")
    ap.add_argument("--seed", type=int, default=0)
    add_record_args(ap)
    args = ap.parse_args(argv)

    import faiss

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    groups = rng.standard_normal((args.n_groups, args.dim), dtype=np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = mixture(rng, groups, args.n_centres, args.group_sigma, 100_000)
    t_data, gallery = timed(lambda: mixture(rng, centres, args.n_gallery, args.sigma, 100_000))
    queries = mixture(rng, centres, args.n_queries, args.sigma, 100_000)
    print(f"data {gallery.shape} in {t_data:.1f} s", flush=True)

    rows = []
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    flat = ann.build_index(gallery, kind="flat", use_gpu=False)
    t_build, rss_flat = time.perf_counter() - t0, rss_bytes() - rss0
    t0 = time.perf_counter()
    exact = ann.ann_search(flat, queries, args.k)[1]
    t_query = time.perf_counter() - t0
    rows.append(("exact IndexFlatIP", t_build, t_query, ann.index_bytes(flat), rss_flat, 1.0))
    print(f"flat: build {t_build:.1f} s, query {t_query:.1f} s", flush=True)
    del flat

    nlist = ann.default_nlist(args.n_gallery) if args.nlist is None else args.nlist
    rss0 = rss_bytes()
    t_build, ivf = timed(lambda: ann.build_index(gallery, kind="ivf", nlist=nlist, seed=args.seed, use_gpu=False))
    rss_ivf = rss_bytes() - rss0
    print(f"ivf nlist={nlist}: build {t_build:.1f} s", flush=True)
    bytes_ivf = ann.index_bytes(ivf)
    nprobe, reached = 1, 0
    while nprobe <= nlist:
        t_query, (_, approx) = timed(lambda p=nprobe: ann.ann_search(ivf, queries, args.k, nprobe=p))
        recall = ann.recall_at_k(exact, approx, args.k)
        rows.append((f"IVF-Flat nlist={nlist}, nprobe={nprobe}", t_build, t_query, bytes_ivf, rss_ivf, recall))
        print(f"  nprobe={nprobe}: query {t_query:.2f} s, recall@{args.k} {recall:.4f}", flush=True)
        reached += recall >= args.target
        if reached >= 2 or nprobe == nlist:
            break
        nprobe = min(nprobe * 2, nlist)
    met = [r for r in rows[1:] if r[5] >= args.target]

    command = command_line("ann_speed", argv, env="")
    t_flat_q = rows[0][2]
    lines = [
        "",
        f"## Approximate search (common.lib.ann): {args.n_gallery:,} gallery x {args.n_queries:,} queries x "
        f"{args.dim}-d, k={args.k}",
        "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, faiss {faiss.__version__} CPU "
        f"({faiss.omp_get_max_threads()} OpenMP threads), numpy {np.__version__}, python "
        f"{platform.python_version()}, load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(shared machine: times are indicative)",
        f"- data: seeded ({args.seed}) two-level mixture of Gaussians: {args.n_groups} unit group centres, "
        f"{args.n_centres:,} individual centres around them (noise norm ~{args.group_sigma}, normalised), rows "
        f"around the individual centres (noise norm ~{args.sigma}), L2-normalised, float32; queries are fresh "
        "draws, not gallery rows",
        f"- IVF: IndexIVFFlat(inner product), k-means {ann.default_nlist.__name__ if args.nlist is None else 'given'}"
        f" nlist={nlist} trained on 50 x nlist random rows, 10 iterations; build = train + add; "
        f"query = all {args.n_queries:,} queries in one call; memory = vectors + ids + centroids "
        "(RSS = resident memory growth during the build)",
        f"- wall time of the whole benchmark: {time.perf_counter() - t_start:.0f} s",
        "",
        f"| index | build s | query s | queries/s | x exact speed | index MB | RSS growth MB | recall@{args.k} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, tb, tq, nbytes, rss, recall in rows:
        lines.append(
            f"| {name} | {tb:.1f} | {tq:.2f} | {args.n_queries / tq:,.0f} | {t_flat_q / tq:.1f} | "
            f"{nbytes / 2**20:,.0f} | {rss / 2**20:,.0f} | {recall:.4f} |"
        )
    if met:
        best = met[0]
        lines += ["", f"smallest nprobe with recall@{args.k} >= {args.target}: {best[0]} "
                  f"({t_flat_q / best[2]:.1f}x the exact query speed, recall {best[5]:.4f})"]
    else:
        lines += ["", f"recall@{args.k} >= {args.target} not reached"]
    finish(args, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
