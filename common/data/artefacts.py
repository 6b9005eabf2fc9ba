"""What one stage leaves for the next, read by later stages: stage 01's crops, the fold tables of stages 02 and
05, stage 03's embeddings (paths and readers; the formats are :mod:`common.core.store`'s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ClassifierConfig, EmbedderConfig
from common.core import paths, store
from common.data.competition import (
    Competition,
    DataError,
    make_folds,
    split_fold,
)


def crops_dir(exp: str, split: str = "") -> Path:
    """Where stage 01 writes crops: ``working/<exp>/01_crop/crops/{train,test}/<image>``.

    With ``split``, the ``crops/<split>`` folder to read: this run's own, else an attached Kaggle source's
    (:func:`common.core.paths.find_stage_dir`), else the local path (whose absence the caller reports).
    """
    if split:
        try:
            return paths.find_stage_dir(exp, "01", f"crops/{split}") / "crops" / split
        except paths.MissingStageError:
            pass
    return paths.stage_dir(exp, "01") / "crops" / split if split else paths.stage_dir(exp, "01") / "crops"


def crops_available(exp: str) -> bool:
    """True when stage 01 finished and wrote crops (it may have run with ``crop=False``)."""
    return store.stage_done(paths.stage_dir(exp, "01")) and (crops_dir(exp) / "train").is_dir()


def image_paths(table: pd.DataFrame, exp: str, split: str, use_crops: bool) -> list[str]:
    """Paths to train or test images: stage 01's crops when ``use_crops``, else the full images.

    Args:
        table: rows with ``image`` and ``path`` (the full image).
        exp: experiment name.
        split: ``train`` or ``test``.
        use_crops: read crops (the caller decides with :func:`crops_available`).
    """
    if not use_crops:
        return list(table["path"])
    crops = [crops_dir(exp, split) / name for name in table["image"]]
    missing = [c for c in crops if not c.exists()]
    if missing:
        raise DataError(f"{missing[0]}: crop missing ({len(missing)} in all); rerun stage 01 with force=True")
    return [str(c) for c in crops]


def fold_split(cfg: EmbedderConfig | ClassifierConfig, comp: Competition, folds: pd.DataFrame, fold: int
               ) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """A fold's training and validation rows with a ``path`` column (stage 01's crops when ``cfg.use_crops``
    and they exist, else the full images), and whether crops were used. Shared by stages 02 and 05.

    When the fold table has a ``new_fold`` column (stage 02's open-set validation), the individuals treated as
    new in ``fold`` are left out of its training part: the fold's model never sees them, as the test's new
    individuals are never seen. Their validation images stay. ``fold == n_folds`` with ``full_fit`` is the model
    on every training image.

    Args:
        cfg: a config with ``exp`` and ``use_crops`` (:class:`~common.config.EmbedderConfig` or
            :class:`~common.config.ClassifierConfig`).
        comp: the validated competition.
        folds: a fold table with ``image`` and ``fold``.
        fold: the validation fold.
    """
    table = folds.merge(comp.train[["image", "path"]], on="image", how="left", validate="one_to_one")
    used_crops = cfg.use_crops and crops_available(cfg.exp)
    table = table.assign(path=image_paths(table, cfg.exp, "train", used_crops))
    if getattr(cfg, "full_fit", False) and fold == cfg.n_folds:
        # the full model (FullFitField): every image trains; the first fold's validation part is kept only to
        # monitor the loss, and is seen in training (so its figures are optimistic)
        _, valid = split_fold(table, table["fold"].to_numpy(), cfg.fold_list()[0])
        return table.reset_index(drop=True), valid, used_crops
    fit, valid = split_fold(table, table["fold"].to_numpy(), fold)
    if "new_fold" in fit.columns:
        fit = fit[fit["new_fold"] != fold].reset_index(drop=True)
    return fit, valid, used_crops


def assign_folds(table: pd.DataFrame, label_column: str, cfg: EmbedderConfig | ClassifierConfig) -> pd.DataFrame:
    """``table`` with a ``fold`` column stratified by ``label_column`` and a fresh index: the fold table of stages
    02 and 05. Capped first at ``cfg.max_images`` rows (drawn with ``cfg.split_seed()``, kept in file order); checks that
    every requested fold has training and validation images, before any training starts.

    Args:
        table: one row per training image.
        label_column: the column the folds are stratified by (``individual_id``, ``label``).
        cfg: ``max_images``, ``seed`` / ``fold_seed``, ``n_folds`` and the requested folds.
    """
    seed = cfg.split_seed()
    if cfg.max_images and len(table) > cfg.max_images:
        table = table.sample(n=cfg.max_images, random_state=seed).sort_index()
    table = table.assign(fold=make_folds(table[label_column], cfg.n_folds, seed)).reset_index(drop=True)
    for k in cfg.fold_list():
        split_fold(table, table["fold"].to_numpy(), k)
    return table


def read_folds(exp: str, stage: str = "02") -> pd.DataFrame:
    """Read the ``folds.csv`` of stage ``stage`` (``02``: ``image, individual_id, species, fold``, written by
    :func:`common.stages.train_embedder.prepare_folds`; ``05``: ``image, label, fold``, written by
    :func:`common.engine.classifier.prepare_folds`): every column text but the integers ``fold`` and, in stage
    02's table, ``new_fold`` (the fold that treats the image's individual as new; -1: none)."""
    hint = {"02": "run stage 02 (train embedder) first", "05": "run stage 05 (classifier) first"}.get(stage, "")
    path = paths.find_stage_dir(exp, stage, "folds.csv", hint=hint) / "folds.csv"
    table = pd.read_csv(path, dtype=str)
    return table.astype({c: "int64" for c in ("fold", "new_fold") if c in table.columns})


def embeddings_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/03_embeddings/fold{fold}``."""
    return paths.stage_dir(exp, "03") / f"fold{fold}"


def _embeddings_file(exp: str, fold: int, split: str = "train") -> Path:
    need = f"fold{fold}/{split}.npz"
    try:
        return paths.find_stage_dir(exp, "03", need, hint="run stage 03 first") / need
    except paths.MissingStageError:
        if paths.on_kaggle():  # the error says which dataset to attach
            raise
        return embeddings_dir(exp, fold) / f"{split}.npz"  # store.load_arrays names the missing file


def load_fold_embeddings(exp: str, fold: int, split: str, images: list[str] | pd.Series) -> np.ndarray:
    """Read one fold's embeddings, checking their rows are ``images`` in this order.

    The file is read from ``working/<exp>/03_embeddings`` or, failing that, from an attached Kaggle source
    that holds ``<exp>/03_embeddings`` (:func:`common.core.paths.find_stage_dir`).
    """
    return store.load_arrays(_embeddings_file(exp, fold, split), list(images))["embeddings"]
