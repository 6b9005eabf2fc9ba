"""How each stage's cost grows with the competition: stages 01-06 on Happywhale-shaped synthetic sets.

For every size (train + test images, e.g. 1k, 5k, 20k, 80k) the script generates the competition with
:mod:`common.data.synth` (96 x 72 px images), then runs each stage in its own process, calling the functions the
stage's notebook calls (``crop_stage.run_crop``, ``train.run_training``, ``embed.run_extraction``,
``submit.run_retrieval``, ``classify.run_classification``, ``ensemble_stage.run_ensemble``) with one epoch and
one fold of five. The parent records per stage and size:

* wall time, CPU time (user + system of the stage process and every process it waited for: loader workers,
  ``resource.getrusage(RUSAGE_CHILDREN)``), peak memory of the whole process tree (psutil, sampled
  every 0.2 s), files written and bytes on disk (the change under the working and submissions folders);
* for the training stages (02, 05) the loader wait share: the time the training loop spends in ``next()`` on
  the training loader over the loop's time. The child wraps :func:`common.core.distributed.epoch_loader`
  (a monkeypatch in this script; the library is not changed);
* the part of a stage that is an inherent product, timed apart by wrapping the function in the child: stage 04's
  faiss search (queries x gallery), and stages 05 and 06's classifier head outside training (every image scored
  against every class, images x classes; stage 05 trains with Partial FC, ``partial_fc=1024``, so its training
  head is bounded);
* growth exponents ``log(t2 / t1) / log(n2 / n1)`` between consecutive sizes, and a log-log plot.

Rows accumulate in ``<root>/scale_rows.json`` so that sizes can be run by separate calls; ``--record`` appends
the table of every stored row to ``bench/RESULTS.md`` and writes ``bench/scale.png``.

Usage (from the repository root; folders outside the repository)::

    HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.scale --root /tmp/scale \\
        --sizes 1000 5000 --stages 01-06 --record
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("01", "02", "03", "04", "05", "06")
STAGE_NAMES = {"00": "generate", "01": "crop", "02": "train embedder", "03": "extract", "04": "retrieve+submit",
               "05": "train classifier", "06": "ensemble+post"}
# The bench's settings: params/debug.yaml (every stage's code path) with one epoch of one fold of five.
OVERRIDES: dict[str, Any] = dict(n_folds=5, folds="0", epochs=1, batch_size=64, num_workers=-1, image_size=64,
                                 detector_epochs=1, detector_imgsz=64, detector_batch=32, knn_k=50, n_examples=4,
                                 threshold_step=0.02)
# Stage 05's classes are the individuals (15.5k at 80k images): Partial FC keeps its training head at 1,024 classes
# per batch (every class up to ~5k images), as a Happywhale-sized run of the classifier would.
STAGE_OVERRIDES: dict[str, dict[str, Any]] = {"05": dict(backbone="mobilenetv3_small_050", pretrained="none",
                                                         partial_fc=1024)}
PSS_EVERY = 10  # measure(): PSS sampled every 10th memory sample (2 s) and when RSS grows 10 %, RSS at every one (0.2 s)
# The part of a stage that is an inherent queries x gallery (or x classes) product, timed apart by the child
# (``search_cpu_s``) and reported beside the rest of the stage.
SEARCH_NAMES = {"04": "the faiss search", "05": "scoring every class at prediction",
                "06": "scoring every class at prediction"}


# ------------------------------------------------------------------------------------------ child side
class _TimedLoader:
    """Wraps a training loader: adds the seconds spent waiting in ``next()``, the part of it spent on each
    epoch's first batch (the pipeline fill: what the workers had not made by the time the loop asked), and the
    loop's seconds (from its first ``next()``, not from ``iter()``: the training loop starts the loader early, so
    that its workers load while the model is built or the last epoch validates)."""

    totals = {"wait_s": 0.0, "first_s": 0.0, "loop_s": 0.0, "batches": 0}

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> _TimedIter:
        return _TimedIter(iter(self.loader), len(self.loader))  # starts the workers now, as the loader would


class _TimedIter:
    """One epoch's timed iterator (:class:`_TimedLoader`)."""

    def __init__(self, it: Any, n: int) -> None:
        self.it, self.n, self.start = it, n, None

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> _TimedIter:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        first = self.start is None
        if first:
            self.start = t
        try:
            batch = next(self.it)
        except StopIteration:
            _TimedLoader.totals["wait_s"] += time.perf_counter() - t
            _TimedLoader.totals["loop_s"] += time.perf_counter() - self.start
            raise
        waited = time.perf_counter() - t
        _TimedLoader.totals["wait_s"] += waited
        if first:
            _TimedLoader.totals["first_s"] += waited
        _TimedLoader.totals["batches"] += 1
        return batch


def _time_calls(owner: Any, name: str, spent: dict[str, float], when: Any = None) -> None:
    """Replace ``owner.name`` by a wrapper that adds its CPU and wall seconds to ``spent`` (``search_cpu_s``,
    ``search_wall_s``), for the calls where ``when()`` is true (default: all)."""
    plain = getattr(owner, name)

    def timed(*a, **k):
        if when is not None and not when():
            return plain(*a, **k)
        c, w = time.process_time(), time.perf_counter()
        try:
            return plain(*a, **k)
        finally:
            spent["search_cpu_s"] += time.process_time() - c
            spent["search_wall_s"] += time.perf_counter() - w

    setattr(owner, name, timed)


def _time_head_at_prediction(spent: dict[str, float]) -> None:
    """Stages 05 and 06: time the ArcFace head's forward outside training (validation and prediction score every
    class: images x classes, the classifier's counterpart of the retrieval's search)."""
    import torch

    from common.lib.heads import ArcMarginProduct

    _time_calls(ArcMarginProduct, "forward", spent, when=lambda: not torch.is_grad_enabled())


def run_child(stage: str, spec_file: str) -> None:
    """One stage in this process (the parent measures it); writes the loader timings next to ``spec_file``."""
    from common.config import STAGE_CONFIGS
    from common.core import distributed
    from common.data import competition as data_mod

    plain = distributed.epoch_loader
    distributed.epoch_loader = lambda *a, **k: _TimedLoader(plain(*a, **k))
    spec = json.loads(Path(spec_file).read_text())
    cfg = STAGE_CONFIGS[stage].from_params(spec["params"], params_file="")
    comp = data_mod.open_competition(cfg.data)
    extra: dict[str, Any] = {}
    spent = {"search_cpu_s": 0.0, "search_wall_s": 0.0}
    if stage == "01":
        from common.stages import crop_images as crop_stage

        crop_stage.run_crop(cfg, comp)
    elif stage == "02":
        from common.stages import train_embedder as train

        train.run_training(cfg, comp, train.prepare_folds(cfg, comp))
    elif stage == "03":
        from common.stages import extract_embeddings as embed

        embed.run_extraction(cfg, comp)
    elif stage == "04":
        from common.lib import retrieval
        from common.stages import retrieve_submit as submit

        # the faiss search, reported apart (queries x gallery: inherently quadratic)
        _time_calls(retrieval, "search", spent)
        extra = {k: v for k, v in submit.run_retrieval(cfg, comp).metrics.items() if k.startswith("map5")}
    elif stage == "05":
        from common.stages import train_classifier as classify

        _time_head_at_prediction(spent)
        classify.run_classification(cfg, comp)
    else:
        from common.stages import ensemble_postprocess as ensemble_stage

        _time_head_at_prediction(spent)
        ensemble_stage.run_ensemble(cfg, comp)
    extra.update({k: v for k, v in spent.items() if v})
    Path(spec["timing"]).write_text(json.dumps({**_TimedLoader.totals, **extra}))


# ----------------------------------------------------------------------------------------- parent side
def tree_usage(folders: list[Path]) -> tuple[int, int]:
    """``(files, bytes)`` under ``folders`` (sizes of regular files; symbolic links count as files of 0 bytes)."""
    files = size = 0
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                files += 1
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                size += st.st_size if not os.path.islink(os.path.join(dirpath, name)) else 0
    return files, size


def measure(cmd: list[str], env: dict[str, str], folders: list[Path], log: Path) -> dict[str, Any]:
    """Run ``cmd``; return wall and CPU seconds, peak memory of its process tree and the files it added.

    Memory is sampled two ways: the sum of the processes' resident sizes (RSS: pages that forked loader workers
    share with their parent count once per process, an upper bound) and the sum of their proportional set sizes
    (PSS: each shared page split between the processes sharing it, the tree's real footprint). RSS is read every
    0.2 s, PSS every ``PSS_EVERY`` samples and whenever the RSS sum has grown by 10 % since the last PSS reading:
    reading it costs the sampler about a third of a core at 0.2 s, CPU the stage's loader workers would otherwise
    have on a 2-core machine, and the growth rule still catches the peak of a stage shorter than ``PSS_EVERY``
    samples (stage 04 of a 120-image run lasts 2 s: sampled only at its start, its PSS once read 0)."""
    import psutil

    files0, bytes0 = tree_usage(folders)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    peak = peak_pss = rss_at_pss = 0
    with open(log, "a") as fh:
        # cwd: the log's folder (outside the repository), where ultralytics may leave mlflow.db / runs
        proc = psutil.Popen(cmd, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT)
        tick = 0
        while proc.poll() is None:
            try:
                procs = [p for p in (proc, *proc.children(recursive=True)) if p.is_running()]
                rss = sum(p.memory_info().rss for p in procs)
                peak = max(peak, rss)
                # PSS reads /proc/<pid>/smaps: a third of a core when done every 0.2 s
                if tick % PSS_EVERY == 0 or rss > 1.1 * rss_at_pss:
                    peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in procs))
                    rss_at_pss = rss
            except psutil.Error:
                pass
            tick += 1
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    files1, bytes1 = tree_usage(folders)
    return dict(wall_s=round(wall, 2), cpu_s=round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
                peak_rss_mb=round(peak / 2**20, 1), peak_pss_mb=round(peak_pss / 2**20, 1), files=files1 - files0, disk_mb=round((bytes1 - bytes0) / 2**20, 2))


def run_size(n: int, stages: list[str], root: Path, image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Generate the ``n``-image competition and run ``stages`` on it; one row per stage (generation is 00)."""
    import yaml

    env = {**os.environ, "REID_INPUT_DIR": str(root / "inputs"), "REID_WORKING_DIR": str(root / "working"),
           "REID_SUBMISSIONS_DIR": str(root / "submissions"), "REID_PROGRESS": "off", "HF_HUB_OFFLINE": "1",
           "YOLO_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
    data, exp = root / "inputs" / f"synth_{n}", f"scale_{n}"
    folders = [root / "working" / exp, root / "submissions"]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    log = root / f"scale_{n}.log"
    rows = []
    gen = measure([sys.executable, "-m", "common.data.synth", str(data), "--images", str(n), "--size",
                   *map(str, image_size)], env, [data.parent], log)
    rows.append(dict(size=n, stage="00", **gen))
    print(f"{n} images, 00 generate: {gen}", flush=True)
    params = {**yaml.safe_load((ROOT / "params" / "debug.yaml").read_text()), **OVERRIDES,
              "data": str(data), "exp": exp, "force": True}
    for stage in stages:
        spec = root / f"spec_{n}_{stage}.json"
        timing = root / f"timing_{n}_{stage}.json"
        spec.write_text(json.dumps({"params": {**params, **STAGE_OVERRIDES.get(stage, {})}, "timing": str(timing)}))
        row = measure([sys.executable, str(Path(__file__).resolve()), "--child", stage, str(spec)], env, folders, log)
        t = json.loads(timing.read_text())
        wait = t["wait_s"] / t["loop_s"] if t.get("loop_s") else None
        after = ((t["wait_s"] - t["first_s"]) / (t["loop_s"] - t["first_s"])
                 if t.get("loop_s", 0) > t.get("first_s", 0) else None)
        rows.append(dict(size=n, stage=stage, **row, loader_wait=None if wait is None else round(wait, 4),
                         loader_wait_after_first=None if after is None else round(after, 4),
                         **{k: v for k, v in t.items() if k.startswith(("map5", "search_"))}))
        print(f"{n} images, {stage} {STAGE_NAMES[stage]}: {rows[-1]}", flush=True)
        (root / f"scale_rows_partial_{n}.json").write_text(json.dumps(rows, indent=1))  # survives a killed run
    return rows


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each (size, stage) that ``new`` measured again replaced, so that one stage can be rerun alone
    (``--stages 06``). A generation row that found the competition already drawn (no file written) keeps the
    stored row of the run that drew it."""
    reused = {r["size"] for r in new if r["stage"] == "00" and r["files"] == 0}
    new = [r for r in new if not (r["stage"] == "00" and r["size"] in reused
                                  and any(o["size"] == r["size"] and o["stage"] == "00" for o in old))]
    done = {(r["size"], r["stage"]) for r in new}
    return [r for r in old if (r["size"], r["stage"]) not in done] + new


def exponents(rows: list[dict[str, Any]], key: str = "wall_s") -> dict[tuple[str, int], float]:
    """``(stage, size) -> log(v / v_prev) / log(size / size_prev)`` against the next smaller size run."""
    out = {}
    for stage in sorted({r["stage"] for r in rows}):
        pts = sorted((r["size"], r[key]) for r in rows if r["stage"] == stage and r[key] > 0)
        for (n0, v0), (n1, v1) in zip(pts, pts[1:], strict=False):
            out[(stage, n1)] = math.log(v1 / v0) / math.log(n1 / n0)
    return out


def span_table(rows: list[dict[str, Any]], lo: int = 5000, stages: tuple[str, ...] = ("01", "02", "03", "04")) -> str:
    """Per stage, the growth exponent over the whole range from the smallest size >= ``lo`` to the largest (the
    issue's criterion: at most 1.15 from 5k to 80k), the peak memory at the largest size, and the wall time of
    ``stages`` together at each size (the 80k run of stages 01-04 must finish in under 2 hours)."""
    sizes = sorted({r["size"] for r in rows if r["size"] >= lo})
    if len(sizes) < 2:
        return ""
    n0, n1 = sizes[0], sizes[-1]
    by = {(r["stage"], r["size"]): r for r in rows}
    lines = [f"| stage | CPU s at {n0:,} | CPU s at {n1:,} | CPU exponent {n0:,} -> {n1:,} | wall exponent | "
             f"peak RSS / PSS MB at {n1:,} |", "|---|---|---|---|---|---|"]
    for stage in sorted({r["stage"] for r in rows}):
        a, b = by.get((stage, n0)), by.get((stage, n1))
        if a is None or b is None or min(a["cpu_s"], a["wall_s"]) <= 0:
            continue
        span = math.log(n1 / n0)
        lines.append(f"| {stage} {STAGE_NAMES[stage]} | {a['cpu_s']:.1f} | {b['cpu_s']:.1f} | "
                     f"{math.log(b['cpu_s'] / a['cpu_s']) / span:.2f} | {math.log(b['wall_s'] / a['wall_s']) / span:.2f} | "
                     f"{b['peak_rss_mb']:.0f} / {_pss(b)} |")
        if "search_cpu_s" in a and "search_cpu_s" in b:  # 04's search, 05/06's class scoring apart from the rest
            what = SEARCH_NAMES.get(stage, "the search")
            for name, x, y in ((f"{what} alone", a["search_cpu_s"], b["search_cpu_s"]),
                               (f"without {what}", a["cpu_s"] - a["search_cpu_s"], b["cpu_s"] - b["search_cpu_s"])):
                lines.append(f"| {stage} {name} | {x:.1f} | {y:.1f} | {math.log(y / x) / span:.2f} | - | - |")
    totals = []
    for n in sorted({r["size"] for r in rows}):
        got = [by[(s, n)]["wall_s"] for s in stages if (s, n) in by]
        if len(got) == len(stages):
            totals.append(f"{n:,} images {sum(got) / 60:.1f} min")
    lines.append(f"\nWall time of stages {stages[0]}-{stages[-1]} together: " + "; ".join(totals) + ".")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, key: str = "cpu_s") -> Path:
    """Log-log time per stage against images: CPU seconds by default (wall time on a shared machine counts the
    other jobs' time too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in sorted({r["stage"] for r in rows}):
        pts = sorted((r["size"], r[key]) for r in rows if r["stage"] == stage)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{stage} {STAGE_NAMES[stage]}")
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) > 1:
        ax.plot(sizes, [s / sizes[0] for s in sizes], "k--", lw=0.8, label="slope 1 (linear)")
    ax.set(xscale="log", yscale="log", xlabel="images (train + test)", ylabel=key.replace("_s", " seconds"),
           title=f"bench/scale.py: stage {key.replace('_s', ' time')} vs competition size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _pss(row: dict[str, Any]) -> str:
    return "-" if row.get("peak_pss_mb") is None else f"{row['peak_pss_mb']:.0f}"  # rows measured before PSS: -


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every row, with the wall-time exponent against the previous size."""
    exp_wall, exp_cpu, exp_rss = exponents(rows), exponents(rows, "cpu_s"), exponents(rows, "peak_rss_mb")
    lines = ["| images | stage | wall s | CPU s | peak RSS MB | peak PSS MB | files | disk MB | loader wait (after the first batch) "
             "| wall exponent | CPU exponent | RSS exponent | MAP@5 | search / class scoring CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["stage"])):
        key = (r["stage"], r["size"])
        e, c, m = exp_wall.get(key), exp_cpu.get(key), exp_rss.get(key)
        wait, mp, search = r.get("loader_wait"), r.get("map5"), r.get("search_cpu_s")
        after = r.get("loader_wait_after_first")
        lines.append(
            f"| {r['size']:,} | {r['stage']} {STAGE_NAMES[r['stage']]} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {_pss(r)} | {r['files']:,} | {r['disk_mb']:.1f} | "
            f"{'-' if wait is None else f'{100 * wait:.1f} %'}{'' if after is None else f' ({100 * after:.1f} %)'} | "
            f"{'-' if e is None else f'{e:.2f}'} | "
            f"{'-' if c is None else f'{c:.2f}'} | {'-' if m is None else f'{m:.2f}'} | "
            f"{'-' if mp is None else f'{mp:.3f}'} | "
            f"{'-' if search is None else f'{search:.1f}'} |")
    return "\n".join(lines)


def table_level(sizes: list[int], k: int = 50) -> str:
    """Seconds of the table-level steps (no images, no model) at Happywhale-shaped sizes, with exponents.

    Times, on :func:`common.data.synth.plan_synth`'s train table of ``n`` images: ``plan_synth`` itself, fold
    assignment (the fixed :func:`common.data.competition.make_folds` and the old loop it replaced, the latter only up to 20k
    images), and stage 04's out-of-fold tuning on fold 0 with random neighbours (``hide_individuals``,
    ``individual_scores``, ``tune_threshold`` over 51 thresholds, ``predict``), i.e. everything but the faiss
    search. CPU seconds of this process (``time.process_time``), one run each.
    """
    import numpy as np
    import pandas as pd

    from common.data.competition import make_folds
    from common.data.synth import plan_synth
    from common.lib import retrieval
    from common.stages.retrieve_submit import hide_individuals

    def old_folds(ids: pd.Series) -> np.ndarray:  # common.data.competition.make_folds before the fix
        arr = np.asarray([str(i) for i in ids])
        rng = np.random.default_rng(0)
        uniques = np.unique(arr)
        order = rng.permutation(len(uniques))
        folds, position = np.empty(len(arr), dtype=np.int64), 0
        for u in uniques[order]:
            rows = rng.permutation(np.flatnonzero(arr == u))
            folds[rows] = (position + np.arange(len(rows))) % 5
            position += len(rows)
        return folds

    def oof(ids: pd.Series) -> None:
        folds = make_folds(ids, 5, seed=0)
        images = pd.Series([f"{i:014x}.jpg" for i in range(len(ids))])
        valid, fit = folds == 0, folds != 0
        hidden = hide_individuals(ids[valid], ids[fit], 0.2, seed=0)
        gallery = np.flatnonzero(fit & ~ids.isin(hidden).to_numpy())
        rng = np.random.default_rng(0)
        nq = int(valid.sum())
        idx = rng.integers(0, len(gallery), size=(nq, k))
        scores = -np.sort(-rng.uniform(-1, 1, size=(nq, k)), axis=1)
        table = retrieval.individual_scores(scores, idx, ids.to_numpy()[gallery], images[valid])
        truth = retrieval.oof_truth(ids[valid], ids.to_numpy()[gallery])
        best, _ = retrieval.tune_threshold(table, dict(zip(images[valid], truth, strict=True)),
                                           np.round(np.arange(0, 1.0001, 0.02), 6))
        retrieval.predict(table, best, images=images[valid].tolist())

    def timed(fn, *a) -> float:  # CPU seconds of this process: wall time on a loaded machine counts others' jobs
        t = time.process_time()
        fn(*a)
        return time.process_time() - t

    res: dict[str, dict[int, float]] = {"plan_synth": {}, "make_folds (fixed)": {}, "make_folds (old loop)": {},
                                        "OOF tuning, fold 0, k=50": {}}
    for n in sizes:
        res["plan_synth"][n] = timed(plan_synth, n)
        ids = plan_synth(n)[0]["individual_id"]
        res["make_folds (fixed)"][n] = timed(make_folds, ids, 5, 0)
        if n <= 20000:
            res["make_folds (old loop)"][n] = timed(old_folds, ids)
        res["OOF tuning, fold 0, k=50"][n] = timed(oof, ids)
        print(n, {name: round(v.get(n, float("nan")), 3) for name, v in res.items()}, flush=True)
    head = " | ".join(f"{n:,}" for n in sizes)
    lines = [f"| step | {head} | exponent(s) between sizes |", "|---" * (len(sizes) + 2) + "|"]
    for name, v in res.items():
        pts = sorted(v.items())
        exps = [math.log(b / a) / math.log(m / n) for (n, a), (m, b) in zip(pts, pts[1:], strict=False)]
        cells = " | ".join(f"{v[n]:.3f}" if n in v else "-" for n in sizes)
        lines.append(f"| {name} | {cells} | {', '.join(f'{e:.2f}' for e in exps)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--root", default="/tmp/reid_scale", help="inputs, working and logs (outside the repository)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 80000])
    ap.add_argument("--stages", default="01-06", help="e.g. 01-04 or 01-06")
    ap.add_argument("--image-size", type=int, nargs=2, default=(96, 72), metavar=("W", "H"))
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md, write the plot")
    ap.add_argument("--tables", action="store_true", help="only the table-level steps at --sizes (no images)")
    ap.add_argument("--no-run", action="store_true", help="report (and --record) the rows stored under --root")
    args = ap.parse_args(argv)
    if args.child:
        run_child(*args.child)
        return 0
    from bench._report import append_section, cpu_model, utc_stamp

    if args.tables:
        load, started = os.getloadavg()[0], utc_stamp()
        text = table_level(args.sizes)
        print(text)
        if args.record:
            cmd = " ".join(["nice -n 10 .venv/bin/python -m bench.scale", *(sys.argv[1:] if argv is None else argv)])
            append_section(ROOT / "bench" / "RESULTS.md", (
                "\n## Scale: table-level steps (no images) at Happywhale-shaped sizes, CPU seconds\n\n"
                f"- command: `{cmd}` (from the repository root)\n- date: {started}; machine: nproc "
                f"{len(os.sched_getaffinity(0))}, {cpu_model()}, load average at start {load:.2f} (shared machine)\n"
                "- sizes are train + test images of `common.data.synth.plan_synth` (train is 64.6 %); one run each\n\n"
                + text + "\n"))
        return 0
    from common.cli.pipeline import parse_stages

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    store_file = root / "scale_rows.json"
    rows = json.loads(store_file.read_text()) if store_file.exists() else []
    load = os.getloadavg()[0]
    started = utc_stamp()
    for n in [] if args.no_run else args.sizes:
        new = run_size(n, parse_stages(args.stages), root, tuple(args.image_size))
        rows = merge_rows(rows, new)
        store_file.write_text(json.dumps(rows, indent=1))
    text = table(rows)
    span = span_table(rows)
    text += f"\n\n{span}" if span else ""
    print(text)
    if args.record:
        png = plot(rows, ROOT / "bench" / "scale.png")
        cmd = " ".join(["nice -n 10 .venv/bin/python -m bench.scale", *(sys.argv[1:] if argv is None else argv)])
        section = (f"\n## Scale: stages per size on Happywhale-shaped synthetic competitions (bench/scale.py)\n\n"
                   f"- command: `HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 {cmd}` (from the repository root)\n"
                   f"- date: {started}; machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, load average "
                   f"at start {load:.2f} (shared machine: times are indicative)\n"
                   f"- settings: params/debug.yaml with {OVERRIDES}; stage 05 {STAGE_OVERRIDES['05']}\n"
                   f"- plot: `bench/{png.name}`\n\n{text}\n")
        append_section(ROOT / "bench" / "RESULTS.md", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
