"""Benchmark: exact top-k cosine search with common.lib.retrieval.search (faiss) vs scikit-learn and torch.

Random seeded unit vectors (default 20k queries x 50k gallery x 512-d, k=5). Each method is timed once per
repeat (best kept), its top-k compared with faiss' by set per query, and with ``--record`` a section is
appended to bench/RESULTS.md with the exact command, the machine and the date.

Run from the repository root:

    nice -n 10 .venv/bin/python -m bench.retrieval_speed --record

scikit-learn is used here only as a reference (it is not a dependency of ``common``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from bench._report import cpu_model, utc_stamp
from bench.common_args import add_record_args, command_line, finish
from common.lib.retrieval import l2_normalize, search


def run_sklearn(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gallery)
    return nn.kneighbors(queries, return_distance=False)


def run_torch(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int) -> np.ndarray:
    import torch

    g = torch.from_numpy(gallery)
    out = []
    with torch.inference_mode():
        for start in range(0, len(queries), chunk):
            sim = torch.from_numpy(queries[start : start + chunk]) @ g.T
            out.append(sim.topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def agreement(ref: np.ndarray, other: np.ndarray, gallery: np.ndarray, queries: np.ndarray) -> dict:
    """Per-query set agreement of top-k; disagreements checked for float near-ties in float64."""
    same = np.array([set(a) == set(b) for a, b in zip(ref, other, strict=True)])
    ties = 0
    for q in np.flatnonzero(~same):
        diff = np.array(sorted(set(ref[q]) ^ set(other[q])))
        sims = gallery[diff].astype(np.float64) @ queries[q].astype(np.float64)
        kth = np.sort(gallery[ref[q]].astype(np.float64) @ queries[q].astype(np.float64))[0]
        ties += bool(np.all(np.abs(sims - kth) < 1e-5))
    return {
        "same_set": int(same.sum()),
        "same_top1": int((ref[:, 0] == other[:, 0]).sum()),
        "n": len(ref),
        "near_ties": ties,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-queries", type=int, default=20_000)
    ap.add_argument("--n-gallery", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=2048, help="torch query chunk size")
    ap.add_argument("--repeats", type=int, default=1)
    add_record_args(ap)
    args = ap.parse_args(argv)

    import faiss
    import sklearn
    import torch

    rng = np.random.default_rng(args.seed)
    gallery = l2_normalize(rng.standard_normal((args.n_gallery, args.dim), dtype=np.float32))
    queries = l2_normalize(rng.standard_normal((args.n_queries, args.dim), dtype=np.float32))
    load = os.getloadavg()[0]

    t_faiss, (_, ref) = timed(lambda: search(gallery, queries, args.k, use_gpu=False, index="flat"), args.repeats)
    t_torch, idx_torch = timed(lambda: run_torch(gallery, queries, args.k, args.chunk), args.repeats)
    t_sk, idx_sk = timed(lambda: run_sklearn(gallery, queries, args.k), args.repeats)

    rows = [
        ("common.lib.retrieval.search (faiss IndexFlatIP, CPU)", t_faiss, None),
        (
            f"torch matmul + topk, chunks of {args.chunk}",
            t_torch,
            agreement(ref, idx_torch, gallery, queries),
        ),
        ("sklearn NearestNeighbors(cosine, brute)", t_sk, agreement(ref, idx_sk, gallery, queries)),
    ]
    command = command_line("retrieval_speed", argv, env="")
    lines = [
        "",
        f"## Retrieval speed: {args.n_queries} queries x {args.n_gallery} gallery x {args.dim}-d, k={args.k}",
        "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
        f"load average at start {load:.2f} (shared machine: timings are indicative)",
        f"- versions: python {platform.python_version()}, faiss {faiss.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, numpy {np.__version__}",
        f"- data: standard normal, L2-normalised, seed {args.seed}; best of {args.repeats} run(s); "
        "agreement is per query, top-k compared with faiss as sets",
        "",
        "| method | seconds | x faiss | same top-k set | same top-1 | disagreements that are float ties |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec, agr in rows:
        if agr is None:
            lines.append(f"| {name} | {sec:.2f} | 1.00 | reference | reference | - |")
        else:
            n = agr["n"]
            lines.append(
                f"| {name} | {sec:.2f} | {sec / t_faiss:.2f} | {agr['same_set']}/{n} | {agr['same_top1']}/{n} "
                f"| {agr['near_ties']}/{n - agr['same_set']} |"
            )
    finish(args, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
