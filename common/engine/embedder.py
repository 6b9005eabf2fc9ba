"""Stage 02: train the GeM + ArcFace embedder, one fold at a time, resumable after a kill.

Per fold ``k`` the folder ``working/<exp>/02_embedder/fold{k}/`` holds:

* ``config.json``: the stage config, the class list (individuals of the fold's training part, in logit order),
  the species list, the normalisation, and which images were used (crops or full frames);
* ``last.pt``: model, optimiser, scheduler and scaler state after the last finished epoch (rewritten
  atomically every epoch; a killed run resumes from it);
* ``epoch{N}.pt`` (optional): weights after epoch N, for checkpoint averaging;
* ``model.pt``: final weights; ``log.csv``: one row per epoch; ``_done.json``: the fold finished.

The learning rate warms up linearly, then follows a cosine to zero, stepped every batch. The neck and heads
train ``head_lr_mult`` times faster than the pretrained backbone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from common.config import EmbedderConfig
from common.core import checkpoint, distributed, paths, store
from common.core.runtime import (
    amp_context,
    configure_device,
    loader_workers,
    needs_grad_scaler,
    progress,
    resolve_device,
    seed_everything,
    set_train_mode,
    to_memory_format,
    warmup_cosine,
    worker_init,
)
from common.core.weights import backbone_normalization
from common.data.artefacts import fold_split
from common.data.competition import (
    Competition,
    ImageDataset,
    build_transforms,
)
from common.data.fingerprint import model_data, training_inputs
from common.lib.heads import dynamic_margins
from common.lib.models import EmbeddingModel

# Fields that change the trained model: a resumed fold must agree on all of them.
_MODEL_FIELDS = (
    "backbone", "pretrained", "image_size", "embedding_dim", "epochs", "batch_size", "lr", "head_lr_mult",
    "weight_decay", "warmup_epochs", "gem_p", "dropout", "arc_s", "arc_m", "arc_easy_margin", "arc_k",
    "dynamic_margin", "margin_a", "margin_p", "margin_b", "species_weight", "label_smoothing", "rrc_scale_min",
    "hflip", "use_crops", "max_images", "seed", "n_folds", "sync_bn", "norm_eval",
)


LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds", "images_per_s"]


def fold_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/02_embedder/fold{fold}``."""
    return paths.stage_dir(exp, "02") / f"fold{fold}"














def build_model(meta: dict[str, Any], pretrained: str | None = None) -> EmbeddingModel:
    """Build the embedder described by a fold's ``config.json`` (weights not loaded)."""
    cfg = meta["config"]
    margins = None
    if cfg["dynamic_margin"]:
        margins = dynamic_margins(meta["class_counts"], cfg["margin_a"], cfg["margin_p"], cfg["margin_b"])
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
    )


def load_embedder(exp: str, fold: int, device: torch.device | str = "cpu") -> tuple[EmbeddingModel, dict]:
    """Load fold ``fold``'s finished model and its ``config.json`` metadata, in eval mode."""
    # Read where it is: this run's working/, else an attached Kaggle dataset (found by experiment name).
    folder = paths.find_stage_dir(exp, "02", f"fold{fold}/_done.json",
                                  hint=f"fold {fold} has not finished training (run stage 02 first)") / f"fold{fold}"
    meta = store.read_json(folder / "config.json")
    model = build_model(meta, pretrained="none")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def _loader(dataset: ImageDataset, cfg: EmbedderConfig, device: torch.device):
    """An evaluation loader (in order; training batches come from :func:`common.core.distributed.epoch_loader`)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False,
        num_workers=loader_workers(cfg.num_workers), pin_memory=device.type == "cuda", worker_init_fn=worker_init,
    )


def train_fold(cfg: EmbedderConfig, comp: Competition, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Train (or resume, or skip when finished) one fold; returns its per-epoch log.

    Args:
        cfg: stage config.
        comp: the validated competition.
        folds: the table from :func:`prepare_folds`.
        fold: the fold used for validation.
    """
    out = fold_dir(cfg.exp, fold)
    params = {k: cfg.to_dict()[k] for k in _MODEL_FIELDS}
    params["data_fingerprint"] = model_data(comp.root)  # a model of other data is refused, not reused
    params["upstream"] = training_inputs(cfg)  # stage 01's crops (and a teacher): new crops retrain the fold
    done = checkpoint.finished_log(out, params, cfg.force)
    if done is not None:
        return done

    device = resolve_device(cfg.device)
    info = distributed.setup(device, cfg.batch_size, cfg.sync_bn)  # one process unless launched by torchrun
    device = distributed.process_device(device, info)
    configure_device(device)
    seed_everything(cfg.seed + fold)
    fit, valid, used_crops = fold_split(cfg, comp, folds, fold)
    classes = sorted(fit["individual_id"].unique())
    species = sorted(comp.train["species"].unique())
    class_index = {c: i for i, c in enumerate(classes)}
    species_index = {s: i for i, s in enumerate(species)}
    counts = fit["individual_id"].value_counts().reindex(classes).to_numpy()
    mean, std = backbone_normalization(cfg.backbone, cfg.pretrained)
    meta = {
        "config": cfg.to_dict(), "fold": fold, "classes": classes, "class_counts": counts.tolist(),
        "species": species, "mean": list(mean), "std": list(std),
        "used_crops": used_crops,
        "n_fit": len(fit), "n_valid": len(valid),
    }
    meta.update(data_fingerprint=params["data_fingerprint"], upstream=params["upstream"])
    checkpoint.check_resumable(out, params)
    if info.is_main:
        store.write_json(out / "config.json", meta)

    model = distributed.prepare_model(build_model(meta), info, device, cfg.sync_bn, cfg.channels_last)
    opt = torch.optim.AdamW(
        [{"params": model.backbone_parameters(), "lr": cfg.lr},
         {"params": model.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult}],
        weight_decay=cfg.weight_decay,
    )
    fit_ds = ImageDataset(fit["path"], [class_index[c] for c in fit["individual_id"]],
                          [species_index[s] for s in fit["species"]],
                          build_transforms(cfg.image_size, True, mean, std, scale_min=cfg.rrc_scale_min,
                                           hflip=cfg.hflip))
    known = valid[valid["individual_id"].isin(class_index)]
    valid_ds = ImageDataset(known["path"], [class_index[c] for c in known["individual_id"]],
                            [species_index[s] for s in known["species"]],
                            build_transforms(cfg.image_size, False, mean, std))
    steps_per_epoch = distributed.ShardSampler(range(len(fit_ds)), cfg.batch_size).n_batches
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(cfg.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))

    training_state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    start_epoch, rows = checkpoint.resume(out, training_state)
    train_model = distributed.wrap(model, info, device, cfg.compile)  # DDP across processes, else `model`

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        # Reseed global RNGs (dropout, drop-path) each epoch: a resumed run draws what an unbroken one does;
        # the epoch's image order and each image's augmentation depend on (seed, epoch) only, so they are the
        # same for any number of processes and loader workers.
        seed_everything((cfg.seed + fold) * 1000 + epoch)
        fit_ds.sample_seed = cfg.seed * 1000 + epoch
        order = distributed.epoch_order(len(fit_ds), cfg.seed * 1000 + epoch)
        loader = distributed.epoch_loader(fit_ds, order, cfg.batch_size, info, cfg.num_workers, device)
        set_train_mode(model, cfg.norm_eval)
        total_loss = total_correct = seen = 0.0
        bar = progress(loader, desc=f"fold {fold} epoch {epoch}/{cfg.epochs}", leave=False, disable=not info.is_main)
        for batch in bar:
            x = to_memory_format(batch["image"].to(device, non_blocking=True), device, cfg.channels_last)
            y = batch["label"].to(device, non_blocking=True)
            with amp_context(device, cfg.amp):
                out_ = train_model(x, labels=y)
            # Losses in float32: the ArcFace logits already are; the species logits may be bf16/fp16.
            loss = F.cross_entropy(out_["logits"].float(), y, label_smoothing=cfg.label_smoothing)
            if cfg.species_weight > 0:
                sp = batch["species"].to(device, non_blocking=True)
                loss = loss + cfg.species_weight * F.cross_entropy(out_["species_logits"].float(), sp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            n = len(y)
            total_loss += loss.item() * n
            total_correct += (out_["logits"].argmax(1) == y).sum().item()
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        total_loss, total_correct, seen = distributed.all_sum([total_loss, total_correct, seen], info, device)
        # Validation on rank 0 with the plain model (a DDP forward on one rank alone would wait for the others).
        valid_loss, valid_acc = evaluate(model, valid_ds, cfg, device) if info.is_main else (float("nan"),) * 2
        elapsed = time.perf_counter() - t0
        rows.append({
            "epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": total_correct / max(seen, 1),
            "valid_loss": valid_loss, "valid_acc": valid_acc, "lr": opt.param_groups[0]["lr"],
            "seconds": round(elapsed, 2), "images_per_s": round(seen / elapsed, 1),
        })
        if info.is_main:  # only rank 0 writes
            checkpoint.save_state(out, epoch, training_state)
            if cfg.keep_epoch_checkpoints:
                with store.atomic_path(out / f"epoch{epoch}.pt") as tmp:
                    torch.save(model.state_dict(), tmp)
            store.write_csv(out / "log.csv", pd.DataFrame(rows))

    log = pd.DataFrame(rows, columns=LOG_COLUMNS)
    if info.is_main:
        store.write_csv(out / "log.csv", log)  # also when epochs=0 (the untrained baseline)
        with store.atomic_path(out / "model.pt") as tmp:
            torch.save(model.state_dict(), tmp)
        store.mark_done(out, params)
    distributed.barrier(info)  # the next fold starts when rank 0 has written this one
    return log


@torch.no_grad()
def evaluate(model: EmbeddingModel, dataset: ImageDataset, cfg: EmbedderConfig, device: torch.device):
    """Loss and top-1 accuracy (no margin) on validation images of individuals seen in training."""
    if len(dataset) == 0:
        return float("nan"), float("nan")
    model.eval()
    total_loss = correct = 0.0
    for batch in _loader(dataset, cfg, device):
        x, y = batch["image"].to(device), batch["label"].to(device)
        with amp_context(device, cfg.amp):
            logits = model(x)["logits"].float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / len(dataset), correct / len(dataset)





