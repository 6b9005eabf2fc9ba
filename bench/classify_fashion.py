"""Benchmark: the stage-05 classifier's long-tail tricks on a long-tailed Fashion-MNIST.

Data: ``../shared/datasets/fashion-mnist`` (Zalando 2017, MIT; 60,000 training and 10,000 test images,
28x28 grey, 10 clothing classes), never copied into the repository.

The IDX files (http://yann.lecun.com/exdb/mnist/, same format) are gzip-compressed; each starts with a 4-byte
magic number ``00 00 <type> <ndim>`` (type ``0x08`` = unsigned byte), then ``ndim`` big-endian uint32
dimensions, then the data in C order: labels ``idx1`` = magic ``0x00000801``, shape ``(N,)``; images ``idx3``
= magic ``0x00000803``, shape ``(N, 28, 28)``. :func:`read_idx` checks all of this (numpy only) and names the
file when something is wrong.

The long-tailed training set (imbalance ratio ``n_max / n_min`` = 100), deterministic: class ``c`` (0..9, in
Fashion-MNIST's label order) keeps ``n_c = round(n_max * 100 ** (-c / 9))`` images, the *first* ``n_c``
images of that class in file order (no random draw). With ``n_max = 600`` (:data:`N_MAX`) that is
600, 360, 216, 129, 77, 46, 28, 17, 10, 6 images = 1,489 in all, so the three rarest classes (Sneaker, Bag,
Ankle boot) hold 33 images together. n_max = 600 was chosen from timing (see :data:`N_MAX`). The test set is
the full, balanced 10,000 images (1,000 per class), so its accuracy equals its balanced accuracy exactly;
both are reported.

:func:`convert` writes the competition layout once under ``working/bench/classify_fashion/fmnist_lt<n_max>/``:
``train_images/train_<index>.png`` and ``test_images/test_<index>.png`` (grey PNGs; ``<index>`` is the image's
position in its IDX file, five digits), ``train.csv`` (``image, species, individual_id``: species
``clothing``, individual_id the class name made file-safe, e.g. ``T-shirt_top``), ``test.csv``
(``image, individual_id``: the ground truth), ``sample_submission.csv`` and ``classes.csv`` (label, class
name, id, training and test counts).

The benchmark (:data:`VARIANTS`): each row is one :class:`~common.config.ClassifierConfig` run through
:func:`common.stages.train_classifier.run_classification`: the plain-CE base (:data:`BASE`: tf_efficientnet_lite0 with
offline ImageNet weights, 32 px, 8 epochs) plus *one* trick, not cumulative, so each row measures that trick
alone. Every run trains fold 0 of 5 (four fifths of the long-tailed set) and its fold-0 model is scored on
the test set: accuracy, balanced accuracy (the mean per-class recall), the tail accuracy (mean recall of the
three rarest classes), and the balanced accuracy after post-hoc logit adjustment of that row's scores. Plain
CE trains all five folds: it is the teacher of the self-distillation row, which needs an out-of-fold
prediction for every training image. The post-hoc logit-adjustment and flip-TTA rows need no training: they
rescore each plain-CE run's saved fold-0 arrays, or rerun its fold-0 model with the flip, paired per seed.
``--ce-seeds`` trains plain CE with more seeds; their spread is the band under which a trained row's change
is called seed noise.

Run from the repository root (``--record`` appends a section to bench/RESULTS.md; 30 min on the shared
2-core CPU, each run is cached under ``working/bench-fmnist<n_max>-<variant>-<hash>/`` and reused):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.classify_fashion --ce-seeds 1,2 --record

``--convert-only`` writes the data and stops; ``--only ls,cutmix`` runs a subset; ``-p key=value`` overrides a
field of the base; ``--n-max`` changes the head class's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
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

from bench.common_args import (  # noqa: E402
    SHARED,
    add_param_arg,
    add_record_args,
    command_line,
    finish,
    parse_overrides,
    parse_seeds,
)
from common.core import paths, store  # noqa: E402
from common.data.competition import DataError  # noqa: E402

DATA_VERSION = 1  # bump when the converted layout changes: converted folders are rebuilt

# Fashion-MNIST's label order (its README); the long tail follows this order: T-shirt/top is the head.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
IMBALANCE = 100.0
# Head-class size. On the shared 2-core CPU, tf_efficientnet_lite0 trained at 32 px at ~30-120 img/s (load
# 2-6; 2 vs 1 torch threads) and predicted at ~170-350 img/s: 600 gives 1,489 training images, so a variant
# of ~8 epochs trains in 1-3 min and the 10,000 test images (x2 with flip TTA) take ~1 min, which keeps the
# whole table under an hour (measured: 30 min at load ~5), while the rarest class still has 6 images.
N_MAX = 600
SPECIES = "clothing"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_TYPES = {0x08: np.uint8}  # the only type code Fashion-MNIST uses (unsigned byte)


# ----------------------------------------------------------------------------------------- data
def safe_name(name: str) -> str:
    """A class name as a file-safe id: runs of characters other than letters, digits and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_")


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes with numpy.

    Args:
        path: the ``.gz`` file.
        ndim: the number of dimensions expected (1: labels, 3: images).

    Returns:
        The array, ``uint8``, of the shape the header gives.

    Raises:
        DataError: missing file, not gzip, wrong magic number, or a data size that disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from err
    expected = 0x0800 | ndim
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] != ndim:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        raise DataError(f"{path}: wrong IDX magic number {shown}, expected 0x{expected:08x} "
                        f"(unsigned bytes, {ndim} dimension(s))")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: header cut short ({len(raw)} bytes, {header} expected)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_TYPES[raw[2]]
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) - header != size:
        raise DataError(f"{path}: {len(raw) - header} data bytes, but the header's shape {shape} needs {size}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` and labels ``(N,)`` (both ``uint8``) of ``split`` (``train`` or ``test``).

    Args:
        folder: the ``fashion-mnist`` folder.
        split: ``train`` or ``test``.
    """
    image_file, label_file = (folder / name for name in FILES[split])
    labels = read_idx(label_file, 1)
    images = read_idx(image_file, 3)
    if len(images) != len(labels):
        raise DataError(f"{image_file}: {len(images)} images but {label_file.name} has {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        row = int(np.argmax(labels >= len(CLASS_NAMES)))
        raise DataError(f"{label_file}: label {labels[row]} at position {row} is not in 0..9")
    return images, labels


def long_tail_counts(n_max: int, imbalance: float = IMBALANCE, n_classes: int = len(CLASS_NAMES)) -> list[int]:
    """Images kept per class: ``round(n_max * imbalance ** (-c / (n_classes - 1)))`` for class ``c``.

    The exponential profile of Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
    Loss" (https://arxiv.org/abs/1906.07413), used by the CIFAR-LT benchmarks.

    Args:
        n_max: images of class 0 (the head).
        imbalance: ``n_max / n_min``.
        n_classes: number of classes.
    """
    if n_max < 1 or imbalance < 1:
        raise ValueError(f"n_max={n_max}, imbalance={imbalance}: need n_max >= 1 and imbalance >= 1")
    return [round(n_max * imbalance ** (-c / (n_classes - 1))) for c in range(n_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Positions (ascending, i.e. file order) of the first ``counts[c]`` images of each class ``c``.

    Args:
        labels: the training labels in file order.
        counts: images to keep per class (:func:`long_tail_counts`).
    """
    keep = []
    for c, n in enumerate(counts):
        rows = np.flatnonzero(labels == c)
        if len(rows) < n:
            raise DataError(f"class {c} ({CLASS_NAMES[c]}) has {len(rows)} training images, {n} requested")
        keep.append(rows[:n])
    return np.sort(np.concatenate(keep))


def _write_images(folder: Path, prefix: str, images: np.ndarray, index: np.ndarray) -> list[str]:
    import cv2

    names = [f"{prefix}_{i:05d}.png" for i in index]
    for name, i in zip(names, index, strict=True):
        if not cv2.imwrite(str(folder / name), images[i]):
            raise OSError(f"{folder / name}: cv2.imwrite failed")
    return names


def write_competition(source: Path, out: Path, n_max: int) -> Path:
    """Write the long-tailed competition folder (module docstring) atomically: built beside ``out``, renamed.

    Args:
        source: the ``fashion-mnist`` folder with the four IDX ``.gz`` files.
        out: the folder to create (replaced if it exists).
        n_max: images of the head class.
    """
    train_x, train_y = load_split(source, "train")
    test_x, test_y = load_split(source, "test")
    counts = long_tail_counts(n_max)
    keep = long_tail_indices(train_y, counts)
    ids = np.array([safe_name(n) for n in CLASS_NAMES])
    with store.atomic_dir(out) as tmp:
        (tmp / "train_images").mkdir(parents=True)
        (tmp / "test_images").mkdir()
        train_names = _write_images(tmp / "train_images", "train", train_x, keep)
        test_names = _write_images(tmp / "test_images", "test", test_x, np.arange(len(test_y)))
        pd.DataFrame({"image": train_names, "species": SPECIES, "individual_id": ids[train_y[keep]]}).to_csv(
            tmp / "train.csv", index=False)
        pd.DataFrame({"image": test_names, "individual_id": ids[test_y]}).to_csv(tmp / "test.csv", index=False)
        placeholder = " ".join(ids[:5])  # any five class ids: the format the competition layout asks for
        pd.DataFrame({"image": test_names, "predictions": placeholder}).to_csv(
            tmp / "sample_submission.csv", index=False)
        pd.DataFrame({"label": np.arange(len(CLASS_NAMES)), "class_name": CLASS_NAMES, "individual_id": ids,
                      "n_train": counts, "n_test": np.bincount(test_y, minlength=len(CLASS_NAMES))}).to_csv(
            tmp / "classes.csv", index=False)
    return out


def convert(work: Path, shared: Path = SHARED, n_max: int = N_MAX) -> Path:
    """Convert Fashion-MNIST once into ``work/fmnist_lt<n_max>/`` (reused while the source files and the
    parameters are unchanged).

    Args:
        work: the parent folder (``working/bench/classify_fashion`` by default in :func:`main`).
        shared: the shared datasets folder holding ``fashion-mnist/``.
        n_max: images of the head class.
    """
    source = shared / "fashion-mnist"
    digest = hashlib.sha1()
    for name in (*FILES["train"], *FILES["test"]):
        path = source / name
        if not path.is_file():
            raise DataError(f"{path}: file not found (expected the four Fashion-MNIST IDX .gz files)")
        digest.update(f"{name}|{path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    params = {"version": DATA_VERSION, "n_max": int(n_max), "imbalance": IMBALANCE,
              "source": digest.hexdigest()}
    out = work / f"fmnist_lt{n_max}"
    if not store.stage_done(out, params):
        write_competition(source, out, n_max)
        store.mark_done(out, params, train_images=int(sum(long_tail_counts(n_max))), test_images=10_000)
    return out


# ----------------------------------------------------------------------------------------- the variants
# The plain-CE base. 32 px (the 28 px images upsized) and 8 epochs keep a variant at ~1-3 min on the shared
# 2-core CPU; tta_flip is off in the base so that flip TTA is a row of its own.
BASE: dict[str, object] = dict(
    backbone="tf_efficientnet_lite0", pretrained="auto", image_size=32, epochs=8, batch_size=64, lr=1e-3,
    head_lr_mult=10.0, weight_decay=1e-4, warmup_epochs=0.5, n_folds=5, folds="0", tta_flip=False,
    use_crops=False, label_column="individual_id", seed=42, device="auto", num_workers=0)
POSTHOC_TAU = 1.0  # Menon et al.'s default strength
TAIL = ("Sneaker", "Bag", "Ankle_boot")  # the three rarest classes: 17, 10 and 6 images at n_max = 600


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: ``overrides`` on top of :data:`BASE`; ``source`` ``train`` (a run of its own), ``posthoc`` or
    ``tta`` (computed from the plain-CE run's fold-0 arrays or model, no training)."""

    key: str
    label: str
    overrides: dict
    source: str = "train"


# Each trick alone on top of plain CE (not cumulative: logit adjustment, EQL and balanced sampling all correct
# the label prior, and stacking them would correct it twice).
VARIANTS: tuple[Variant, ...] = (
    Variant("ce", "plain CE", {"folds": "all"}),  # every fold: it is the self-distillation teacher
    Variant("ls", "+ label smoothing 0.1", {"label_smoothing": 0.1}),
    Variant("la_posthoc", f"+ logit adjustment, post hoc (tau {POSTHOC_TAU:g})", {}, "posthoc"),
    Variant("la_loss", "+ logit adjustment in the loss (tau 1)", {"la_loss_tau": 1.0}),
    Variant("eql", "+ Softmax EQL (tau 1)", {"loss": "eql", "eql_tau": 1.0}),
    Variant("balanced", "+ class-balanced sampler", {"sampler": "balanced"}),
    Variant("cutmix", "+ CutMix (alpha 1, half the batches)", {"cutmix_alpha": 1.0, "mix_prob": 0.5}),
    Variant("avg", "+ checkpoint averaging (last 3 epochs)", {"avg_last": 3}),
    Variant("distill", "+ self-distillation (plain CE's out-of-fold probabilities, 2:8 soft:hard)",
            {"distill_mode": "mix", "distill_weight": 0.2}),
    Variant("tta", "+ flip TTA", {}, "tta"),
    Variant("arcface", "ArcFace head (s 30, m 0.3)", {"head": "arcface", "arc_s": 30.0, "arc_m": 0.3}),
    Variant("subcenter", "sub-center ArcFace head (k 3, s 30, m 0.3)",
            {"head": "subcenter", "arc_k": 3, "arc_s": 30.0, "arc_m": 0.3}),
    Variant("subcenter_dyn", "sub-center ArcFace (k 3) + count-based margins",
            {"head": "subcenter", "arc_k": 3, "arc_s": 30.0, "dynamic_margin": True}),
)


def exp_name(n_max: int, key: str, cfg) -> str:
    """``bench-fmnist<n_max>-<key>-<hash>``: the hash covers the knobs that change the model."""
    # `folds` is left out: plain CE trained on fold 0 alone is reused when every fold is asked for later.
    knobs = {k: v for k, v in cfg.fingerprint().items() if k not in ("data", "exp", "device", "folds")}
    digest = hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
    return f"bench-fmnist{n_max}-{key}-{digest}"


def build_config(variant: Variant, base: dict, data: Path, n_max: int, teacher: str = "", force: bool = False):
    """The variant's :class:`~common.config.ClassifierConfig` (its ``exp`` named by :func:`exp_name`)."""
    from common.config import ClassifierConfig

    extra = {"distill_from": teacher} if variant.key == "distill" else {}
    cfg = ClassifierConfig(**{**base, **variant.overrides, **extra}, data=str(data), exp="tmp", force=force)
    return dataclasses.replace(cfg, exp=exp_name(n_max, variant.key, cfg))


# ----------------------------------------------------------------------------------------- scoring
def score(y: np.ndarray, scores: np.ndarray, classes: list[str], counts: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy, tail accuracy (mean recall of :data:`TAIL`) and the balanced accuracy
    after post-hoc logit adjustment.

    Args:
        y: true class indices (into ``classes``).
        scores: ``(N, C)`` logits or log-probabilities.
        classes: class names in logit order.
        counts: training images per class (the prior of the post-hoc adjustment).
    """
    from common.lib.losses import class_prior, logit_adjust
    from common.lib.metrics import classification_report

    rep = classification_report(y, scores, len(classes))
    adjusted = logit_adjust(scores, class_prior(counts).numpy(), POSTHOC_TAU)
    rep_adj = classification_report(y, adjusted, len(classes))
    return {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"],
            "tail_accuracy": float(np.mean([r for c in TAIL
                                            if (r := rep["per_class_recall"][classes.index(c)]) is not None]
                                           or [np.nan])),
            "balanced_posthoc": rep_adj["balanced_accuracy"], "per_class_recall": rep["per_class_recall"]}


def log_probs(probs: np.ndarray) -> np.ndarray:
    """``log`` of probabilities, floored so that an underflowed 0 does not become ``-inf``."""
    return np.log(np.maximum(probs.astype(np.float64), 1e-300))


def fold0_scores(exp: str, comp, truth: pd.Series) -> dict[str, object]:
    """The saved fold-0 scores of a finished run: test and fold-0 validation log-probabilities, labels."""
    from common.stages.train_classifier import stage_dir

    folder = stage_dir(exp)
    info = store.read_json(folder / "classes.json")
    test = store.load_arrays(folder / "test.npz", list(comp.test["image"]))
    oof = store.load_arrays(folder / "oof.npz")
    rows = oof["fold"] == 0
    classes = info["classes"]
    return {"classes": classes, "counts": info["counts"],
            "test_y": np.array([classes.index(c) for c in truth.reindex(comp.test["image"])]),
            "test": log_probs(test["probs_fold0"]), "val": log_probs(oof["probs"][rows]),
            "val_y": oof["label"][rows], "val_image": oof["image"][rows]}


def flip_tta_scores(exp: str, comp, val_images: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Test and fold-0 validation logits of ``exp``'s fold-0 model with flip TTA (no retraining)."""
    from common.stages.train_classifier import load_classifier, predict_logits

    model, meta = load_classifier(exp, 0, device)
    args = dict(image_size=meta["config"]["image_size"], mean=meta["mean"], std=meta["std"], batch_size=128,
                tta_flip=True, device=device)
    paths_by_image = dict(zip(comp.train["image"], comp.train["path"], strict=True))
    test = predict_logits(model, list(comp.test["path"]), desc="flip TTA test", **args)
    val = predict_logits(model, [paths_by_image[i] for i in val_images], desc="flip TTA val", **args)
    return test, val


# ----------------------------------------------------------------------------------------- main
def overrides(items: list[str]) -> dict[str, object]:
    """``-p key=value`` strings -> values, checked against ClassifierConfig's fields."""
    from common.config import ClassifierConfig

    return parse_overrides(items, set(ClassifierConfig.field_names()), "a ClassifierConfig field")


def train_row(cfg, comp, truth: pd.Series) -> dict:
    """Train (or reuse) ``cfg`` and score its fold-0 model from the saved arrays."""
    from common.stages.train_classifier import run_classification, stage_dir, training_logs

    folder = stage_dir(cfg.exp)
    trained = not cfg.force and all(store.stage_done(folder / f"fold{k}") for k in cfg.fold_list())
    # A finished call with the very same parameters: read its metrics instead of predicting again.
    if not cfg.force and store.stage_done(folder, cfg.fingerprint()):
        metrics = store.read_json(folder / "metrics.json")
    else:
        metrics = run_classification(cfg, comp)
    s = fold0_scores(cfg.exp, comp, truth)
    result = score(s["test_y"], s["test"], s["classes"], s["counts"])
    check = metrics["test_by_fold"]["0"]["balanced_accuracy"]
    if abs(result["balanced_accuracy"] - check) > 1e-9:  # the arrays and metrics.json must agree
        raise RuntimeError(f"{cfg.exp}: test.npz gives {result['balanced_accuracy']}, metrics.json {check}")
    return {**result, "exp": cfg.exp, "reused": trained, "scores": s,
            "train_s": float(training_logs(cfg.exp, [0])["seconds"].sum()),
            "val": score(s["val_y"], s["val"], s["classes"], s["counts"])}


def run_variants(args, base: dict, root: Path, comp, truth: pd.Series) -> list[dict]:
    """Train (or reuse) each selected variant and score its fold-0 model; one result dict per row, plain CE's
    extra seeds last. Plain CE and its seeds run first: the rows without training are measured on each."""
    from common.core.runtime import resolve_device
    from common.lib.losses import class_prior, logit_adjust

    keys = [v.key for v in VARIANTS] if not args.only else args.only.split(",")
    unknown = sorted(set(keys) - {v.key for v in VARIANTS})
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {[v.key for v in VARIANTS]}")
    seeds = parse_seeds(args.ce_seeds)
    ce_variant = VARIANTS[0]
    if not args.with_teacher_folds:  # every fold of plain CE only when distillation needs them
        ce_variant = dataclasses.replace(ce_variant, overrides={} if "distill" not in keys else {"folds": "all"})
    ce_cfg = build_config(ce_variant, base, root, args.n_max, force=args.force)
    wanted = [ce_variant] + [Variant(f"ce_seed{s}", f"plain CE, seed {s}", {"seed": s}) for s in seeds]
    wanted += [v for v in VARIANTS[1:] if v.key in keys]
    rows, ce_rows = [], []
    for variant in wanted:
        t0 = time.perf_counter()
        if variant.source == "train":
            cfg = (ce_cfg if variant.key == "ce" else
                   build_config(variant, base, root, args.n_max, teacher=ce_cfg.exp, force=args.force))
            print(f"{variant.label}: {cfg.exp}", flush=True)
            row = train_row(cfg, comp, truth)
            if variant.key == "ce" or variant.key.startswith("ce_seed"):
                ce_rows.append(row)
        else:  # no training: plain CE's fold-0 scores, adjusted or re-predicted with the flip, on every seed
            paired = []
            for ce in ce_rows:
                s = ce["scores"]
                if variant.source == "posthoc":
                    prior = class_prior(s["counts"]).numpy()
                    test = logit_adjust(s["test"], prior, POSTHOC_TAU)
                    val = logit_adjust(s["val"], prior, POSTHOC_TAU)
                else:
                    test, val = flip_tta_scores(ce["exp"], comp, s["val_image"], resolve_device(base["device"]))
                result = score(s["test_y"], test, s["classes"], s["counts"])
                paired.append(result["balanced_accuracy"] - ce["balanced_accuracy"])
                if not paired[1:]:  # the row shows the first (seed-42) run
                    row = {**result, "val": score(s["val_y"], val, s["classes"], s["counts"]),
                           "exp": f"{ce['exp']} (fold-0 {'arrays' if variant.source == 'posthoc' else 'model'})",
                           "reused": True, "train_s": 0.0}
            if variant.source == "posthoc":
                row["balanced_posthoc"] = row["val"]["balanced_posthoc"] = float("nan")  # would adjust twice
            row["paired"] = paired
        row.update(key=variant.key, label=variant.label, seconds=time.perf_counter() - t0)
        rows.append(row)
        print(f"  test acc {row['accuracy']:.4f}, balanced {row['balanced_accuracy']:.4f}, tail "
              f"{row['tail_accuracy']:.4f}; {row['seconds']:.0f} s", flush=True)
    order = {v.key: i for i, v in enumerate(VARIANTS)}
    return sorted(rows, key=lambda r: order.get(r["key"], len(order)))  # stable: the seeds stay in order


def verdict(row: dict, ref: float, band: float) -> str:
    """Does ``row`` beat plain CE's balanced accuracy ``ref``?

    Rows without training carry ``paired``: their change measured on every plain-CE seed's own model
    (``yes``/``NO`` when all agree, else ``mixed``). Trained rows are one run: ``within seed noise`` when the
    change is at most ``band`` (the spread of plain CE over seeds), else ``yes``/``NO``.
    """
    if row["key"] == "ce" or row["key"].startswith("ce_seed"):
        return "-"
    if "paired" in row:
        deltas = ", ".join(f"{100 * d:+.1f}" for d in row["paired"])
        n = len(row["paired"])
        if all(d > 0 for d in row["paired"]):
            return f"yes on {'all ' if n > 1 else ''}{n} seed{'s' * (n > 1)} ({deltas} pts)"
        if all(d < 0 for d in row["paired"]):
            return f"NO on {'all ' if n > 1 else ''}{n} seed{'s' * (n > 1)} ({deltas} pts)"
        return f"mixed over {n} seeds ({deltas} pts)"
    delta = row["balanced_accuracy"] - ref
    if abs(delta) <= band:
        return f"within seed noise ({100 * delta:+.1f} pts)"
    return f"{'yes' if delta > 0 else 'NO'} ({100 * delta:+.1f} pts)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-max", type=int, default=N_MAX, help="images of the head class (T-shirt/top)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared datasets folder")
    ap.add_argument("--work", type=Path, default=None,
                    help="where converted data go (default working/bench/classify_fashion)")
    ap.add_argument("--convert-only", action="store_true", help="write the data set and stop")
    add_param_arg(ap, "override a ClassifierConfig field of the plain-CE base (repeatable)")
    ap.add_argument("--only", default="", metavar="K1,K2",
                    help=f"run only these variants (plain CE always runs); keys: {[v.key for v in VARIANTS]}")
    ap.add_argument("--ce-seeds", default="", metavar="S1,S2",
                    help="also train plain CE with these seeds: their spread is the 'seed noise' band")
    ap.add_argument("--with-teacher-folds", action="store_true",
                    help="train every fold of plain CE even without the distillation row")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: 1 on machines with <= 2 CPUs, where 1 thread trained 4x faster "
                         "than 2 under load, else torch's default)")
    ap.add_argument("--force", action="store_true", help="retrain even if a run with these knobs exists")
    add_record_args(ap)
    args = ap.parse_args(argv)

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    work = args.work or paths.working_dir() / "bench" / "classify_fashion"
    root = convert(work, args.shared, args.n_max)
    print(f"data: {root}", flush=True)
    if args.convert_only:
        return {"root": root}

    import torch

    from bench._report import torch_machine_line, utc_stamp
    from common.core.runtime import resolve_device
    from common.data.competition import load_competition

    threads = args.threads or (1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads())
    torch.set_num_threads(threads)
    base = {**BASE, **overrides(args.param)}
    comp = load_competition(root, check_pixels=False)
    truth = pd.read_csv(root / "test.csv", dtype=str).set_index("image")["individual_id"]
    rows = run_variants(args, base, root, comp, truth)

    seeds = [r for r in rows if r["key"] == "ce" or r["key"].startswith("ce_seed")]
    ref = rows[0]["balanced_accuracy"]
    bal = np.array([r["balanced_accuracy"] for r in seeds])
    band = float(bal.max() - bal.min())
    seed_names = [str(s) for s in [base["seed"], *parse_seeds(args.ce_seeds)]]
    total = time.perf_counter() - t_start
    command = command_line("classify_fashion", argv)
    knobs = ", ".join(f"{k}={v}" for k, v in base.items() if k not in ("device", "num_workers", "label_column"))
    counts = long_tail_counts(args.n_max)
    n_fit = int(len(comp.train) * (base["n_folds"] - 1) / base["n_folds"])
    lines = [
        "", f"## Long-tailed Fashion-MNIST (imbalance {IMBALANCE:g}, n_max {args.n_max}): classifier tricks", "",
        f"- command: `{command.strip()}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {torch_machine_line(resolve_device(base['device']).type, load)}",
        f"- data: ../shared/datasets/fashion-mnist; training set = the first n_c images of class c in file "
        f"order, n_c = round({args.n_max} * 100^(-c/9)) = {counts} ({sum(counts)} images; tail = "
        f"{', '.join(TAIL)}: {counts[7]}, {counts[8]}, {counts[9]}); test = all 10,000 test images, "
        "1,000 per class (so test accuracy = balanced accuracy)",
        f"- protocol: each row trains fold 0 of {base['n_folds']} (`common.stages.train_classifier.run_classification`, folds "
        f"stratified by class, seed {base['seed']}: ~{n_fit} training images; plain CE trains every fold when "
        "the self-distillation row runs, as its teacher) and scores the fold-0 model on the test set; "
        "'val' = fold 0's held-out fifth of the long-tailed set (few tail images: noisy; not clean for the "
        "self-distillation row, whose teacher's other fold models trained on it); post-hoc logit adjustment "
        f"(tau {POSTHOC_TAU:g}, prior = training counts) and flip TTA rescore the plain-CE runs, no training",
        f"- base config (plain CE): {knobs}; torch threads {threads}",
        f"- seed noise: plain CE test balanced accuracy with seeds {', '.join(seed_names)}: "
        f"{', '.join(f'{b:.4f}' for b in bal)} (mean {bal.mean():.4f}, "
        f"spread {100 * band:.1f} pts; a seed changes the fold split and the training draws). A trained row "
        "is one run with the plain-CE row's split and seed: 'helps' calls a change no larger than that spread "
        "'within seed noise'. The rows without training are measured on every plain-CE seed's model, paired",
        f"- wall time of this call {total:.0f} s", "",
        f"| variant | test acc | test balanced acc | x plain CE (seed {base['seed']}) | tail acc (3 rarest) | balanced acc + post-hoc LA "
        "| val acc / balanced (long-tailed) | training s | helps balanced acc? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        posthoc = "-" if np.isnan(r["balanced_posthoc"]) else f"{r['balanced_posthoc']:.4f}"
        train_s = f"{r['train_s']:.0f}" + (" (earlier call)" if r["reused"] and r["train_s"] else "")
        lines.append(f"| {r['label']} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | "
                     f"{r['balanced_accuracy'] / ref:.3f} | {r['tail_accuracy']:.4f} | {posthoc} | "
                     f"{r['val']['accuracy']:.3f} / {r['val']['balanced_accuracy']:.3f} | {train_s} | "
                     f"{verdict(r, ref, band)} |")
    finish(args, "\n".join(lines) + "\n")
    return {"rows": rows, "total_s": total, "root": root}


if __name__ == "__main__":
    main()
