"""Stage 02 (notebook ``02_train_embedder``): the fold table, every requested fold trained by the engine
(:mod:`common.engine.embedder`), and the per-fold summary the notebook shows."""

from __future__ import annotations

import pandas as pd

from common.config import EmbedderConfig
from common.core import distributed, paths, store
from common.data.artefacts import assign_folds
from common.data.competition import Competition, DataError, split_fold
from common.data.fingerprint import stage_fingerprint
from common.engine import launch
from common.engine.embedder import fold_dir, train_fold
from common.lib.openset import choose_new_individuals


def prepare_folds(cfg: EmbedderConfig, comp: Competition) -> pd.DataFrame:
    """Fold table ``image, individual_id, species, fold, new_fold`` (written to ``02_embedder/folds.csv``).

    ``new_fold`` is the fold in which the image's individual is treated as new (-1: none), chosen with
    :func:`common.lib.openset.choose_new_individuals` so that about ``oof_new_share`` of each fold's images
    are of individuals that fold's model never sees: :func:`common.data.artefacts.fold_split` leaves them out
    of its training, and stage 04 out of its gallery. Validates that every requested fold has training and
    validation images before any training starts.
    """
    table = assign_folds(comp.train[["image", "individual_id", "species"]], "individual_id", cfg)
    table["new_fold"] = choose_new_individuals(table["individual_id"], table["fold"].to_numpy(), cfg.oof_new_share,
                                               cfg.split_seed())
    for k in cfg.fold_list():
        fit, _ = split_fold(table, table["fold"].to_numpy(), k)
        if fit[fit["new_fold"] != k].empty:
            raise DataError(f"fold {k}: every training image belongs to an individual treated as new; "
                            f"lower oof_new_share={cfg.oof_new_share}")
    store.write_csv(paths.stage_dir(cfg.exp, "02") / "folds.csv", table)
    return table


def run_training(cfg: EmbedderConfig, comp: Competition, folds: pd.DataFrame) -> pd.DataFrame:
    """Train every requested fold, then the full model when ``full_fit`` (fold ``n_folds``); returns all logs
    stacked with a ``fold`` column.

    With ``cfg.nproc > 1`` (and not already inside torchrun) the folds are trained by ``nproc`` processes
    started with torchrun (:func:`common.engine.launch.launch`); this process then reads their finished logs.
    """
    cfg = launch.train_elsewhere("02", cfg, paths.stage_dir(cfg.exp, "02"))
    logs = [train_fold(cfg, comp, folds, k).assign(fold=k) for k in cfg.model_folds()]
    if distributed.launch_info().is_main:
        store.mark_done(paths.stage_dir(cfg.exp, "02"), stage_fingerprint(cfg))
    return pd.concat(logs, ignore_index=True)


def fold_summary(exp: str, folds_run: list[int]) -> pd.DataFrame:
    """One row per fold: images, classes, last epoch's metrics."""
    rows = []
    for k in folds_run:
        meta = store.read_json(fold_dir(exp, k) / "config.json")
        log = pd.read_csv(fold_dir(exp, k) / "log.csv")
        last = log.iloc[-1].drop("epoch").to_dict() if len(log) else {}
        rows.append({"fold": k, "train images": meta["n_fit"], "valid images": meta["n_valid"],
                     "individuals": len(meta["classes"]), "epochs": len(log), **last})
    return pd.DataFrame(rows).set_index("fold")
