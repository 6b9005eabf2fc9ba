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

from common import checkpoint, distributed, paths, store, tracking
from common.config import ClassifierConfig, EmbedderConfig
from common.data import Competition, DataError, ImageDataset, build_transforms, make_folds, split_fold
from common.heads import dynamic_margins
from common.models import EmbeddingModel
from common.runtime import (
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
from common.weights import backbone_normalization

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


def crops_dir(exp: str, split: str = "") -> Path:
    """Where stage 01 writes crops: ``working/<exp>/01_crop/crops/{train,test}/<image>``.

    With ``split``, the ``crops/<split>`` folder to read: this run's own, else an attached Kaggle source's
    (:func:`common.paths.find_stage_dir`), else the local path (whose absence the caller reports).
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
    fit, valid = split_fold(table, table["fold"].to_numpy(), fold)
    return fit, valid, used_crops


def prepare_folds(cfg: EmbedderConfig, comp: Competition) -> pd.DataFrame:
    """Fold table ``image, individual_id, species, fold`` (written to ``02_embedder/folds.csv``).

    Validates that every requested fold has training and validation images before any training starts.
    """
    train = comp.train
    if cfg.max_images and len(train) > cfg.max_images:
        train = train.sample(n=cfg.max_images, random_state=cfg.seed).sort_index()
    folds = make_folds(train["individual_id"], cfg.n_folds, cfg.seed)
    table = train[["image", "individual_id", "species"]].assign(fold=folds).reset_index(drop=True)
    for k in cfg.fold_list():
        split_fold(table, table["fold"].to_numpy(), k)
    store.write_csv(paths.stage_dir(cfg.exp, "02") / "folds.csv", table)
    return table


def read_folds(exp: str) -> pd.DataFrame:
    """Read ``02_embedder/folds.csv`` written by :func:`prepare_folds`."""
    path = paths.find_stage_dir(exp, "02", "folds.csv", hint="run stage 02 (train embedder) first") / "folds.csv"
    return pd.read_csv(path, dtype={"image": str, "individual_id": str, "species": str})


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
    """An evaluation loader (in order; training batches come from :func:`common.distributed.epoch_loader`)."""
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
        tracking.report_epoch("02", fold, epoch, rows[-1])  # sweeps: Optuna pruning

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


def run_training(cfg: EmbedderConfig, comp: Competition, folds: pd.DataFrame) -> pd.DataFrame:
    """Train every requested fold; returns all logs stacked with a ``fold`` column.

    With ``cfg.nproc > 1`` (and not already inside torchrun) the folds are trained by ``nproc`` processes
    started with torchrun (:func:`common.distributed.launch`); this process then reads their finished logs.
    """
    cfg = distributed.train_elsewhere("02", cfg, paths.stage_dir(cfg.exp, "02"))
    logs = [train_fold(cfg, comp, folds, k).assign(fold=k) for k in cfg.fold_list()]
    if distributed.launch_info().is_main:
        store.mark_done(paths.stage_dir(cfg.exp, "02"), cfg.fingerprint())
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

