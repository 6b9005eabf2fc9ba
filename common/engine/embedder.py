"""Stage 02's training: the GeM + ArcFace embedder as a task of the shared loop (:func:`common.engine.fit.fit`).

Per fold ``k`` the folder ``working/<exp>/02_embedder/fold{k}/`` holds:

* ``config.json``: the stage config, the class list (individuals of the fold's training part, in logit order),
  the species list, the normalisation, and which images were used (crops or full frames);
* ``last.pt``: model, optimiser, scheduler and scaler state after the last finished epoch (rewritten
  atomically every epoch; a killed run resumes from it);
* ``epoch{N}.pt`` (optional): weights after epoch N, for checkpoint averaging;
* ``model.pt``: final weights (the last epoch's); ``log.csv``: one row per epoch; ``_done.json``: the fold finished.

The loss is ArcFace's cross-entropy plus, with ``species_weight > 0``, that of an auxiliary species head; the
images come in a plain shuffle. The schedule, optimiser groups, AMP, DDP and checkpoints are the loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from common.config import EmbedderConfig
from common.core.runtime import amp_context
from common.data.competition import Competition, ImageDataset, build_transforms
from common.engine import fit as engine
from common.engine.fit import Task
from common.lib.heads import margins_from_config
from common.lib.models import EmbeddingModel


class EmbedderTask(Task):
    """Stage 02 for :func:`~common.engine.fit.fit`: individuals as classes, ArcFace (+ species) loss, a plain
    shuffle, the last epoch's weights; validation loss and top-1 accuracy without the margin."""

    stage = "02"
    # Fields that change the trained model (tagged model=True where declared): a resumed fold must agree on them.
    model_fields = EmbedderConfig.model_fields()
    cfg: EmbedderConfig

    def describe(self, comp: Competition, fit: pd.DataFrame) -> dict[str, Any]:
        classes = sorted(fit["individual_id"].unique())
        counts = fit["individual_id"].value_counts().reindex(classes).to_numpy()
        return {"classes": classes, "class_counts": counts.tolist(), "species": sorted(comp.train["species"].unique())}

    def build_model(self, meta: dict[str, Any]) -> EmbeddingModel:
        return build_model(meta)  # the module function, looked up at call time (tests replace it)

    def datasets(self, fit: pd.DataFrame, valid: pd.DataFrame, meta: dict[str, Any]
                 ) -> tuple[ImageDataset, ImageDataset]:
        cfg, mean, std = self.cfg, meta["mean"], meta["std"]
        class_index = {c: i for i, c in enumerate(meta["classes"])}
        species_index = {s: i for i, s in enumerate(meta["species"])}
        fit_ds = ImageDataset(fit["path"], [class_index[c] for c in fit["individual_id"]],
                              [species_index[s] for s in fit["species"]],
                              build_transforms(cfg.image_size, True, mean, std, scale_min=cfg.rrc_scale_min,
                                               hflip=cfg.hflip))
        known = valid[valid["individual_id"].isin(class_index)]
        valid_ds = ImageDataset(known["path"], [class_index[c] for c in known["individual_id"]],
                                [species_index[s] for s in known["species"]],
                                build_transforms(cfg.image_size, False, mean, std))
        return fit_ds, valid_ds

    def loss(self, train_model, x, y, batch):
        cfg = self.cfg
        with amp_context(x.device, cfg.amp, cfg.amp_cpu):
            out = train_model(x, labels=y)
        # Losses in float32: the ArcFace logits already are; the species logits may be bf16/fp16.
        loss = F.cross_entropy(out["logits"].float(), y, label_smoothing=cfg.label_smoothing)
        if cfg.species_weight > 0:
            sp = batch["species"].to(x.device, non_blocking=True)
            loss = loss + cfg.species_weight * F.cross_entropy(out["species_logits"].float(), sp)
        return loss, out["logits"], y

    def validate(self, model, loader, device):
        """Loss and top-1 accuracy (no margin) on validation images of individuals seen in training."""
        total_loss = correct = 0.0
        for batch in loader:
            x, y = self.images(batch, device), batch["label"].to(device)
            with amp_context(device, self.cfg.amp, self.cfg.amp_cpu):
                logits = model(x)["logits"].float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        n = len(loader.dataset)
        return {"valid_loss": total_loss / n, "valid_acc": correct / n}

    def epoch_weights(self, epoch, model):
        return model.state_dict() if self.cfg.keep_epoch_checkpoints else None


_MODEL_FIELDS = EmbedderTask.model_fields
LOG_COLUMNS = EmbedderTask.log_columns()


def fold_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/02_embedder/fold{fold}``."""
    return engine.fold_dir(exp, "02", fold)


def build_model(meta: dict[str, Any], pretrained: str | None = None) -> EmbeddingModel:
    """Build the embedder described by a fold's ``config.json`` (weights not loaded)."""
    cfg = meta["config"]
    margins = None
    if cfg["dynamic_margin"]:
        margins = margins_from_config(meta["class_counts"], cfg)
    return EmbeddingModel(
        backbone=cfg["backbone"],
        pretrained=cfg["pretrained"] if pretrained is None else pretrained,
        embedding_dim=cfg["embedding_dim"],
        n_classes=len(meta["classes"]),
        n_species=len(meta["species"]) if cfg["species_weight"] > 0 else 0,
        gem_p=cfg["gem_p"],
        dropout=cfg["dropout"],
        arc_s=cfg["arc_s"],
        arc_m=cfg["arc_m"],
        arc_easy_margin=cfg["arc_easy_margin"],
        arc_k=cfg["arc_k"],
        margins=margins,
        freeze_blocks=cfg.get("freeze_blocks", 0),  # older fold configs have no such key
    )


def load_embedder(exp: str, fold: int, device: torch.device | str = "cpu") -> tuple[EmbeddingModel, dict]:
    """Load fold ``fold``'s finished model and its ``config.json`` metadata, in eval mode."""
    return engine.load_fold(exp, "02", fold, build_model, device)


def train_fold(cfg: EmbedderConfig, comp: Competition, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Train (or resume, or skip when finished) one fold; returns its per-epoch log (:func:`~common.engine.fit.fit`).

    Args:
        cfg: stage config.
        comp: the validated competition.
        folds: the table from :func:`common.stages.train_embedder.prepare_folds`.
        fold: the fold used for validation.
    """
    return engine.fit(EmbedderTask(cfg), comp, folds, fold)
