"""Benchmark: the suite's own embedder, trained on some individuals, scored on individuals it never saw.

Two real data sets from ``../shared/datasets`` (see its README; never copied into the repository):

* ``lion``: train on ``lion/train`` (75 lions, 594 images), score ``lion/val`` (19 other lions, 146 images);
* ``omniglot``: train on ``images_background_small1.zip`` (136 characters x 20 drawers), score the 106
  characters of ``images_background_small2.zip`` that small1 does not hold (x 20 drawers; small2 has 156
  characters, but its Greek and Latin alphabets, 50 characters, are byte-identical copies of small1's);
  an individual = alphabet + character.

The score is leave-one-out MAP@5 among the unseen individuals (:func:`common.lib.retrieval.leave_one_out_map5`):
each unseen image queries all the other unseen images. Everything goes through the library:

1. the data set is converted once into the competition layout (:func:`convert`) under
   ``working/bench/embedder_reid/<dataset>/``: ``train.csv`` lists every image, ``splits.csv`` says which
   images are for fitting (``fit``) and which belong to the unseen individuals (``eval``); ``test_images/`` is
   empty;
2. :func:`common.data.competition.load_competition` validates it;
3. the fold table (``prepare_folds``' schema) puts the unseen individuals in fold 0 and every training image
   in fold 1, so :func:`common.engine.embedder.train_fold` on fold 0 fits on *all* training individuals and never sees
   an unseen one (its "known individuals" validation is empty, so ``valid_loss`` is NaN);
4. :func:`common.engine.embedder.load_embedder` + :func:`common.stages.extract_embeddings.extract` embed the unseen images;
5. :func:`common.lib.retrieval.leave_one_out_map5` scores them.

Baselines through the same path: ``epochs=0`` (ImageNet backbone + GeM + a random, untrained neck) and the raw
ImageNet features (the backbone's feature maps average-pooled, no neck), which is what the datasets README's
0.265 (lion) and 0.54 (Omniglot) measure; the raw features are scored at the training size and at 224 px.
The ratio printed is trained / the best of those untrained figures.

Run from the repository root (each run trains one model; ``--record`` appends a section to bench/RESULTS.md):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.embedder_reid --dataset lion --record
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.embedder_reid --dataset omniglot --record

Any :class:`~common.config.EmbedderConfig` field, ``tta_flip`` and ``eval_size`` (the size the unseen images
are embedded at; 0 = the training size) can be overridden with ``-p key=value``,
e.g. ``-p epochs=3``. Models live in ``working/bench-<dataset>-<hash of the knobs>/``; a model already trained
with the same knobs is reused (its training time is then read from its ``log.csv``, and the table says so);
``--force`` retrains.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench._report import torch_machine_line, utc_stamp  # noqa: E402
from bench.common_args import (  # noqa: E402
    SHARED,
    add_param_arg,
    add_record_args,
    command_line,
    finish,
    parse_overrides,
    parse_seeds,
)
from common.config import EmbedderConfig  # noqa: E402
from common.core import paths, store  # noqa: E402
from common.data.competition import DataError, load_competition  # noqa: E402

DATA_VERSION = 1  # bump when the converted layout changes: converted folders are rebuilt

# The benchmark's settings per data set, chosen from a few runs on the 2-core CPU machine (bench/RESULTS.md).
PRESETS: dict[str, dict[str, object]] = {
    "lion": dict(image_size=160, epochs=16, batch_size=32, lr=5e-4, head_lr_mult=10.0, warmup_epochs=1.0,
                 arc_s=30.0, arc_m=0.3, arc_k=3, tta_flip=True),
    "omniglot": dict(image_size=64, epochs=8, batch_size=32, lr=1e-3, head_lr_mult=10.0, warmup_epochs=0.5,
                     arc_s=30.0, arc_m=0.3, tta_flip=True),
}
RAW_IMAGENET_SIZE = 224  # the raw-feature baseline is also scored at ImageNet's own input size
# Not EmbedderConfig fields: how the unseen images are embedded.
EXTRACT_KEYS = ("tta_flip", "eval_size")


# ----------------------------------------------------------------------------------------- data sets
def list_lion(root: Path) -> pd.DataFrame:
    """One row per lion image: ``source, image, individual_id, species, split`` (``fit`` or ``eval``).

    Args:
        root: the ``lion`` folder holding ``train/<lion>/<file>.png`` and ``val/<lion>/<file>.png``.
    """
    rows = []
    for folder, split in (("train", "fit"), ("val", "eval")):
        base = root / folder
        if not base.is_dir():
            raise DataError(f"{base}: folder not found (expected {root}/{{train,val}}/<lion>/<file>.png)")
        for lion in sorted(p for p in base.iterdir() if p.is_dir()):
            for file in sorted(lion.glob("*.png")):
                rows.append({"source": str(file), "image": f"{lion.name}__{file.name}",
                             "individual_id": lion.name, "species": "lion", "split": split})
    table = pd.DataFrame(rows, columns=["source", "image", "individual_id", "species", "split"])
    _check_disjoint(table, root)
    return table


def list_omniglot(fit_zip: Path, eval_zip: Path) -> pd.DataFrame:
    """One row per Omniglot image: ``source`` (``<zip>::<member>``), ``image``, ``individual_id``
    (``<alphabet>__<character>``), ``species`` (the alphabet), ``split`` (``fit`` or ``eval``).

    Args:
        fit_zip: ``images_background_small1.zip`` (training characters).
        eval_zip: ``images_background_small2.zip`` (unseen characters).
    """
    rows = []
    for zpath, split in ((fit_zip, "fit"), (eval_zip, "eval")):
        if not zpath.is_file():
            raise DataError(f"{zpath}: zip file not found")
        with zipfile.ZipFile(zpath) as zf:
            for member in sorted(n for n in zf.namelist() if n.lower().endswith(".png")):
                parts = member.split("/")
                if len(parts) < 3:
                    raise DataError(f"{zpath}: member {member!r} is not <alphabet>/<character>/<file>.png")
                alphabet, character, file = parts[-3:]
                individual = f"{alphabet}__{character}"
                rows.append({"source": f"{zpath}::{member}", "image": f"{individual}__{file}",
                             "individual_id": individual, "species": alphabet, "split": split})
    table = pd.DataFrame(rows, columns=["source", "image", "individual_id", "species", "split"])
    # small2 repeats two of small1's alphabets (Greek, Latin: 50 characters, 1,000 byte-identical files):
    # those characters are not unseen, so they leave the scored part: 106 remain, as the datasets README says.
    seen = set(table.loc[table["split"] == "fit", "individual_id"])
    table = table[~((table["split"] == "eval") & table["individual_id"].isin(seen))].reset_index(drop=True)
    _check_disjoint(table, fit_zip.parent)
    return table


def _check_disjoint(table: pd.DataFrame, where: Path) -> None:
    if table.empty:
        raise DataError(f"{where}: no images found")
    dup = table["image"].duplicated()
    if dup.any():
        raise DataError(f"{where}: image id {table['image'][dup].iloc[0]!r} occurs twice")
    shared = set(table.loc[table["split"] == "fit", "individual_id"]) & set(
        table.loc[table["split"] == "eval", "individual_id"])
    if shared:
        raise DataError(f"{where}: individuals both in the training and the unseen part: "
                        f"{sorted(shared)[:5]}")


def list_dataset(dataset: str, shared: Path = SHARED) -> pd.DataFrame:
    """The image table of ``dataset`` (``lion`` or ``omniglot``), read from ``shared``."""
    if dataset == "lion":
        return list_lion(shared / "lion")
    if dataset == "omniglot":
        folder = shared / "omniglot"
        return list_omniglot(folder / "images_background_small1.zip", folder / "images_background_small2.zip")
    raise ValueError(f"unknown dataset {dataset!r}: use 'lion' or 'omniglot'")


def write_competition(table: pd.DataFrame, out: Path) -> Path:
    """Write ``table`` (from :func:`list_dataset`) as a competition folder, atomically (built beside ``out``,
    then renamed): ``train_images/``, ``train.csv`` (every image), ``splits.csv`` (``image, split``) and an
    empty ``test_images/``.

    Args:
        table: rows with ``source`` (a file, or ``<zip>::<member>``), ``image``, ``individual_id``,
            ``species``, ``split``.
        out: the competition folder to create (replaced if it exists).
    """
    with store.atomic_dir(out) as tmp:
        (tmp / "train_images").mkdir(parents=True)
        (tmp / "test_images").mkdir()
        zips: dict[str, zipfile.ZipFile] = {}
        try:
            for source, image in zip(table["source"], table["image"], strict=True):
                target = tmp / "train_images" / image
                if "::" in source:
                    zpath, member = source.split("::", 1)
                    if zpath not in zips:  # read each zip into memory once: member by member from the shared
                        # mount took ~40 ms a file (200 s for Omniglot); from memory the whole set takes ~1 s
                        zips[zpath] = zipfile.ZipFile(io.BytesIO(Path(zpath).read_bytes()))
                    zf = zips[zpath]
                    target.write_bytes(zf.read(member))
                else:
                    shutil.copyfile(source, target)
        finally:
            for zf in zips.values():
                zf.close()
        table[["image", "species", "individual_id"]].to_csv(tmp / "train.csv", index=False)
        table[["image", "split"]].to_csv(tmp / "splits.csv", index=False)
    return out


def convert(dataset: str, work: Path, shared: Path = SHARED) -> Path:
    """Convert ``dataset`` once into ``work/<dataset>/`` (reused while the source listing is unchanged)."""
    table = list_dataset(dataset, shared)
    params = {"version": DATA_VERSION,
              "listing": hashlib.sha1("\n".join(table["source"] + "|" + table["image"]).encode()).hexdigest()}
    out = work / dataset
    if not store.stage_done(out, params):
        write_competition(table, out)
        store.mark_done(out, params, images=len(table))
    return out


def fold_table(comp, splits: pd.DataFrame) -> pd.DataFrame:
    """``prepare_folds``' table (``image, individual_id, species, fold``): fold 0 = unseen, fold 1 = training.

    Args:
        comp: the loaded :class:`~common.data.competition.Competition`.
        splits: ``image, split`` from ``splits.csv``.
    """
    table = comp.train[["image", "individual_id", "species"]].merge(
        splits, on="image", how="left", validate="one_to_one")
    bad = ~table["split"].isin(["fit", "eval"])
    if bad.any():
        raise DataError(f"{comp.root / 'splits.csv'}: image {table['image'][bad].iloc[0]!r} "
                        "has no fit/eval split")
    return table.assign(fold=np.where(table["split"] == "eval", 0, 1)).drop(columns="split")


# ----------------------------------------------------------------------------------------- scoring
class PooledBackbone:
    """The raw ImageNet features: a backbone's feature maps average-pooled (``embed`` for ``extract``)."""

    def __init__(self, backbone) -> None:
        self.backbone = backbone
        self.embedding_dim = 0

    def to(self, device):
        self.backbone.to(device)
        return self

    def eval(self):
        self.backbone.eval()
        return self

    def embed(self, x):
        return self.backbone(x).mean(dim=(2, 3))


def score(model, files: list[str], labels: list[str], image_size: int, mean, std, tta_flip: bool,
          device: str = "auto") -> tuple[float, np.ndarray]:
    """Embed ``files`` with :func:`common.stages.extract_embeddings.extract`; return the leave-one-out MAP@5, the embeddings."""
    from common.core.runtime import resolve_device
    from common.lib.retrieval import leave_one_out_map5
    from common.stages.extract_embeddings import extract

    emb = extract(model, files, image_size, list(mean), list(std), batch_size=64, tta_flip=tta_flip,
                  device=resolve_device(device), desc="embed unseen")
    return leave_one_out_map5(emb, labels, k=5), emb


def train_and_score(cfg: EmbedderConfig, comp, folds: pd.DataFrame, evalset: pd.DataFrame,
                    tta_flip: bool, eval_size: int = 0) -> dict[str, object]:
    """Train (or reuse) fold 0 of ``cfg`` with :func:`common.engine.embedder.train_fold`, then score the unseen images.

    Returns:
        ``map5``, ``train_s`` (sum of the epochs' seconds in ``log.csv``), ``reused`` (trained by an earlier
        call), ``embed_s``, ``train_acc`` (last epoch's training accuracy, margin applied).
    """
    from common.core.runtime import resolve_device
    from common.engine.embedder import fold_dir, load_embedder, train_fold

    reused = not cfg.force and (fold_dir(cfg.exp, 0) / "_done.json").exists()
    t0 = time.perf_counter()
    log = train_fold(cfg, comp, folds, 0)
    fresh_s = time.perf_counter() - t0
    model, meta = load_embedder(cfg.exp, 0, resolve_device(cfg.device))
    t1 = time.perf_counter()
    size = eval_size or cfg.image_size
    map5, emb = score(model, list(evalset["path"]), list(evalset["individual_id"]), size, meta["mean"],
                      meta["std"], tta_flip, cfg.device)
    return {"map5": map5, "emb": emb, "reused": reused,
            "train_s": float(log["seconds"].sum()) if len(log) else fresh_s,
            "embed_s": time.perf_counter() - t1,
            "train_acc": float(log["train_acc"].iloc[-1]) if len(log) else float("nan")}


def exp_name(dataset: str, cfg: EmbedderConfig) -> str:
    """``bench-<dataset>-<hash>``: the hash covers the knobs that change the model (not paths, device or
    how the unseen images are embedded)."""
    knobs = {k: v for k, v in cfg.fingerprint().items() if k not in ("data", "exp", "device")}
    digest = hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
    return f"bench-{dataset}-{digest}"


# ----------------------------------------------------------------------------------------- main
def overrides(items: list[str]) -> dict[str, object]:
    """``-p key=value`` strings -> values, checked against EmbedderConfig's fields and the extraction keys."""
    known = set(EmbedderConfig.field_names()) | set(EXTRACT_KEYS)
    return parse_overrides(items, known, f"one of {sorted(known)}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(PRESETS), required=True)
    add_param_arg(ap, "override an EmbedderConfig field, tta_flip or eval_size (repeatable)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared datasets folder")
    ap.add_argument("--work", type=Path, default=None,
                    help="where converted data go (default working/bench/embedder_reid)")
    ap.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="train one model per seed and report each and their mean (default: the one seed)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the untrained baselines")
    ap.add_argument("--force", action="store_true", help="retrain even if a model with these knobs exists")
    add_record_args(ap)
    args = ap.parse_args(argv)

    from common.core.runtime import resolve_device

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    settings = {**PRESETS[args.dataset], **overrides(args.param)}
    tta_flip = bool(settings.pop("tta_flip"))
    eval_size = int(settings.pop("eval_size", 0)) or int(settings["image_size"])
    work = args.work or paths.working_dir() / "bench" / "embedder_reid"
    root = convert(args.dataset, work, args.shared)
    comp = load_competition(root, check_pixels=False)
    splits = pd.read_csv(root / "splits.csv", dtype=str)
    folds = fold_table(comp, splits)
    evalset = comp.train[folds["fold"].to_numpy() == 0].reset_index(drop=True)
    print(f"{args.dataset}: {int((folds['fold'] == 1).sum())} training images of "
          f"{folds.loc[folds['fold'] == 1, 'individual_id'].nunique()} individuals; "
          f"{len(evalset)} unseen images of {evalset['individual_id'].nunique()} individuals", flush=True)

    base = {"seed": 42, "device": "auto", "num_workers": 0, **settings}  # -p may override these three
    cfg = EmbedderConfig(**base, data=str(root), exp="tmp", n_folds=2, folds="0", use_crops=False,
                         force=args.force)
    cfg = dataclasses.replace(cfg, exp=exp_name(args.dataset, cfg))
    rows = []
    if not args.no_baseline:
        from common.lib.models import backbone_normalization, create_backbone

        mean, std = backbone_normalization(cfg.backbone, cfg.pretrained)
        raw = PooledBackbone(create_backbone(cfg.backbone, cfg.pretrained))
        for size in sorted({cfg.image_size, eval_size, RAW_IMAGENET_SIZE}):
            t0 = time.perf_counter()
            raw_map, _ = score(raw, list(evalset["path"]), list(evalset["individual_id"]), size, mean, std,
                               tta_flip, cfg.device)
            rows.append({"model": f"raw ImageNet features at {size} px (average-pooled backbone)",
                         "map5": raw_map, "train_s": 0.0, "reused": False,
                         "embed_s": time.perf_counter() - t0, "train_acc": float("nan")})
            print(f"raw ImageNet features at {size} px: MAP@5 {raw_map:.4f}", flush=True)
        zero = dataclasses.replace(cfg, epochs=0)
        zero = dataclasses.replace(zero, exp=exp_name(args.dataset, zero))
        r = train_and_score(zero, comp, folds, evalset, tta_flip, eval_size)
        rows.append({"model": f"epochs=0, embedded at {eval_size} px (ImageNet backbone, GeM, random neck)",
                     **r})
        print(f"epochs=0: MAP@5 {r['map5']:.4f}", flush=True)
    n_untrained = len(rows)
    seeds = parse_seeds(args.seeds) or [cfg.seed]
    for seed in seeds:  # one model per seed: the unseen sets are small, so one seed's figure is noisy
        cfg_s = dataclasses.replace(cfg, seed=seed)
        cfg_s = dataclasses.replace(cfg_s, exp=exp_name(args.dataset, cfg_s))
        r = train_and_score(cfg_s, comp, folds, evalset, tta_flip, eval_size)
        rows.append({"model": f"trained, seed {seed}: {cfg.epochs} epochs at {cfg.image_size} px, embedded "
                              f"at {eval_size} px ({cfg_s.exp})", **r})
        print(f"trained, seed {seed} ({cfg.epochs} epochs, {r['train_s']:.0f} s training, last train acc "
              f"{r['train_acc']:.3f}): MAP@5 {r['map5']:.4f}", flush=True)
    trained = np.array([row["map5"] for row in rows[n_untrained:]])
    if len(seeds) > 1:
        from common.lib.retrieval import concat_embeddings, leave_one_out_map5

        nan = float("nan")
        rows.append({"model": f"trained, mean +- sd over the {len(seeds)} seeds",
                     "map5": float(trained.mean()), "sd": float(trained.std(ddof=1)),
                     "train_s": nan, "reused": False, "embed_s": nan, "train_acc": nan})
        # The seeds as an ensemble, the way stage 04's fold_merge=concat combines fold models.
        ensemble = concat_embeddings([row["emb"] for row in rows[n_untrained:n_untrained + len(seeds)]])
        rows.append({"model": f"ensemble of the {len(seeds)} seeds (`concat_embeddings`: {len(seeds)}x the "
                              "training and embedding cost)",
                     "map5": leave_one_out_map5(ensemble, list(evalset["individual_id"]), k=5),
                     "train_s": nan, "reused": False, "embed_s": nan, "train_acc": nan})
    # The ratio is taken against the best untrained figure (raw features at either size, or epochs=0).
    ref = max((row["map5"] for row in rows[:n_untrained]), default=None)
    total = time.perf_counter() - t_start

    command = command_line("embedder_reid", argv)
    names = ("backbone", "pretrained", "image_size", "epochs", "batch_size", "lr", "head_lr_mult",
             "weight_decay", "warmup_epochs", "embedding_dim", "gem_p", "dropout", "arc_s", "arc_m", "arc_k",
             "dynamic_margin", "label_smoothing", "species_weight")
    knobs = ", ".join(f"{k}={getattr(cfg, k)}" for k in names)
    desc = {"lion": "train on lion/train (75 lions, 594 images), score lion/val (19 unseen lions, "
                    "146 images)",
            "omniglot": "train on Omniglot images_background_small1 (136 characters x 20), score the 106 "
                        "characters of small2 not in small1 (x 20)"}[args.dataset]
    lines = [
        "", f"## Embedder re-identification on unseen individuals: {args.dataset}", "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {torch_machine_line(resolve_device(cfg.device).type, load)}",
        f"- data: {desc}; metric: leave-one-out MAP@5 among the unseen images "
        f"(`common.lib.retrieval.leave_one_out_map5`), flip TTA {'on' if tta_flip else 'off'}, unseen images "
        f"embedded at {eval_size} px",
        f"- config: {knobs}; seed(s) {', '.join(map(str, seeds))}",
        "- path: `load_competition` -> `train_fold` (fold 0 = the unseen individuals, so every training "
        "image is fitted) -> `load_embedder` -> `extract` -> `leave_one_out_map5`",
        f"- wall time of this call {total:.0f} s", "",
        "| model | MAP@5 | x best untrained | training s | last-epoch train acc | embedding s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['map5'] / ref:.2f}" if ref else "-"
        map5 = f"{row['map5']:.4f}" + (f" +- {row['sd']:.4f}" if "sd" in row else "")
        train_s = "-" if np.isnan(row["train_s"]) else f"{row['train_s']:.0f}"
        train_s += " (earlier call, from log.csv)" if row["reused"] else ""
        acc = "-" if np.isnan(row["train_acc"]) else f"{row['train_acc']:.3f}"
        embed_s = "-" if np.isnan(row["embed_s"]) else f"{row['embed_s']:.0f}"
        lines.append(f"| {row['model']} | {map5} | {ratio} | {train_s} | {acc} | {embed_s} |")
    text = "\n".join(lines) + "\n"
    finish(args, text)
    if ref:
        print(f"ratio trained (mean over seeds) / best untrained: {trained.mean() / ref:.2f}")
    return {"rows": rows, "total_s": total}


if __name__ == "__main__":
    main()
