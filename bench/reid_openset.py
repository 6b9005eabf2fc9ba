"""Benchmark: Happywhale-shaped open-set re-identification on real sets, stages 01-04 through the runner.

One command per set (``../shared/datasets``, never copied into the repository):

    HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.reid_openset --dataset dogfaces \\
        --params params/cpu.yaml --seeds 0 -p epochs=2 --record

* ``dogfaces``: ``images/<dog>/<file>.jpg`` (649 dogs, aligned faces, no boxes);
* ``nyala``: ``images/<id>/<file>.jpg`` (58 individuals, 729 full-frame photos, no boxes);
* ``lion``: ``{train,val}/<lion>/<file>.png`` pooled (94 lions, 740 crops).

The split is deterministic (``--split-seed``): about 20% of the individuals are held out entirely (all their
images are test images of new individuals); of the others with three or more images, one image of about half
of them is a known test image; everything else is training. The competition folder (``train.csv``,
``test.csv`` with the truth, ``sample_submission.csv``) is written under ``working/bench/reid_openset/``, then
``common.cli.pipeline.run`` runs stages 01-04 with the parameters file and ``-p`` overrides, once per
training seed (``--seeds``). Reported: test MAP@5 overall, on known and on new individuals (stage 04's
``metrics.json``), the threshold and the best threshold chosen on the test itself; beside them two
baselines on the same split: ``new_individual`` alone for every image (MAP@5 = the share of new test
images); untrained ImageNet features through the same pipeline (``epochs=0``: the same crops, GeM and an
untrained neck, the same label-free threshold tuning); and untrained ImageNet features (EfficientNet-Lite0,
average-pooled, full images, the run's image size) with the threshold chosen on the test itself (optimistic for
that baseline).

``--ssl simclr`` (or ``byol``) adds the stage-00 comparison: stage 00 pretrains ``backbone`` self-supervised on the
competition's train and test images (no labels; ``--ssl-epochs``, continued from the ImageNet weights), then
every seed runs again with ``pretrained=<stage-00 exp>``. The table then has both arms on the same split and
seeds (ImageNet alone, and ImageNet + stage 00) and their paired differences.

``--pair KEY=VALUE`` (repeatable) adds a second arm, every seed again with those overrides on top of the run's,
and stage 06's retrieval ensemble of the two arms per seed (one search over their concatenated embeddings: the
mean of their cosine similarities, as the Happywhale winners combined full-body and crop models). For example
``-p crop=none --pair crop=auto``: full frames, CAM crops, and both together. The table then has both arms, the
ensemble, and their differences from the first arm paired by seed.
``--pair-seed-offset K`` trains the second arm with seed ``seed + K`` on the first arm's fold split (``fold_seed``
``seed``; still paired with the first arm's ``seed``):
``-p crop=none --pair crop=none --pair-seed-offset 100`` is the control ensemble of two full-frame models, which
says whether a crop arm's ensemble gain comes from the crops or from ensembling two models at all.

``--jobs N`` trains the seeds as up to N child processes at once (each ``--seeds <one> --no-baseline``, with
``cpu_count // N`` torch threads, its log under ``working/bench/reid_openset/logs/``), then this process reuses
their finished runs and prints the table. On 2 cores, ``--jobs 2`` or 3 with one thread each trained about 1.7
times as many images per second in all as one 2-thread process (dogfaces, 2026-12-05): small models at these
sizes do not keep two threads busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from bench._report import append_section, torch_machine_line, utc_stamp  # noqa: E402
from bench.common_args import parse_overrides, parse_seeds  # noqa: E402
from common.config import load_params  # noqa: E402
from common.core import paths  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
NEW = "new_individual"


def list_images(dataset: str, shared: Path = SHARED) -> pd.DataFrame:
    """``source, image, individual_id`` for every image of ``dataset`` (sorted, deterministic)."""
    root = shared / dataset
    if dataset in ("dogfaces", "nyala"):
        folders = [root / "images"]
    elif dataset == "lion":
        folders = [root / "train", root / "val"]
    else:
        raise SystemExit(f"--dataset {dataset}: use dogfaces, nyala or lion")
    rows = []
    for base in folders:
        if not base.is_dir():
            raise SystemExit(f"{base}: not found (the shared datasets folder sits beside the checkout)")
        for ind in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(ind.iterdir()):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                    rows.append((str(f), f"{ind.name}__{f.name}", ind.name))
    return pd.DataFrame(rows, columns=["source", "image", "individual_id"])


def open_set_split(table: pd.DataFrame, seed: int, new_share: float = 0.2,
                   known_share: float | None = None) -> pd.Series:
    """``train`` / ``test`` per row: ~``new_share`` of the individuals wholly test (new). Known test images:
    by default one image of about half of the other individuals with >= 3 images; with ``known_share``, each
    image of every other individual with >= 2 images goes to the test with that probability, one image at least
    staying in train (sets with many images per individual then get a test with many known queries, as a
    competition's has)."""
    rng = np.random.default_rng(seed)
    ids = sorted(table["individual_id"].unique())
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_new = round(new_share * len(ids))
    new = set(order[:n_new])
    counts = table["individual_id"].value_counts()
    split = pd.Series("train", index=table.index)
    split[table["individual_id"].isin(new)] = "test"
    if known_share is not None:
        for ind in sorted(order[n_new:]):
            rows = table.index[table["individual_id"] == ind].to_numpy()
            if len(rows) < 2:
                continue
            drawn = rows[rng.random(len(rows)) < known_share]
            if len(drawn) == len(rows):  # keep one image in the gallery
                drawn = drawn[1:]
            split[drawn] = "test"
        return split
    eligible = [i for i in order[n_new:] if counts[i] >= 3]
    known_test = set(eligible[: len(eligible) // 2])
    for ind in sorted(known_test):
        rows = table.index[table["individual_id"] == ind]
        split[rows[rng.integers(len(rows))]] = "test"
    return split


def write_competition(table: pd.DataFrame, split: pd.Series, out: Path) -> Path:
    """The competition folder: images, ``train.csv``, ``test.csv`` (truth), ``sample_submission.csv``."""
    if (out / "test.csv").exists():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in ("train", "test"):
        (tmp / f"{part}_images").mkdir(parents=True)
        rows = table[split == part]
        for src, image in zip(rows["source"], rows["image"], strict=True):
            shutil.copyfile(src, tmp / f"{part}_images" / image)
    train, test = table[split == "train"], table[split == "test"]
    train.assign(species="animal")[["image", "species", "individual_id"]].to_csv(tmp / "train.csv", index=False)
    test[["image", "individual_id"]].to_csv(tmp / "test.csv", index=False)
    test[["image"]].assign(predictions=NEW).to_csv(tmp / "sample_submission.csv", index=False)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def untrained_baseline(comp_dir: Path, image_size: int, thresholds: np.ndarray) -> dict:
    """Untrained ImageNet features (average-pooled EfficientNet-Lite0), threshold chosen on the test."""
    import timm
    import torch
    from PIL import Image

    from common.core.weights import OFFLINE_WEIGHTS
    from common.lib import metrics, retrieval

    w = OFFLINE_WEIGHTS["tf_efficientnet_lite0"]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    w.loader(model)
    model.eval()

    def embed(folder: Path, names: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(names), 32):
                arr = np.stack([np.asarray(Image.open(folder / n).convert("RGB").resize((image_size, image_size)),
                                           dtype=np.float32) / 255.0 for n in names[i : i + 32]])
                x = (torch.from_numpy(arr).permute(0, 3, 1, 2) - 0.5) / 0.5
                out.append(model(x).numpy())
        return retrieval.l2_normalize(np.concatenate(out).astype(np.float32))

    train = pd.read_csv(comp_dir / "train.csv", dtype=str)
    test = pd.read_csv(comp_dir / "test.csv", dtype=str)
    g = embed(comp_dir / "train_images", train["image"].tolist())
    q = embed(comp_dir / "test_images", test["image"].tolist())
    scores, idx = retrieval.search(g, q, k=50)
    table = retrieval.individual_scores(scores, idx, train["individual_id"].to_numpy(), test["image"])
    known = set(train["individual_id"])
    truth = {i: (t if t in known else NEW) for i, t in zip(test["image"], test["individual_id"], strict=True)}
    best, sweep = retrieval.tune_threshold(table, truth, thresholds)
    pred = retrieval.predict(table, best, k=5, new_label=NEW, images=test["image"])
    report = metrics.map5_report(test["individual_id"].tolist(), pred["predictions"].str.split().tolist(), known, NEW)
    return {"map5": report["map5"], "map5_known": report["map5_known"], "map5_new": report["map5_new"],
            "threshold": best, "known_ranking": retrieval.known_ranking_map5(table, truth, NEW)}


def cached_baseline(comp_dir: Path, image_size: int, thresholds: np.ndarray, compute=None) -> dict:
    """:func:`untrained_baseline`, stored in ``comp_dir/untrained_baseline_<size>.json`` and reused while the
    split's ``train.csv`` and ``test.csv``, the size and the thresholds are unchanged (it took 3-10 minutes a call).

    Args:
        comp_dir: the split's competition folder.
        image_size: the square input size.
        thresholds: the thresholds swept on the test.
        compute: the function that measures it (default :func:`untrained_baseline`; tests pass another).
    """
    import hashlib

    from common.core import store

    h = hashlib.sha1()
    for name in ("train.csv", "test.csv"):
        h.update((comp_dir / name).read_bytes())
    h.update(json.dumps([int(image_size), [float(t) for t in thresholds]]).encode())
    key = h.hexdigest()
    path = comp_dir / f"untrained_baseline_{int(image_size)}.json"
    if path.exists():
        stored = store.read_json(path)
        if stored.get("key") == key:
            return stored["result"]
    result = (compute or untrained_baseline)(comp_dir, image_size, thresholds)
    store.write_json(path, {"key": key, "result": result})
    return result


VARIANTS = {  # stage-04 threshold tuning variants compared on the same embeddings (--variants)
    "fold gallery, out-of-fold share": dict(oof_gallery="fold", share_policy="oof"),
    "fold gallery, minimax over shares 0.1-0.9": dict(oof_gallery="fold", share_policy="minimax"),
    "fold gallery, estimated share, else minimax (default)": dict(oof_gallery="fold", share_policy="estimate"),
    "leave-one-out gallery, out-of-fold share": dict(oof_gallery="all", share_policy="oof"),
    "leave-one-out gallery, minimax over shares 0.1-0.9": dict(oof_gallery="all", share_policy="minimax"),
    "leave-one-out gallery, estimated share, else minimax": dict(oof_gallery="all", share_policy="estimate"),
}


def stage04_variants(exp: str, comp_dir: Path, seed: int) -> dict[str, dict]:
    """Test MAP@5 of each :data:`VARIANTS` threshold tuning on ``exp``'s stage-03 embeddings (nothing written),
    plus the true test share as ``test_new_share`` (an oracle, for reference)."""
    from common.config import RetrievalConfig
    from common.data.competition import load_competition
    from common.lib import retrieval
    from common.stages import retrieve_submit as submit

    comp = load_competition(comp_dir, check_pixels=False)
    base = RetrievalConfig(exp=exp, seed=seed, data=str(comp_dir))
    folds = submit.available_folds(base)
    test = submit.test_scores(base, comp, folds)
    known = comp.known_individuals
    true_share = float((~comp.truth["individual_id"].isin(known)).mean())
    out = {}
    for name, over in [*VARIANTS.items(), ("fold gallery, true test share (oracle)",
                                           dict(oof_gallery="fold", test_new_share=true_share))]:
        cfg = dataclasses.replace(base, **over)
        oof, truth = submit.oof_scores(cfg, comp, folds)
        shares = submit.new_share_estimate(oof, truth, test, cfg.new_label)
        share, source = submit.share_for_tuning(cfg, shares)
        threshold, sweep = submit.tune(cfg, oof, truth, share, minimax=source == "minimax")
        pred = retrieval.predict(test, threshold, k=5, new_label=cfg.new_label, images=comp.test["image"])
        rep = submit.score_labelled(cfg, comp, pred, test)
        out[name] = {"map5": rep["map5"], "threshold": threshold, "share": share, "source": source,
                     "best": rep["test_map5_best"], "best_threshold": rep["test_best_threshold"]}
    return out


def exp_name(args: argparse.Namespace, suffix: str) -> str:
    """``bench-openset-<dataset>[-<tag>]-<suffix>``: the experiment of one run of this bench."""
    return f"bench-openset-{args.dataset}{'-' + args.tag if args.tag else ''}-{suffix}"


def ssl_params(args: argparse.Namespace, params: dict, comp_dir: Path) -> dict:
    """The stage-00 run of ``--ssl``: the run's backbone and image size, ``--ssl-epochs`` from ImageNet."""
    return {**params, "data": str(comp_dir), "exp": exp_name(args, f"ssl-{args.ssl}{args.ssl_epochs}"),
            "seed": 0, "ssl_method": args.ssl, "ssl_epochs": args.ssl_epochs, "ssl_pretrained": "auto",
            "ssl_image_size": int(params.get("image_size", 128))}


def run_seeds(args: argparse.Namespace, params: dict, comp_dir: Path, prefix: str = "",
              extra: dict | None = None, seed_offset: int = 0) -> list[dict]:
    """Stages 01-04 once per ``--seeds`` seed (experiments ``<prefix>s<seed>``); each run's stage-04 metrics.

    Args:
        seed_offset: trains with seed ``seed + seed_offset`` and ``fold_seed`` ``seed`` (the fold split of the
            first arm); the run is still named and paired by ``seed``.
    """
    from common.cli import pipeline

    runs = []
    for seed in parse_seeds(args.seeds):
        exp = exp_name(args, f"{prefix}s{seed}")
        run_params = {**params, **(extra or {}), "data": str(comp_dir), "exp": exp, "seed": seed + seed_offset}
        if seed_offset:  # the first arm's fold split, so that stage 06 can concatenate the arms out of fold
            run_params["fold_seed"] = seed
        t0 = time.perf_counter()
        metrics = pipeline.run(["01", "02", "03", "04"], run_params, log_output=False)
        if args.rescore:  # stage 04 again on the stored embeddings (after a change to stage 04 itself)
            metrics = pipeline.run(["04"], run_params, force=True, log_output=False)
        crop_file = paths.stage_dir(exp, "01") / "metrics.json"
        if crop_file.exists():  # stage 01 writes its method to its own metrics.json, not the experiment's
            crop = json.loads(crop_file.read_text())
            metrics.setdefault("crop_method", crop.get("crop_method", "?"))
            metrics.setdefault("crop_area", crop.get("train_crop_area_median"))
        runs.append({**metrics, "seed": seed, "minutes": (time.perf_counter() - t0) / 60})
        print(f"{exp}: MAP@5 {metrics['map5']:.3f} known {metrics.get('map5_known')} new "
              f"{metrics.get('map5_new')} ({runs[-1]['minutes']:.1f} min)", flush=True)
    return runs


def child_argv(argv: list[str], seed: int) -> list[str]:
    """The command line of one ``--jobs`` child: ``argv`` for seed ``seed`` alone, with no baseline, no record
    and no jobs of its own."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--seeds", "--jobs"):
            skip = "=" not in a
            continue
        if a in ("--record", "--no-baseline"):
            continue
        out.append(a)
    return [*out, "--seeds", str(seed), "--no-baseline"]


def run_children(cmds: dict[int, list[str]], jobs: int, threads: int, log_dir: Path) -> dict[int, float]:
    """Run ``cmds`` (seed -> argv), at most ``jobs`` at once, each with ``threads`` torch threads and its output in
    ``log_dir/seed<seed>.log``; return each seed's minutes.

    Raises:
        SystemExit: naming each failed seed, its exit status and its log, after the others have finished.
    """
    import subprocess

    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, minutes, failed = list(cmds.items()), {}, {}, []
    while pending or running:
        while pending and len(running) < jobs:
            seed, cmd = pending.pop(0)
            log = log_dir / f"seed{seed}.log"
            print(f"seed {seed}: {' '.join(cmd)} > {log}", flush=True)
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
            running[seed] = (proc, time.perf_counter(), log)
        time.sleep(0.2)
        for seed, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            minutes[seed] = (time.perf_counter() - t0) / 60
            if proc.returncode != 0:
                failed.append(f"seed {seed} exited with status {proc.returncode}; see {log}")
            print(f"seed {seed}: finished in {minutes[seed]:.1f} min (status {proc.returncode})", flush=True)
    if failed:
        raise SystemExit("--jobs: " + "; ".join(failed))
    return minutes


def pair_prefix(pair: list[str], seed_offset: int = 0) -> str:
    """The experiment-name prefix of the ``--pair`` arm: ``crop=auto`` -> ``crop-auto-``, and with a seed offset
    ``crop=none`` + 100 -> ``crop-none-seed-100-`` (names stay apart)."""
    slug = "-".join(item.replace("=", "-") for item in pair) + (f"-seed{seed_offset:+d}" if seed_offset else "")
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in slug) + "-"


def pair_seed_label(args: argparse.Namespace) -> str:
    """`` (seed +K)`` when the ``--pair`` arm trains with another seed (``--pair-seed-offset``), else empty."""
    return f" (seed {args.pair_seed_offset:+d})" if args.pair_seed_offset else ""


def overrides(items: list[str], flag: str = "-p") -> dict:
    """``KEY=VALUE`` strings as typed parameter values, keys checked as the pipeline's ``-p`` checks them; raises
    naming the flag and the item, before any training, on a missing ``=`` or an unknown key."""
    return parse_overrides(items, None, "a pipeline parameter (flat or <stage>.name)", flag)


# Stage 06 as a retrieval-only ensemble, whatever stage-06 keys the parameters file carries.
RETRIEVAL_ONLY = {"members": "", "soup": "none", "blend_ratio": 0.0, "pseudo_threshold": 0.0, "clean_threshold": 0.0,
                  "redistribute_k": 0, "threshold_mode": "global"}


def ensemble_seeds(args: argparse.Namespace, params: dict, comp_dir: Path, runs: list[dict], prefix: str
                   ) -> list[dict]:
    """Stage 06 per seed of ``runs``: one search over the concatenated embeddings of the first arm
    (``s<seed>``) and the ``--pair`` arm (``<prefix>s<seed>``); each its ``06_ensemble`` retrieval metrics."""
    from common.cli import pipeline

    out = []
    for r in runs:
        seed = r["seed"]
        exp = exp_name(args, f"ens-{prefix}s{seed}")
        members = f"{exp_name(args, f's{seed}')},{exp_name(args, f'{prefix}s{seed}')}"
        t0 = time.perf_counter()
        pipeline.run(["06"], {**params, **RETRIEVAL_ONLY, "data": str(comp_dir), "exp": exp, "seed": seed,
                              "embed_members": members}, log_output=False)
        metrics = json.loads((paths.stage_dir(exp, "06") / "metrics.json").read_text())["retrieval"]
        out.append({**metrics, "seed": seed, "minutes": (time.perf_counter() - t0) / 60, "arm": "ensemble "})
        print(f"{exp} ({members}): MAP@5 {metrics['map5']:.3f}", flush=True)
    return out


def paired_row(label: str, a: list[dict], b: list[dict]) -> str:
    """A table row of ``b - a`` paired by seed (MAP@5, known, new, and the known ranking alone)."""
    diff = {k: paired(a, b, k) for k in ("map5", "map5_known", "map5_new", "test_map5_known_ranking")}
    return (f"| {label} | {fmt(diff['map5'])} | {fmt(diff['map5_known'])} | {fmt(diff['map5_new'])} | - | - | - | "
            f"{fmt(diff['test_map5_known_ranking'])} |")


def pipeline_row(label: str, runs: list[dict]) -> str:
    """One table row: mean ± sd over the seeds' stage-04 metrics."""
    return (f"| {label} ({len(runs)} seed(s): mean ± sd) | {fmt([r['map5'] for r in runs])} | "
            f"{fmt([r.get('map5_known') for r in runs])} | {fmt([r.get('map5_new') for r in runs])} | "
            f"{fmt([r['threshold'] for r in runs])} | {fmt([r.get('test_best_threshold') for r in runs])} | "
            f"{fmt([r.get('test_map5_best') for r in runs])} | "
            f"{fmt([r.get('test_map5_known_ranking') for r in runs])} |")


def paired(a: list[dict], b: list[dict], key: str) -> list[float]:
    """``b - a`` of ``key`` per seed, for the seeds both arms ran."""
    by_seed = {r["seed"]: r for r in a}
    return [r[key] - by_seed[r["seed"]][key] for r in b
            if r["seed"] in by_seed and r.get(key) is not None and by_seed[r["seed"]].get(key) is not None]


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=["dogfaces", "nyala", "lion"])
    ap.add_argument("--params", default="params/cpu.yaml")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--known-share", type=float, default=None,
                    help="share of each known individual's images drawn into the test (default: one image of "
                         "half of the individuals with >= 3 images)")
    ap.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="parameter override")
    ap.add_argument("--no-baseline", action="store_true", help="skip the untrained ImageNet baseline")
    ap.add_argument("--record", action="store_true", help="append the section to bench/RESULTS.md")
    ap.add_argument("--variants", action="store_true",
                    help="also compare stage 04's threshold-tuning variants on each seed's embeddings")
    ap.add_argument("--rescore", action="store_true",
                    help="rerun stage 04 of every (cached) run: after a change to stage 04 itself")
    ap.add_argument("--tag", default="", help="suffix of the experiment names (keeps configurations apart)")
    ap.add_argument("--ssl", choices=("simclr", "byol"), default=None,
                    help="also run stage 00 (this method) and every seed again from its weights")
    ap.add_argument("--ssl-epochs", type=int, default=3, help="stage 00's epochs (with --ssl)")
    ap.add_argument("--pair", action="append", default=[], metavar="KEY=VALUE",
                    help="a second arm with these overrides, and stage 06's ensemble of both arms per seed")
    ap.add_argument("--pair-seed-offset", type=int, default=0, metavar="K",
                    help="train the --pair arm with seed + K (a control: the same settings, another model)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train up to this many seeds at once, as child processes sharing the cores")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    pair = overrides(args.pair, "--pair")  # a typo fails here, before any training
    if args.pair_seed_offset and not pair:
        raise SystemExit("--pair-seed-offset: needs --pair (it sets the second arm's training seed)")
    extra = overrides(args.p)
    load = os.getloadavg()[0]
    from common.cli import pipeline

    table = list_images(args.dataset)
    split = open_set_split(table, args.split_seed, known_share=args.known_share)
    suffix = "" if args.known_share is None else f"-known{args.known_share:g}"
    comp_dir = write_competition(table, split, paths.working_dir() / "bench" / "reid_openset"
                                 / f"{args.dataset}-split{args.split_seed}{suffix}")
    test = table[split == "test"]
    known_ids = set(table.loc[split == "train", "individual_id"])
    new_share = float((~test["individual_id"].isin(known_ids)).mean())
    params = load_params(ROOT / args.params) if args.params else {}
    params.update(extra)
    seeds = parse_seeds(args.seeds)
    jobs = min(args.jobs, len(seeds))
    child_minutes: dict[int, float] = {}
    if jobs > 1:  # the split is written; stage 00 (shared by every seed) runs once here, before the children
        if args.ssl:
            pipeline.run(["00"], ssl_params(args, params, comp_dir), log_output=False)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        log_dir = comp_dir.parent / "logs" / exp_name(args, "jobs")
        child_minutes = run_children({s: [sys.executable, "-m", "bench.reid_openset", *child_argv(argv, s)]
                                      for s in seeds}, jobs, threads, log_dir)
    runs = run_seeds(args, params, comp_dir)
    pair_runs, ens_runs = [], []
    if pair:
        prefix = pair_prefix(args.pair, args.pair_seed_offset)
        pair_runs = [{**r, "arm": f"{' '.join(args.pair)}{pair_seed_label(args)} "}
                     for r in run_seeds(args, params, comp_dir, prefix, pair, args.pair_seed_offset)]
        ens_runs = ensemble_seeds(args, params, comp_dir, runs, prefix)
    ssl_runs, ssl_meta = [], {}
    if args.ssl:
        pre = ssl_params(args, params, comp_dir)
        print(f"stage 00 ({args.ssl}, {args.ssl_epochs} epochs): {pre['exp']}", flush=True)
        pipeline.run(["00"], pre, log_output=False)
        ssl_meta = json.loads((paths.stage_dir(pre["exp"], "00") / "metrics.json").read_text())
        ssl_runs = run_seeds(args, params, comp_dir, prefix=f"ssl-{args.ssl}{args.ssl_epochs}-",
                             extra={"pretrained": pre["exp"]})
        ssl_runs = [{**r, "arm": "stage 00 "} for r in ssl_runs]
    image_size = int(params.get("image_size", 128))
    base = None if args.no_baseline else cached_baseline(comp_dir, image_size, np.round(np.arange(0, 1.0001, 0.02), 6))
    same = None
    if not args.no_baseline:  # the same pipeline, crops and label-free threshold, with no training (epochs=0)
        first = runs[0]["seed"]
        base_params = {**params, "data": str(comp_dir), "exp": exp_name(args, "untrained"), "seed": first, "epochs": 0}
        same = pipeline.run(["01", "02", "03", "04"], {**base_params, "crops_from": exp_name(args, f"s{first}")},
                            log_output=False)
        if args.rescore:
            same = pipeline.run(["04"], base_params, force=True, log_output=False)
    lines = [
        "| answer | MAP@5 | known MAP@5 | new MAP@5 | threshold | test-best threshold | test MAP@5 at it "
        "| known MAP@5, ranking alone |",
        "|---|---|---|---|---|---|---|---|",
        pipeline_row("pipeline" + (", ImageNet weights" if args.ssl else "")
                     + (f" ({', '.join(args.p)})" if pair and args.p else ""), runs),
        f"| new_individual alone for every image | {new_share:.3f} | 0.000 | 1.000 | - | - | - | - |",
    ]
    if pair:
        label = ", ".join(args.pair) + pair_seed_label(args)
        lines += [pipeline_row(f"pipeline with {label}", pair_runs),
                  paired_row(f"{label} minus the first arm, paired by seed", runs, pair_runs),
                  pipeline_row("stage 06: both arms' embeddings concatenated (one search)", ens_runs),
                  paired_row("the ensemble minus the first arm, paired by seed", runs, ens_runs)]
    if ssl_runs:
        lines.append(pipeline_row(
            f"pipeline from stage 00 ({args.ssl}, {args.ssl_epochs} epoch(s) from ImageNet on "
            f"{ssl_meta.get('images', '?')} train+test images, loss {ssl_meta.get('first_loss', float('nan')):.3f}"
            f" -> {ssl_meta.get('last_loss', float('nan')):.3f}, {ssl_meta.get('seconds', float('nan')):.0f} s)",
            ssl_runs))
        lines.append(paired_row("stage 00 minus ImageNet, paired by seed", runs, ssl_runs))
    if same:
        lines.append(f"| untrained (epochs=0) through the same pipeline: ImageNet backbone, GeM, untrained neck, "
                     f"the same threshold tuning | {same['map5']:.3f} | {same['map5_known']:.3f} | "
                     f"{same['map5_new']:.3f} | {same['threshold']:.2f} | {same.get('test_best_threshold', 0):.2f} | "
                     f"{same.get('test_map5_best', 0):.3f} | {fmt([same.get('test_map5_known_ranking')])} |")
    if base:
        lines.append(f"| untrained ImageNet features, threshold chosen on the test | {base['map5']:.3f} | "
                     f"{base['map5_known']:.3f} | {base['map5_new']:.3f} | {base['threshold']:.2f} | - | - | "
                     f"{base['known_ranking']:.3f} |")
    if args.variants:
        per_seed = {r["seed"]: stage04_variants(exp_name(args, f"s{r['seed']}"), comp_dir, r["seed"]) for r in runs}
        names = list(next(iter(per_seed.values())))
        lines += ["", "Stage 04's threshold tuning on the same embeddings (test MAP@5; threshold; share tuned for):", "",
                  "| tuning | test MAP@5 | threshold | tuned for |", "|---|---|---|---|"]
        for name in names:
            vals = [v[name] for v in per_seed.values()]
            shares = [v["share"] for v in vals if v["share"] is not None]
            how = ", ".join(sorted({v["source"] for v in vals}))
            lines.append(f"| {name} | {fmt([v['map5'] for v in vals])} | {fmt([v['threshold'] for v in vals])} | "
                         f"{how}{': ' + fmt(shares) if shares else ''} |")
    extra = ", ".join(f"{r.get('arm', '')}seed {r['seed']}: OOF MAP@5 {r.get('oof_map5', float('nan')):.3f} (all-new "
                      f"{r.get('oof_map5_all_new', float('nan')):.3f}), OOF new share "
                      f"{r.get('oof_true_new_share', float('nan')):.2f}, test new share estimated "
                      f"{r.get('test_new_share_estimate') or float('nan'):.2f}, threshold tuned for the "
                      f"{r.get('tuned_for_new_share_source', 'oof')} share, crops: {r.get('crop_method', '?')}"
                      + (f" (median train crop keeps {r['crop_area']:.0%} of the frame)" if r.get("crop_area") else "")
                      + ", "
                      f"{r['minutes']:.1f} min" for r in runs + ssl_runs + pair_runs + ens_runs)
    cmd = "HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.reid_openset " + " ".join(
        shlex.quote(a) for a in argv)
    parallel = "" if not child_minutes else (
        f"- trained as {jobs} child processes at once, {threads} torch thread(s) each (`--jobs`): "
        + ", ".join(f"seed {s} {m:.1f} min" for s, m in child_minutes.items())
        + " (every stage of the seed, both arms with `--pair`); the runs below were then reused\n")
    text = (
        f"\n## Open-set re-identification on {args.dataset}: stages 01-04 through the runner\n\n"
        f"- command: `{cmd}` (from the repository root)\n- date: {utc_stamp()}\n"
        f"- machine: {torch_machine_line('cpu', load)}\n"
        f"- split (seed {args.split_seed}{', known share ' + format(args.known_share, 'g') if args.known_share is not None else ''}): {int((split == 'train').sum())} train images of {len(known_ids)} "
        f"individuals; {len(test)} test images, {new_share:.1%} of new individuals\n"
        f"- parameters: `{args.params}` with {args.p or 'no overrides'}\n{parallel}- runs: {extra}\n\n"
        + "\n".join(lines) + "\n"
    )
    print(text)
    if args.record:
        append_section(ROOT / "bench" / "RESULTS.md", text)


if __name__ == "__main__":
    main()
