"""Benchmark: stage 06 (ensembles, model soups, re-distribution, pseudo-labels, label cleaning) on the
long-tailed Fashion-MNIST of ``bench/classify_fashion.py``.

Data: that script's long-tailed training set (1,489 images at n_max 600, imbalance 100) and the balanced
10,000-image test set (1,000 per class, so test accuracy equals balanced accuracy), converted once under
``working/bench/classify_fashion/fmnist_lt<n_max>/`` (its :func:`convert`, reused here).

Runs: the stage-05 runs it trained (``working/bench-fmnist<n_max>-<variant>-<hash>/``, names recomputed
with its :func:`build_config`) are reused, never retrained. Each member is its **fold-0 model**: the
test probabilities are ``test.npz`` ``probs_fold0`` (plain CE trained all five folds, the others fold 0 only,
so plain CE's five-fold mean ``probs`` would not compare) and its validation score is on its own fold-0
out-of-fold rows (the split depends on the seed, so the seed runs hold out different fifths).

Parts (``--parts``):

* ``ensemble``: the accuracy-weighted ensemble of stage 06 (``common.stages.ensemble_postprocess.member_weights`` and
  ``combine``: weights ``(val acc / min val acc) ** 25``) and the plain mean, of the three plain-CE seeds and
  of every trained variant, against their best single member (chosen on the test set: an oracle).
* ``soup``: ``common.stages.soup.run_soup`` (uniform and greedy, Wortsman et al. 2022) of the fold-0 models of
  the runs that share backbone, linear head, classes, split and seed 42 (hence the same initial weights).
* ``redistribute``: ``common.lib.postprocess.redistribute_labels`` on the test set for several K, against none.
* ``pseudo``: one round of ``ensemble_stage.write_pseudo_labels`` on the three-seed ensemble's test
  probabilities, then plain CE (fold 0) retrained on that folder. It is scored on the same test images it
  pseudo-labelled (transductive, as in a competition).
* ``clean``: a known share of the training labels flipped to another class at random (seeded,
  :func:`flip_labels`), plain CE trained on every fold of that noisy folder (an out-of-fold prediction per
  image), ``ensemble_stage.clean_labels`` flags images, and plain CE (fold 0) is retrained on the cleaned
  folder and, as the ceiling, on the noisy folder without exactly the flipped images.

The last two train, one run at a time (~11 min on the shared 2-core CPU at load ~2), cached under
``working/bench-fmnist<n_max>-<pseudo|noisy20s0|noisy20s0_clean50|noisy20s0_oracle>-<hash>/`` (the hash
covers the config and the training table; their data folders are under ``working/bench/ensemble_fashion/``).
Run from the repository root after ``python -m bench.classify_fashion --ce-seeds 1,2`` (``--record`` appends a
section to bench/RESULTS.md):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.ensemble_fashion --record
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench import classify_fashion as cf  # noqa: E402
from bench.common_args import add_record_args, command_line, finish  # noqa: E402
from common.core import paths, store  # noqa: E402

SEED_KEYS = ("ce", "ce_seed1", "ce_seed2")
# linear head, seed 42: the same initial weights (soup_stage checks backbone, head, classes, split and seed)
SOUP_KEYS = ("ce", "ls", "la_loss", "eql", "balanced", "cutmix", "avg", "distill")
WEIGHT_FACTOR = 25.0  # the ACCV 2022 FGIA winners' --factor
K_VALUES = (100, 500, 900, 1000)
PSEUDO_THRESHOLD = 0.95
NOISE_SHARE, NOISE_SEED = 0.2, 0
CLEAN_THRESHOLD = 0.5  # fixed before looking at the sweep below
CLEAN_SWEEP = (0.3, 0.5, 0.7, 0.9)
PARTS = ("ensemble", "soup", "redistribute", "pseudo", "clean")


# ----------------------------------------------------------------------------------------- pure helpers
def flip_labels(labels: np.ndarray, n_classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(share * N)`` labels, chosen at random, each to one of the *other* classes.

    Args:
        labels: class indices ``0..n_classes-1``.
        n_classes: number of classes (>= 2).
        share: share of the labels to flip, in ``[0, 1]``.
        seed: seed of :func:`numpy.random.default_rng` (same seed, same flips).

    Returns:
        ``(noisy, flipped)``: the new labels and the sorted positions that were flipped.
    """
    y = np.asarray(labels, dtype=np.int64)
    if n_classes < 2 or not 0.0 <= share <= 1.0:
        raise ValueError(f"flip_labels: need n_classes >= 2 and share in [0, 1], got {n_classes}, {share}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"flip_labels: labels must be in 0..{n_classes - 1}")
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(y), size=int(round(share * len(y))), replace=False))
    noisy = y.copy()
    # an offset in 1..C-1 modulo C: uniform over the other classes, never the same one
    noisy[flipped] = (y[flipped] + rng.integers(1, n_classes, size=len(flipped))) % n_classes
    return noisy, flipped


def label_scores(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes in ``y``) and tail accuracy (mean recall of
    ``classify_fashion.TAIL``) of predicted class indices."""
    recall = {c: float((pred[y == c] == c).mean()) for c in np.unique(y)}
    tail = [recall[classes.index(n)] for n in cf.TAIL if n in classes and classes.index(n) in recall]
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "tail_accuracy": float(np.mean(tail)) if tail else float("nan"),
    }


def verdict(delta: float, band: float) -> str:
    """``yes``/``NO`` with the difference in points, ``within seed noise`` inside ``band``."""
    if abs(delta) <= band:
        return f"within seed noise ({100 * delta:+.1f} pts)"
    return f"{'yes' if delta > 0 else 'NO'} ({100 * delta:+.1f} pts)"


# ----------------------------------------------------------------------------------------- runs
def variant_exp(key: str, root: Path, n_max: int) -> str:
    """The experiment name ``classify_fashion.py`` gave variant ``key`` (``ce_seed<N>``: plain CE, seed N)."""
    by_key = {v.key: v for v in cf.VARIANTS if v.source == "train"}
    if re.fullmatch(r"ce_seed\d+", key):
        variant = cf.Variant(key, key, {"seed": int(key[7:])})
    elif key in by_key:
        variant = by_key[key]
    else:
        raise SystemExit(
            f"{key!r}: not a trained variant of bench/classify_fashion.py ({sorted(by_key)}, ce_seed<N>)"
        )
    teacher = cf.build_config(by_key["ce"], cf.BASE, root, n_max).exp
    return cf.build_config(variant, cf.BASE, root, n_max, teacher=teacher).exp


def fold0_member(exp: str, test_images: list[str]):
    """An :class:`~common.stages.ensemble_postprocess.Member` of ``exp``'s fold-0 model: fold-0 out-of-fold rows and
    ``test.npz`` ``probs_fold0``."""
    from common.stages.ensemble_postprocess import Member

    folder = paths.stage_dir(exp, "05")
    if not store.stage_done(folder):
        raise FileNotFoundError(f"{folder}: no finished stage-05 run; run python -m bench.classify_fashion first")
    info = store.read_json(folder / "classes.json")
    oof = store.load_arrays(folder / "oof.npz")
    test = store.load_arrays(folder / "test.npz", test_images)
    rows = oof["fold"] == 0
    return Member(
        exp,
        [str(c) for c in info["classes"]],
        str(info["label_column"]),
        [str(i) for i in oof["image"][rows]],
        oof["probs"][rows],
        oof["label"][rows].astype(int),
        list(test_images),
        test["probs_fold0"],
    )


def run_name(n_max: int, key: str, cfg, data: Path) -> str:
    """``bench-fmnist<n_max>-<key>-<hash>``: the hash covers the model's knobs and ``data``'s train.csv."""
    knobs = {k: v for k, v in cfg.fingerprint().items() if k not in ("data", "exp", "device", "folds")}
    knobs["train_csv"] = hashlib.sha1((data / "train.csv").read_bytes()).hexdigest()
    digest = hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
    return f"bench-fmnist{n_max}-{key}-{digest}"


def train(key: str, data: Path, n_max: int, overrides: dict | None = None) -> dict:
    """Train plain CE (``classify_fashion.BASE`` + ``overrides``) on ``data``, or reuse the cached run."""
    from common.config import ClassifierConfig
    from common.data.competition import load_competition
    from common.stages.train_classifier import run_classification, training_logs

    cfg = ClassifierConfig(**{**cf.BASE, **(overrides or {})}, data=str(data), exp="tmp")
    cfg = dataclasses.replace(cfg, exp=run_name(n_max, key, cfg, data))
    reused = store.stage_done(paths.stage_dir(cfg.exp, "05"), cfg.fingerprint())
    print(f"{key}: {cfg.exp}{' (reused)' if reused else ', training'}", flush=True)
    if not reused:
        run_classification(cfg, load_competition(data, check_pixels=False))
    train_s = float(training_logs(cfg.exp, cfg.fold_list())["seconds"].sum())
    return {
        "exp": cfg.exp,
        "reused": reused,
        "train_s": train_s,
        "n_train": int(len(pd.read_csv(data / "train.csv"))),
    }


# ----------------------------------------------------------------------------------------- parts
def ensemble_part(members: dict, sets: dict[str, list[str]], y: np.ndarray) -> tuple[list[dict], dict]:
    """Single members, plain mean and accuracy-weighted ensembles of each set; rows and test probabilities."""
    from common.lib import ensemble
    from common.stages.ensemble_postprocess import combine, member_weights

    rows, probs = [], {}
    for name, keys in sets.items():
        ms = [members[k] for k in keys]
        classes = ms[0].classes
        singles = [
            dict(
                set=name,
                model=f"{k} ({m.exp})",
                kind="single",
                val=m.oof_accuracy,
                **label_scores(y, m.test_probs.argmax(1), classes),
            )
            for k, m in zip(keys, ms, strict=True)
        ]
        best = max(singles, key=lambda r: r["accuracy"])
        mean_single = float(np.mean([r["accuracy"] for r in singles]))
        rows += singles
        bal_val = [label_scores(m.oof_label, m.oof_probs.argmax(1), classes)["balanced_accuracy"] for m in ms]
        for label, raw in (
            (f"plain mean of {len(ms)}", member_weights(ms, 0.0)),
            (f"accuracy weights (val acc, factor {WEIGHT_FACTOR:g})", member_weights(ms, WEIGHT_FACTOR)),
            (
                f"weights from val balanced acc, factor {WEIGHT_FACTOR:g}",
                ensemble.accuracy_weights(bal_val, WEIGHT_FACTOR, normalize=False),
            ),
        ):
            w = raw / raw.sum()
            test, _, _ = combine(ms, w, "test")
            probs[(name, label)] = test
            rows.append(
                dict(
                    set=name,
                    model=label,
                    kind="ensemble",
                    val=float("nan"),
                    best=best,
                    mean_single=mean_single,
                    weights=", ".join(f"{k} {v:.3f}" for k, v in zip(keys, w, strict=True)),
                    **label_scores(y, test.argmax(1), classes),
                )
            )
    return rows, probs


def soup_part(exps: list[str], comp, y: np.ndarray, work: Path, device: str) -> list[dict]:
    """Uniform and greedy soups of the fold-0 models (cached under ``work/soup_<mode>``)."""
    from common.config import EnsembleConfig
    from common.stages.soup import run_soup

    rows = []
    for mode in ("uniform", "greedy"):
        out = work / f"soup_{mode}"
        params = {"mode": mode, "ingredients": exps, "data": str(comp.root)}
        t0 = time.perf_counter()
        if not store.stage_done(out, params):
            cfg = EnsembleConfig(
                data=str(comp.root),
                exp="bench-fmnist-soup",
                soup=mode,
                soup_members=",".join(exps),
                device=device,
            )
            store.write_json(out / "result.json", run_soup(cfg, comp, out))
            store.mark_done(out, params, seconds=round(time.perf_counter() - t0, 1))
        res = store.read_json(out / "result.json")
        test = store.load_arrays(out / "soup_test.npz", list(comp.test["image"]))["probs"]
        classes = store.read_json(paths.stage_dir(exps[0], "05") / "classes.json")["classes"]
        steps = pd.read_csv(out / "soup_steps.csv")
        rows.append(
            dict(
                mode=mode,
                kept=res["kept"]["0"],
                val=res["oof"]["accuracy"],
                steps=steps,
                seconds=store.read_json(out / "_done.json").get("seconds", float("nan")),
                **label_scores(y, test.argmax(1), classes),
            )
        )
    return rows


def redistribute_part(
    sources: dict[str, np.ndarray], images: list[str], classes: list[str], y: np.ndarray, ks: tuple[int, ...]
) -> list[dict]:
    """Re-distribution of each source's test probabilities for every K (0 = none)."""
    from common.lib.postprocess import redistribute_labels

    truth = np.asarray(classes)[y]
    rows = []
    for name, probs in sources.items():
        for k in (0, *ks):
            if k == 0:
                pred, moves = probs.argmax(1), pd.DataFrame(columns=["image", "from_label", "to_label"])
            else:
                table, moves = redistribute_labels(probs, images, classes, k)
                pred = np.array([classes.index(c) for c in table["label"]])
            at = pd.Series(truth, index=images)
            before = np.bincount(probs.argmax(1), minlength=len(classes))
            rows.append(
                dict(
                    source=name,
                    k=k,
                    below=int((before < k).sum()),
                    moved=len(moves),
                    now_right=int((moves["to_label"].to_numpy() == at[moves["image"]].to_numpy()).sum()),
                    were_right=int((moves["from_label"].to_numpy() == at[moves["image"]].to_numpy()).sum()),
                    **label_scores(y, pred, classes),
                )
            )
    return rows


def pseudo_part(
    test_probs: np.ndarray,
    classes: list[str],
    comp,
    y: np.ndarray,
    work: Path,
    n_max: int,
    threshold: float,
    sources: list[str],
) -> dict:
    """One pseudo-label round from ``test_probs`` (the ensemble of the ``sources`` runs) with stage 06's
    writer, then plain CE fold 0 retrained on it."""
    from common.config import EnsembleConfig
    from common.stages.ensemble_postprocess import write_pseudo_labels

    cfg = EnsembleConfig(
        data=str(comp.root), exp="bench-fmnist-pseudo", members=",".join(sources), pseudo_threshold=threshold
    )
    info = write_pseudo_labels(cfg, comp, test_probs, classes, "individual_id", work / "pseudo")
    kept = pd.read_csv(work / "pseudo" / "pseudo_round1.csv", dtype={"image": str, "individual_id": str})
    truth = pd.Series(np.asarray(classes)[y], index=list(comp.test["image"]))
    run = train("pseudo", Path(info["folder"]), n_max)
    member = fold0_member(run["exp"], list(comp.test["image"]))
    return dict(
        run=run,
        kept=len(kept),
        share=info["share"],
        label_acc=float((kept["individual_id"].to_numpy() == truth[kept["image"]].to_numpy()).mean()),
        per_class=kept["individual_id"].value_counts().reindex(classes).fillna(0).astype(int).to_dict(),
        **label_scores(y, member.test_probs.argmax(1), classes),
    )


def clean_part(
    comp, y: np.ndarray, work: Path, n_max: int, share: float, seed: int, threshold: float, clean_exp: str
) -> dict:
    """Flip ``share`` of the labels, train plain CE on every fold, flag, retrain on the cleaned folder.

    ``clean_exp`` (plain CE on the true labels, every fold) gives the false-flag count on clean labels."""
    from common.config import EnsembleConfig
    from common.data.competition import load_competition
    from common.lib import postprocess
    from common.stages.ensemble_postprocess import clean_labels, load_member, write_competition

    train_table = comp.train.drop(columns=["path"])
    classes = sorted(set(train_table["individual_id"]))
    given = np.array([classes.index(c) for c in train_table["individual_id"]])
    noisy, flipped = flip_labels(given, len(classes), share, seed)
    name = f"noisy{round(100 * share)}s{seed}"
    folder = work / name
    table = train_table.assign(individual_id=np.asarray(classes)[noisy])
    if not (folder / "train.csv").exists() or not pd.read_csv(folder / "train.csv", dtype=str).equals(
        table.astype(str)
    ):
        write_competition(comp, table, folder)
    flipped_images = set(train_table["image"].iloc[flipped])
    store.write_csv(
        work / f"{name}_flipped.csv",
        pd.DataFrame(
            {
                "image": train_table["image"].iloc[flipped],
                "true": np.asarray(classes)[given[flipped]],
                "noisy": np.asarray(classes)[noisy[flipped]],
            }
        ),
    )
    noisy_run = train(name, folder, n_max, {"folds": "all"})
    m = load_member(noisy_run["exp"])  # every fold's out-of-fold rows: one prediction per training image
    ref = load_member(clean_exp)
    if len(ref.oof_images) != len(given):
        raise SystemExit(f"{clean_exp}: needs every fold (classify_fashion.py trains them for distill)")
    sweep = []
    for t in sorted({*CLEAN_SWEEP, threshold}):
        flagged = set(
            postprocess.flag_noisy_labels(m.oof_probs, m.oof_images, m.classes, m.oof_label, t)["image"]
        )
        hit = len(flagged & flipped_images)
        sweep.append(
            dict(
                on_clean=len(postprocess.flag_noisy_labels(ref.oof_probs, ref.oof_images, ref.classes,
                                                           ref.oof_label, t)),
                threshold=t,
                flagged=len(flagged),
                hit=hit,
                clean_flagged=len(flagged) - hit,
                precision=hit / len(flagged) if flagged else float("nan"),
                recall=hit / len(flipped_images),
            )
        )
    ncomp = load_competition(folder, check_pixels=False)
    cfg = EnsembleConfig(data=str(folder), exp="bench-fmnist-clean", members=m.exp, clean_threshold=threshold)
    res = clean_labels(cfg, ncomp, m.oof_probs, m.oof_images, m.classes, m.oof_label, work / f"{name}_clean")
    cleaned = train(f"{name}_clean{round(100 * threshold)}", Path(res["folder"]), n_max)
    # the ceiling: drop exactly the flipped images (what a perfect flagger would leave)
    oracle_folder = work / f"{name}_oracle"
    oracle_table = table.drop(index=table.index[flipped]).reset_index(drop=True)
    if not (oracle_folder / "train.csv").exists() or not pd.read_csv(
        oracle_folder / "train.csv", dtype=str
    ).equals(oracle_table.astype(str)):
        write_competition(comp, oracle_table, oracle_folder)
    oracle = train(f"{name}_oracle", oracle_folder, n_max)
    left = set(pd.read_csv(Path(res["folder"]) / "train.csv", dtype=str)["image"])
    test_images = list(comp.test["image"])
    return dict(
        n=len(given),
        flipped=len(flipped),
        sweep=sweep,
        threshold=threshold,
        noisy_run=noisy_run,
        cleaned_run=cleaned,
        left=len(left),
        left_flipped=len(left & flipped_images),
        noisy=label_scores(y, fold0_member(noisy_run["exp"], test_images).test_probs.argmax(1), classes),
        cleaned=label_scores(y, fold0_member(cleaned["exp"], test_images).test_probs.argmax(1), classes),
        oracle_run=oracle,
        oracle=label_scores(y, fold0_member(oracle["exp"], test_images).test_probs.argmax(1), classes),
    )


def map5_citation(results: Path) -> list[str]:
    """The retrieval ensembles already in ``results`` (bench/embedder_reid.py's sections), one line each."""
    text = results.read_text() if results.exists() else ""
    lines = []
    for section in re.split(r"\n## ", text):
        title = re.match(r"Embedder re-identification on unseen individuals: (\w+)", section)
        if not title:
            continue
        seeds = [float(v) for v in re.findall(r"\n\| trained, seed [^|]*\| ([0-9.]+) \|", section)]
        ens = re.findall(r"\n\| ensemble of [^|]*\| ([0-9.]+) \|", section)
        if seeds and ens:
            e = float(ens[-1])
            lines.append(
                f"{title.group(1)}: ensemble of {len(seeds)} seeds MAP@5 {e:.4f} vs best single seed "
                f"{max(seeds):.4f} (mean {np.mean(seeds):.4f}): "
                + ("helps" if e > max(seeds) else "does NOT beat the best seed")
            )
    return lines


# ----------------------------------------------------------------------------------------- report
def _key(exp: str) -> str:
    """``bench-fmnist600-<key>-<hash>`` -> ``<key>``."""
    return exp.split("-")[2] if exp.count("-") >= 3 else exp


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def report_lines(out: dict, band: float) -> list[str]:
    """The markdown tables of every part that ran."""
    lines: list[str] = []
    if "ensemble" in out:
        lines += [
            "",
            "### Ensembles of stage-05 runs (fold-0 models) vs their best single member",
            "",
            "| member set | model | val acc (own fold 0) | test acc | test balanced acc | tail acc "
            "| x best single | vs mean of members | helps vs best single? |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in out["ensemble"]:
            if r["kind"] == "single":
                lines.append(
                    f"| {r['set']} | {r['model']} | {r['val']:.3f} | {r['accuracy']:.4f} | "
                    f"{r['balanced_accuracy']:.4f} | {r['tail_accuracy']:.4f} | - | - | - |"
                )
            else:
                b = r["best"]
                lines.append(
                    f"| {r['set']} | **{r['model']}** (weights: {r['weights']}) | - | {r['accuracy']:.4f} | "
                    f"{r['balanced_accuracy']:.4f} | {r['tail_accuracy']:.4f} | "
                    f"{r['accuracy'] / b['accuracy']:.3f} | "
                    f"{100 * (r['accuracy'] - r['mean_single']):+.1f} pts | "
                    f"{verdict(r['accuracy'] - b['accuracy'], band)} |"
                )
    if "soup" in out:
        s = out["soup"]
        best = max(s["members"], key=lambda r: r["accuracy"])
        mean = float(np.mean([r["accuracy"] for r in s["members"]]))
        lines += [
            "",
            "### Model soups of the fold-0 models (one model's inference cost) vs their ingredients",
            "",
            "| model | val acc (fold 0) | test acc | tail acc | vs mean of ingredients | "
            "helps vs best ingredient? |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["members"]:
            lines.append(
                f"| ingredient {r['model']} | {r['val']:.3f} | {r['accuracy']:.4f} | "
                f"{r['tail_accuracy']:.4f} | - | - |"
            )
        soups = [(f"**{r['mode']} soup** (kept {len(r['kept'])}: {', '.join(map(_key, r['kept']))}; "
                  f"{r['seconds']:.0f} s)", r["val"], r) for r in s["soups"]]
        n = len(s["members"])
        soups.append((f"for comparison: plain-mean probability ensemble of the {n} ingredients "
                      f"({n}x the inference)", float("nan"), s["ensemble"]))
        for label, val, r in soups:
            lines.append(
                f"| {label} | {'-' if val != val else f'{val:.3f}'} | {r['accuracy']:.4f} | "
                f"{r['tail_accuracy']:.4f} | {100 * (r['accuracy'] - mean):+.1f} pts | "
                f"{verdict(r['accuracy'] - best['accuracy'], band)} |"
            )
        for r in s["soups"]:
            if r["mode"] == "greedy":
                steps = "; ".join(f"{_key(t.candidate)} {t.soup_score:.3f}{' kept' if t.kept else ''}"
                                  for t in r["steps"].itertuples())
                lines += ["", "- greedy soup steps (candidate: fold-0 val acc of the soup tried; kept when "
                          f">= the current soup's): {steps}"]
    if "redistribute" in out:
        lines += [
            "",
            "### Label re-distribution on the balanced test set (every class gets at least K of the "
            "10,000 test images)",
            "",
            "| scores | K | classes below K before | moved | moves now right | moves that were right | "
            "test acc | tail acc | helps vs none? |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = {}
        for r in out["redistribute"]:
            if r["k"] == 0:
                base[r["source"]] = r["accuracy"]
            v = "-" if r["k"] == 0 else verdict(r["accuracy"] - base[r["source"]], band)
            lines.append(
                f"| {r['source']} | {r['k'] or 'none'} | {r['below']} | {r['moved']} | {r['now_right']} | "
                f"{r['were_right']} | {r['accuracy']:.4f} | {r['tail_accuracy']:.4f} | {v} |"
            )
    if "pseudo" in out:
        p = out["pseudo"]
        ce = out["ce"]
        per_class = ", ".join(f"{k} {v}" for k, v in p["per_class"].items())
        lines += [
            "",
            f"### One pseudo-label round (threshold {p['threshold']:g} on the 3-seed ensemble's test "
            "probabilities) vs none",
            "",
            f"- kept {p['kept']} of 10,000 test images ({100 * p['share']:.1f} %), pseudo-label accuracy "
            f"{p['label_acc']:.4f}; per class: {per_class}",
            "- transductive: the retrained model is scored on the same test images it was pseudo-labelled "
            "on (as in a competition round); its fold 0 holds out a fifth of the original + pseudo rows",
            "",
            "| model | training rows (all folds) | test acc | tail acc | training s | helps vs plain CE? |",
            "|---|---|---|---|---|---|",
            f"| plain CE, seed 42 ({ce['exp']}) | {ce['n_train']} | {ce['accuracy']:.4f} | "
            f"{ce['tail_accuracy']:.4f} | "
            "- | - |",
            f"| the pseudo-label source: {p['source']} | - | {p['source_acc']:.4f} | "
            f"{p['source_tail']:.4f} | - | - |",
            f"| **plain CE + round-1 pseudo-labels** ({p['run']['exp']}) | {p['run']['n_train']} | "
            f"{p['accuracy']:.4f} | {p['tail_accuracy']:.4f} | {p['run']['train_s']:.0f}"
            f"{' (earlier call)' if p['run']['reused'] else ''} | "
            f"{verdict(p['accuracy'] - ce['accuracy'], band)} |",
        ]
    if "clean" in out:
        c = out["clean"]
        ce = out["ce"]
        lines += [
            "",
            f"### Label cleaning: {c['flipped']} of {c['n']} training labels "
            f"({100 * c['flipped'] / c['n']:.0f} %) flipped at random to another class (seed {c['seed']})",
            "",
            f"- plain CE trained on all 5 folds of the noisy table ({c['noisy_run']['exp']}); an image is "
            "flagged when its out-of-fold prediction differs from its (noisy) label with probability >= "
            f"threshold; the cleaned table drops the flagged images (threshold {c['threshold']:g}, fixed "
            f"beforehand): {c['left']} images left, {c['left_flipped']} of them still flipped",
            f"- training seconds (from log.csv): noisy, 5 folds {c['noisy_run']['train_s']:.0f}; cleaned, "
            f"fold 0 {c['cleaned_run']['train_s']:.0f}; oracle, fold 0 {c['oracle_run']['train_s']:.0f}",
            "",
            "| threshold | flagged | truly flipped among flagged (precision) | flipped found (recall) | "
            "correct labels flagged | flagged by plain CE on the clean labels (all false) |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["sweep"]:
            lines.append(
                f"| {r['threshold']:g} | {r['flagged']} | {r['hit']} ({_pct(r['precision'])}) | "
                f"{r['hit']} of {c['flipped']} ({r['recall']:.4f}) | {r['clean_flagged']} | {r['on_clean']} |"
            )
        lines += [
            "",
            "| training labels (plain CE, fold-0 model) | test acc | tail acc | vs noisy |",
            "|---|---|---|---|",
            f"| clean labels (reference: {ce['exp']}) | {ce['accuracy']:.4f} | {ce['tail_accuracy']:.4f} | "
            f"{verdict(ce['accuracy'] - c['noisy']['accuracy'], band)} |",
            f"| {100 * c['flipped'] / c['n']:.0f} % flipped | {c['noisy']['accuracy']:.4f} | "
            f"{c['noisy']['tail_accuracy']:.4f} | - |",
            f"| **flipped, then cleaned at {c['threshold']:g}** ({c['cleaned_run']['exp']}, "
            f"{c['cleaned_run']['n_train']} images) | "
            f"{c['cleaned']['accuracy']:.4f} | {c['cleaned']['tail_accuracy']:.4f} | "
            f"{verdict(c['cleaned']['accuracy'] - c['noisy']['accuracy'], band)} |",
            f"| oracle: flipped, then exactly the flipped images dropped ({c['oracle_run']['exp']}, "
            f"{c['oracle_run']['n_train']} images) | {c['oracle']['accuracy']:.4f} | "
            f"{c['oracle']['tail_accuracy']:.4f} | "
            f"{verdict(c['oracle']['accuracy'] - c['noisy']['accuracy'], band)} |",
        ]
    return lines


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-max", type=int, default=cf.N_MAX, help="head-class size of the long-tailed set")
    ap.add_argument("--shared", type=Path, default=cf.SHARED, help="the shared datasets folder")
    ap.add_argument("--work", type=Path, default=None, help="default working/bench/ensemble_fashion")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--no-train", action="store_true", help="skip the parts that train (pseudo, clean)")
    ap.add_argument("--ks", default=",".join(map(str, K_VALUES)), help="re-distribution K values")
    ap.add_argument("--pseudo-threshold", type=float, default=PSEUDO_THRESHOLD)
    ap.add_argument("--noise-share", type=float, default=NOISE_SHARE)
    ap.add_argument("--noise-seed", type=int, default=NOISE_SEED)
    ap.add_argument("--clean-threshold", type=float, default=CLEAN_THRESHOLD)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as bench.classify_fashion)")
    add_record_args(ap)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; known {PARTS}")
    if args.no_train:
        parts = [p for p in parts if p not in ("pseudo", "clean")]

    import torch

    from bench._report import torch_machine_line, utc_stamp
    from common.core.runtime import resolve_device
    from common.data.competition import load_competition

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads or (1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()))
    root = cf.convert(paths.working_dir() / "bench" / "classify_fashion", args.shared, args.n_max)
    work = args.work or paths.working_dir() / "bench" / "ensemble_fashion"
    comp = load_competition(root, check_pixels=False)
    images = list(comp.test["image"])
    truth = pd.read_csv(root / "test.csv", dtype=str).set_index("image")["individual_id"].reindex(images)

    keys = [v.key for v in cf.VARIANTS if v.source == "train"] + ["ce_seed1", "ce_seed2"]
    exps = {k: variant_exp(k, root, args.n_max) for k in keys}
    members = {
        k: fold0_member(e, images) for k, e in exps.items() if store.stage_done(paths.stage_dir(e, "05"))
    }
    missing = [k for k in SEED_KEYS if k not in members]
    if missing:
        raise SystemExit(
            f"runs {missing} ({[exps[k] for k in missing]}) not finished: run "
            "python -m bench.classify_fashion --ce-seeds 1,2 first"
        )
    classes = members["ce"].classes
    y = np.array([classes.index(c) for c in truth])
    seed_acc = [label_scores(y, members[k].test_probs.argmax(1), classes)["accuracy"] for k in SEED_KEYS]
    band = max(seed_acc) - min(seed_acc)
    ce_scores = label_scores(y, members["ce"].test_probs.argmax(1), classes)
    ce = {"exp": exps["ce"], "n_train": len(comp.train), **ce_scores}
    out: dict = {"ce": ce}

    sets = {"3 plain-CE seeds": list(SEED_KEYS), f"all {len(members)} trained variants": list(members)}
    rows, probs = ensemble_part(members, sets, y)
    seed_ens = probs[("3 plain-CE seeds", f"accuracy weights (val acc, factor {WEIGHT_FACTOR:g})")]
    if "ensemble" in parts:
        out["ensemble"] = rows
    if "soup" in parts:
        soup_keys = [k for k in SOUP_KEYS if k in members]
        plain = np.mean([members[k].test_probs for k in soup_keys], axis=0)
        out["soup"] = {
            "members": [
                dict(
                    model=k,
                    val=members[k].oof_accuracy,
                    **label_scores(y, members[k].test_probs.argmax(1), classes),
                )
                for k in soup_keys
            ],
            "soups": soup_part([exps[k] for k in soup_keys], comp, y, work, cf.BASE["device"]),
            "ensemble": label_scores(y, plain.argmax(1), classes),
        }
    if "redistribute" in parts:
        ks = tuple(int(k) for k in args.ks.split(",") if k)
        out["redistribute"] = redistribute_part(
            {"3-seed ensemble (accuracy weights)": seed_ens, "plain CE, seed 42": members["ce"].test_probs},
            images,
            classes,
            y,
            ks,
        )
    if "pseudo" in parts:
        p = pseudo_part(
            seed_ens, classes, comp, y, work, args.n_max, args.pseudo_threshold, [exps[k] for k in SEED_KEYS]
        )
        src = label_scores(y, seed_ens.argmax(1), classes)
        out["pseudo"] = {
            **p,
            "threshold": args.pseudo_threshold,
            "source": "3-seed ensemble (accuracy weights)",
            "source_acc": src["accuracy"],
            "source_tail": src["tail_accuracy"],
        }
    if "clean" in parts:
        out["clean"] = {
            **clean_part(comp, y, work, args.n_max, args.noise_share, args.noise_seed, args.clean_threshold,
                         exps["ce"]),
            "seed": args.noise_seed,
        }

    total = time.perf_counter() - t_start
    command = command_line("ensemble_fashion", argv)
    lines = [
        "",
        f"## Long-tailed Fashion-MNIST (n_max {args.n_max}): stage 06 ensembles, soups, re-distribution, "
        "pseudo-labels, label cleaning",
        "",
        f"- command: `{command}` (from the repository root, after `python -m bench.classify_fashion "
        "--ce-seeds 1,2`)",
        f"- date: {utc_stamp()}",
        f"- machine: {torch_machine_line(resolve_device(cf.BASE['device']).type, load)}",
        "- data: the long-tailed training set and balanced 10,000-image test set of the classifier-tricks "
        "section (test accuracy = balanced accuracy; both shown); tail = mean recall of "
        f"{', '.join(cf.TAIL)}",
        "- members: the runs of bench/classify_fashion.py (no retraining), each as its **fold-0 model**: "
        "test probabilities `test.npz` `probs_fold0`, validation score on its own fold-0 held-out fifth "
        "(long-tailed, ~298 images; the seeds' splits differ). Ensembles: stage 06's "
        "`ensemble_stage.member_weights` + `combine` (weights (val acc / min val acc) ** 25, normalised; "
        "factor 0 = plain mean); the best single member is picked on the test set (an oracle)",
        "- seed noise: plain-CE test accuracy over seeds 42, 1, 2 = "
        f"{', '.join(f'{a:.4f}' for a in seed_acc)}: spread {100 * band:.1f} pts; a difference within it "
        "is called noise",
        f"- wall time of this call {total:.0f} s",
    ]
    lines += report_lines(out, band)
    cite = map5_citation(args.results)
    lines += ["", "### Retrieval (MAP@5) ensembles: not rerun here, from the embedder sections above", ""]
    lines += [f"- {c}" for c in cite] or ["- no embedder section with a seed ensemble in RESULTS.md yet"]
    finish(args, "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
