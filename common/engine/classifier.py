"""Stage 05's training: one fold of a timm classifier with the winning solutions' tricks, resumable after a kill.

Every trick is one :class:`~common.config.ClassifierConfig` field; this module only wires them together:

* head (``linear``, ``arcface``, ``subcenter`` + ``dynamic_margin``): :class:`common.lib.models.ClassifierModel` on
  :class:`common.lib.heads.ArcMarginProduct`;
* loss, logit adjustment, distillation targets: :mod:`common.lib.losses`;
* class-balanced sampling: :mod:`common.lib.sampling`; CutMix / Mixup: :mod:`common.lib.mixing`;
* EMA and checkpoint averaging: :mod:`common.lib.averaging`;
* AdamW / RAdam with a per-batch warmup + cosine schedule and a head learning-rate multiplier: here.

Per fold ``k`` the folder ``working/<exp>/05_classifier/fold{k}/`` holds ``config.json``, ``last.pt`` (model,
optimiser, scheduler, scaler, EMA and loss state after the last finished epoch: a killed run resumes from it and
ends bit-identical to an unbroken one), ``epoch{N}.pt`` (the weights of the epochs to average), ``model.pt`` (the
final weights: the average, else the EMA, else the last epoch's), ``log.csv`` and ``_done.json``.
The stage as a whole (predictions, metrics, submission) is :mod:`common.stages.train_classifier`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ClassifierConfig
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
    DataError,
    ImageDataset,
    build_transforms,
    make_folds,
    split_fold,
)
from common.engine.predict import forward_images
from common.lib.averaging import ModelEma, average_checkpoints, select_checkpoints
from common.lib.heads import dynamic_margins
from common.lib.losses import build_criterion, distillation_loss, mix_hard_soft, to_soft_targets
from common.lib.metrics import classification_report
from common.lib.mixing import BatchMixer
from common.lib.models import ClassifierModel
from common.lib.sampling import ClassBalancedSampler

STAGE = "05"
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_balanced_acc", "lr",
               "seconds", "images_per_s"]
# Fields that change the trained model: a resumed fold must agree on all of them.
_MODEL_FIELDS = (
    "label_column", "backbone", "pretrained", "image_size", "epochs", "batch_size", "optimizer", "lr",
    "head_lr_mult", "weight_decay", "warmup_epochs", "dropout", "head", "arc_s", "arc_m", "arc_k",
    "dynamic_margin", "margin_a", "margin_p", "margin_b", "loss", "label_smoothing", "focal_gamma", "eql_tau",
    "la_loss_tau", "sampler", "mixup_alpha", "cutmix_alpha", "mix_prob", "rrc_scale_min", "hflip", "ema_decay",
    "avg_last", "avg_epochs", "distill_from", "distill_mode", "distill_weight", "distill_temperature",
    "use_crops", "max_images", "seed", "n_folds", "sync_bn", "norm_eval", "aux_column", "aux_weight",
    "freeze_blocks",
)


def build_model(meta: dict[str, Any], pretrained: str | None = None) -> ClassifierModel:
    """The model a fold's ``config.json`` describes (weights not loaded)."""
    cfg = meta["config"]
    margins = None
    if cfg["head"] != "linear" and cfg["dynamic_margin"]:
        margins = dynamic_margins(np.maximum(meta["class_counts"], 1), cfg["margin_a"], cfg["margin_p"],
                                  cfg["margin_b"])
    return ClassifierModel(cfg["backbone"], len(meta["classes"]),
                           pretrained=cfg["pretrained"] if pretrained is None else pretrained,
                           head=cfg["head"], dropout=cfg["dropout"], arc_s=cfg["arc_s"], arc_m=cfg["arc_m"],
                           arc_k=cfg["arc_k"], margins=margins, n_aux=len(meta.get("aux_classes", [])),
                           freeze_blocks=cfg.get("freeze_blocks", 0))


# ----------------------------------------------------------------------------------------- data
def stage_dir(exp: str) -> Path:
    """``working/<exp>/05_classifier``."""
    return paths.stage_dir(exp, STAGE)


def fold_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/05_classifier/fold{fold}``."""
    return stage_dir(exp) / f"fold{fold}"


def label_table(comp: Competition, label_column: str) -> pd.DataFrame:
    """``image, label, path`` for every training image, the class read from ``label_column``.

    Raises:
        DataError: naming ``train.csv`` and the row when the column is missing or a value is empty.
    """
    where = comp.root / "train.csv"
    if label_column not in comp.train.columns:
        cols = [c for c in comp.train.columns if c != "path"]
        raise DataError(f"{where}: no column {label_column!r} to classify by (label_column); columns: {cols}")
    labels = comp.train[label_column].astype("string").str.strip()
    empty = labels.isna() | (labels == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0]) + 1
        raise DataError(f"{where}, row {row}: empty {label_column!r}")
    return pd.DataFrame({"image": comp.train["image"], "label": labels.astype(str), "path": comp.train["path"]})


def read_folds(exp: str) -> pd.DataFrame:
    """Read ``folds.csv`` written by :func:`prepare_folds` (``image, label, fold``)."""
    path = stage_dir(exp) / "folds.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stage 05 first")
    return pd.read_csv(path, dtype={"image": str, "label": str})


def prepare_folds(cfg: ClassifierConfig, comp: Competition) -> pd.DataFrame:
    """Fold table ``image, label, fold`` (stratified by class), written to ``folds.csv``, with
    ``classes.json``; checks every requested fold has training and validation images before training."""
    table = label_table(comp, cfg.label_column)
    if cfg.max_images and len(table) > cfg.max_images:
        table = table.sample(n=cfg.max_images, random_state=cfg.seed).sort_index()
    table = table.assign(fold=make_folds(table["label"], cfg.n_folds, cfg.seed)).reset_index(drop=True)
    for k in cfg.fold_list():
        split_fold(table, table["fold"].to_numpy(), k)
    counts = table["label"].value_counts()
    classes = sorted(counts.index)
    store.write_csv(stage_dir(cfg.exp) / "folds.csv", table[["image", "label", "fold"]])
    store.write_json(stage_dir(cfg.exp) / "classes.json", {
        "label_column": cfg.label_column, "classes": classes,
        "counts": [int(counts[c]) for c in classes]})
    return table[["image", "label", "fold"]]


def teacher_targets(cfg: ClassifierConfig, images: list[str], classes: list[str]) -> np.ndarray:
    """The teacher's out-of-fold probabilities for ``images``, columns reordered to ``classes``.

    Raises:
        FileNotFoundError / DataError: when the teacher run is missing, misses an image (it must have
            predicted every training image out of fold: train it with ``folds=all``) or other classes.
    """
    folder = stage_dir(cfg.distill_from)
    oof = store.load_arrays(folder / "oof.npz")
    teacher_classes = store.read_json(folder / "classes.json")["classes"]
    if sorted(teacher_classes) != sorted(classes):
        raise DataError(f"{folder / 'classes.json'}: the teacher {cfg.distill_from!r} was trained on other classes")
    index = {img: i for i, img in enumerate(oof["image"].tolist())}
    missing = [img for img in images if img not in index]
    if missing:
        raise DataError(f"{folder / 'oof.npz'}: no out-of-fold prediction for image {missing[0]!r} "
                        f"({len(missing)} missing): train the teacher {cfg.distill_from!r} with folds=all")
    order = [teacher_classes.index(c) for c in classes]
    return oof["probs"][[index[img] for img in images]][:, order].astype(np.float32)


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their row number (to look up per-image soft targets)."""

    def __init__(self, base: ImageDataset) -> None:
        self.base = base
        self.transform = base.transform  # worker_init reseeds it

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[i], "index": torch.tensor(i)}


def _loader(dataset, cfg: ClassifierConfig, device: torch.device, batch_size: int | None = None):
    """An evaluation loader (in order, no augmentation randomness)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or cfg.batch_size, shuffle=False,
        num_workers=loader_workers(cfg.num_workers), pin_memory=device.type == "cuda", worker_init_fn=worker_init)


def build_optimizer(cfg: ClassifierConfig, model: ClassifierModel) -> torch.optim.Optimizer:
    """AdamW or RAdam (decoupled weight decay) with the head at ``head_lr_mult`` x ``lr``."""
    groups = [{"params": list(model.backbone_parameters()), "lr": cfg.lr},
              {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult}]
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(groups, weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def averaged_epochs(cfg: ClassifierConfig) -> list[int]:
    """The epochs whose weights are averaged into the final model (empty: no averaging)."""
    if not cfg.avg_last and not cfg.avg_epochs:
        return []
    return select_checkpoints(list(range(1, cfg.epochs + 1)), last_n=cfg.avg_last, epochs=cfg.avg_epochs)


# ----------------------------------------------------------------------------------------- training
def train_fold(cfg: ClassifierConfig, comp: Competition, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
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
    classes = store.read_json(stage_dir(cfg.exp) / "classes.json")["classes"]
    class_index = {c: i for i, c in enumerate(classes)}
    # A class absent from this fold's training part still has a logit; priors and margins count it once.
    counts = fit["label"].value_counts().reindex(classes).fillna(0).astype(int).to_numpy()
    mean, std = backbone_normalization(cfg.backbone, cfg.pretrained)
    avg = averaged_epochs(cfg)
    meta = {"config": cfg.to_dict(), "fold": fold, "classes": classes, "class_counts": counts.tolist(),
            "mean": list(mean), "std": list(std), "used_crops": used_crops, "n_fit": len(fit),
            "n_valid": len(valid), "averaged_epochs": avg,
            "final_weights": ("average of epochs " + ",".join(map(str, avg)) if avg
                              else "EMA" if cfg.ema_decay else "last epoch")}
    checkpoint.check_resumable(out, params)
    y_fit = np.array([class_index[c] for c in fit["label"]])
    soft = None
    if cfg.distill_from:  # checked before the model is built: a missing teacher fails in a second
        soft = torch.from_numpy(teacher_targets(cfg, list(fit["image"]), classes))
    aux = None
    if cfg.aux_column:  # auxiliary head (e.g. coarse classes): one label per training image, by row
        aux_table = label_table(comp, cfg.aux_column).set_index("image")["label"]
        meta["aux_classes"] = sorted(aux_table.unique())
        aux = torch.tensor(aux_table.reindex(fit["image"]).map(
            {c: i for i, c in enumerate(meta["aux_classes"])}).to_numpy(dtype=np.int64))
    if info.is_main:
        store.write_json(out / "config.json", meta)

    n_classes = len(classes)
    model = distributed.prepare_model(build_model(meta), info, device, cfg.sync_bn, cfg.channels_last)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
    criterion = build_criterion(cfg.loss, n_classes, np.maximum(counts, 1), label_smoothing=cfg.label_smoothing,
                                focal_gamma=cfg.focal_gamma, eql_tau=cfg.eql_tau, la_tau=cfg.la_loss_tau)
    criterion = criterion.to(device)
    mixer = BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, seed=cfg.seed * 1000 + fold)
    if cfg.distill_from and cfg.distill_mode == "kd" and mixer.enabled:
        raise ValueError("distill_mode=kd with CutMix/Mixup is not supported: the teacher saw unmixed images; "
                         "use distill_mode=mix (its soft targets are mixed with the images)")
    if aux is not None and mixer.enabled:
        raise ValueError("aux_column with CutMix/Mixup is not supported: the auxiliary labels are not mixed")
    opt = build_optimizer(cfg, model)
    train_tf = build_transforms(cfg.image_size, True, mean, std, scale_min=cfg.rrc_scale_min, hflip=cfg.hflip)
    fit_ds = _Indexed(ImageDataset(fit["path"], y_fit, transform=train_tf))
    known = valid[valid["label"].isin(class_index)]
    valid_ds = ImageDataset(known["path"], [class_index[c] for c in known["label"]],
                            transform=build_transforms(cfg.image_size, False, mean, std))
    sampler = None
    if cfg.sampler != "random":
        sampler = ClassBalancedSampler(y_fit, power=1.0 if cfg.sampler == "balanced" else 0.5,
                                       seed=cfg.seed * 1000 + fold)
    steps_per_epoch = distributed.ShardSampler(range(len(fit_ds)), cfg.batch_size).n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))

    training_state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
                      "criterion": criterion, "ema": ema}
    start_epoch, rows = checkpoint.resume(out, training_state)
    train_model = distributed.wrap(model, info, device, cfg.compile)  # DDP across processes, else `model`

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        # Reseed every random source each epoch: a resumed run draws what an unbroken one does.
        # The epoch's order and each image's augmentation depend on (seed, epoch) only: the same for any number
        # of processes and loader workers.
        seed_everything((cfg.seed + fold) * 1000 + epoch)
        fit_ds.base.sample_seed = cfg.seed * 1000 + epoch
        mixer.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = list(sampler)
        else:
            order = distributed.epoch_order(len(fit_ds), cfg.seed * 1000 + epoch)
        loader = distributed.epoch_loader(fit_ds, order, cfg.batch_size, info, cfg.num_workers, device)
        set_train_mode(model, cfg.norm_eval)
        criterion.train()
        total_loss = correct = seen = 0.0
        bar = progress(loader, desc=f"fold {fold} epoch {epoch}/{cfg.epochs}", leave=False, disable=not info.is_main)
        for batch in bar:
            x = to_memory_format(batch["image"].to(device, non_blocking=True), device, cfg.channels_last)
            y = batch["label"].to(device, non_blocking=True)
            target: torch.Tensor = y
            if soft is not None and cfg.distill_mode == "mix":
                target = mix_hard_soft(y, soft[batch["index"]].to(device), n_classes, cfg.distill_weight)
            if mixer.enabled:
                x, target = mixer(x, to_soft_targets(target, n_classes))
            # ArcFace heads put the margin on the dominant class of a mixed target.
            margin_labels = target.argmax(1) if target.ndim == 2 else y
            with amp_context(device, cfg.amp):
                logits = train_model(x, labels=margin_labels if cfg.head != "linear" else None,
                                     **({"return_aux": True} if aux is not None else {}))
            if aux is not None:  # auxiliary head: one cross-entropy term on its classes
                logits, aux_logits = logits
            loss = criterion(logits.float(), target)
            if aux is not None:
                loss = loss + cfg.aux_weight * F.cross_entropy(aux_logits, aux[batch["index"]].to(device))
            if soft is not None and cfg.distill_mode == "kd":
                kd = distillation_loss(logits, soft[batch["index"]].to(device), cfg.distill_temperature)
                loss = (1.0 - cfg.distill_weight) * loss + cfg.distill_weight * kd
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model)
            n = len(y)
            total_loss += loss.item() * n
            correct += (logits.argmax(1) == margin_labels).sum().item()
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        total_loss, correct, seen = distributed.all_sum([total_loss, correct, seen], info, device)
        eval_model = ema.module if ema is not None else model
        # Validation on rank 0 with the plain model (a DDP forward on one rank alone would wait for the others).
        report = (evaluate(eval_model, valid_ds, cfg, device, n_classes) if info.is_main
                  else dict.fromkeys(("loss", "accuracy", "balanced_accuracy"), float("nan")))
        elapsed = time.perf_counter() - t0
        rows.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                     "valid_loss": report["loss"], "valid_acc": report["accuracy"],
                     "valid_balanced_acc": report["balanced_accuracy"], "lr": opt.param_groups[0]["lr"],
                     "seconds": round(elapsed, 2), "images_per_s": round(seen / elapsed, 1)})
        if info.is_main:  # only rank 0 writes
            if epoch in avg:
                with store.atomic_path(out / f"epoch{epoch}.pt") as tmp:
                    torch.save(eval_model.state_dict(), tmp)
            checkpoint.save_state(out, epoch, training_state)
            store.write_csv(out / "log.csv", pd.DataFrame(rows, columns=LOG_COLUMNS))

    log = pd.DataFrame(rows, columns=LOG_COLUMNS)
    if not info.is_main:
        distributed.barrier(info)
        return log
    if avg:
        final = average_checkpoints([out / f"epoch{e}.pt" for e in avg])
    else:
        final = (ema.module if ema is not None else model).state_dict()
    store.write_csv(out / "log.csv", log)
    with store.atomic_path(out / "model.pt") as tmp:
        torch.save(final, tmp)
    store.mark_done(out, params)
    distributed.barrier(info)  # the other processes go on once rank 0 has written this fold
    return log


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, cfg: ClassifierConfig, device: torch.device,
             n_classes: int) -> dict[str, float]:
    """Loss (no margin), accuracy and balanced accuracy on validation images of classes seen in training."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "balanced_accuracy": float("nan")}
    model.eval()
    logits = torch.cat([model(b["image"].to(device)).float().cpu()
                        for b in _loader(dataset, cfg, device, batch_size=2 * cfg.batch_size)])
    y = torch.as_tensor(dataset.labels)
    rep = classification_report(y.numpy(), logits.numpy(), n_classes)
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": rep["accuracy"],
            "balanced_accuracy": rep["balanced_accuracy"]}


def load_classifier(exp: str, fold: int, device: torch.device | str = "cpu") -> tuple[ClassifierModel, dict]:
    """A finished fold's final model (eval mode) and its ``config.json`` metadata."""
    # Read where it is: this run's working/, else an attached Kaggle dataset (found by experiment name).
    folder = paths.find_stage_dir(exp, STAGE, f"fold{fold}/_done.json",
                                  hint=f"fold {fold} has not finished training (run stage 05 first)") / f"fold{fold}"
    meta = store.read_json(folder / "config.json")
    model = build_model(meta, pretrained="none")
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_logits(model: nn.Module, image_files: list[str], image_size: int, mean: list[float],
                   std: list[float], batch_size: int = 64, tta_flip: bool = True,
                   device: torch.device | str = "cpu", num_workers: int = 0, amp: bool = True,
                   desc: str = "predict") -> np.ndarray:
    """Float32 logits ``(N, C)`` of ``image_files`` (no margin), averaged with the horizontal flip's.

    Args:
        model: a :class:`ClassifierModel` (anything mapping images to logits).
        image_files: image paths, one row each, in order.
        image_size: the training size.
        mean: normalisation mean.
        std: normalisation std.
        batch_size: images per forward pass.
        tta_flip: average the logits of each image and of its mirror image.
        device: where to run.
        num_workers: loader workers.
        amp: autocast on CUDA.
        desc: progress-bar label.
    """
    model = model.to(torch.device(device)).eval()
    return forward_images(model, image_files, image_size, mean, std, batch_size, tta_flip, device, num_workers,
                          amp, desc, n_out=getattr(getattr(model, "head", None), "out_features", 0))
