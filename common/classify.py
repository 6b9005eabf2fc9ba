"""Stage 05: fine-tune a timm classifier per fold, with the winning solutions' tricks as parameters.

Every trick is one :class:`~common.config.ClassifierConfig` field; this module only wires them together:

* head (``linear``, ``arcface``, ``subcenter`` + ``dynamic_margin``): :class:`ClassifierModel`, on
  :class:`common.heads.ArcMarginProduct`;
* loss, logit adjustment, distillation targets: :mod:`common.losses`;
* class-balanced sampling: :mod:`common.sampling`; CutMix / Mixup: :mod:`common.mixing`;
* EMA and checkpoint averaging: :mod:`common.averaging`;
* AdamW / RAdam with a per-batch warmup + cosine schedule and a head learning-rate multiplier: here.

Outputs under ``working/<exp>/05_classifier/``:

* ``folds.csv`` (``image, label, fold``) and ``classes.json`` (class names in logit order, their counts);
* per fold ``fold{k}/``: ``config.json``, ``last.pt`` (model, optimiser, scheduler, scaler, EMA and loss
  state after the last finished epoch: a killed run resumes from it), ``epoch{N}.pt`` (the weights of the
  epochs to average), ``model.pt`` (the final weights), ``log.csv``, ``_done.json``;
* ``oof.npz``: out-of-fold ``logits`` and ``probs`` (float32, ``(N, C)``), ``label`` (class index) and ``fold``
  for every validation image of the trained folds, with their ``image`` ids (``common.store.save_arrays``);
* ``test.npz``: ``logits``/``probs`` averaged over the fold models and ``probs_fold{k}`` per fold, rows in
  test order;
* ``metrics.json``: out-of-fold and (with ground truth) test accuracy, balanced accuracy, top-5.

Predictions are ``softmax(logits)``; with ``la_posthoc_tau > 0`` the saved ``logits``/``probs`` and the
submission are the adjusted ones (``logits - tau * log prior``) and ``metrics.json`` also scores the raw ones.
The submission ``submissions/<exp>-classifier.csv`` lists each test image's five most likely classes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from common import paths, store
from common.averaging import ModelEma, average_checkpoints, select_checkpoints
from common.config import ClassifierConfig
from common.data import Competition, DataError, ImageDataset, build_transforms, make_folds, split_fold
from common.heads import ArcMarginProduct, dynamic_margins
from common.losses import build_criterion, distillation_loss, logit_adjust, mix_hard_soft, to_soft_targets
from common.metrics import classification_report
from common.mixing import BatchMixer
from common.models import create_backbone, feature_channels
from common.runtime import (
    amp_context,
    needs_grad_scaler,
    progress,
    resolve_device,
    seed_everything,
    warmup_cosine,
    worker_init,
)
from common.sampling import ClassBalancedSampler
from common.weights import backbone_normalization

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
    "use_crops", "max_images", "seed", "n_folds",
)


# ----------------------------------------------------------------------------------------- the model
class ClassifierModel(nn.Module):
    """A timm backbone, average pooling, dropout and a classification head.

    Args:
        backbone: timm model name.
        n_classes: number of classes.
        pretrained: where the backbone weights come from (see :func:`common.models.create_backbone`).
        head: ``linear``; ``arcface`` (:class:`~common.heads.ArcMarginProduct`, k=1); ``subcenter``
            (``arc_k`` sub-centres, max over them). With ``margins`` the ArcFace margin is per class.
        dropout: dropout before the head.
        arc_s: ArcFace scale.
        arc_m: fixed ArcFace margin (radians).
        arc_k: sub-centres per class (``subcenter``).
        margins: optional per-class margins ``(n_classes,)``, e.g. from :func:`~common.heads.dynamic_margins`.
        in_chans: input channels.
    """

    def __init__(self, backbone: str, n_classes: int, pretrained: str = "auto", head: str = "linear",
                 dropout: float = 0.0, arc_s: float = 30.0, arc_m: float = 0.5, arc_k: int = 1,
                 margins: torch.Tensor | None = None, in_chans: int = 3) -> None:
        super().__init__()
        if head not in ("linear", "arcface", "subcenter"):
            raise ValueError(f"ClassifierModel: head={head!r}: use linear, arcface or subcenter")
        self.backbone = create_backbone(backbone, pretrained, in_chans=in_chans)
        self.num_features = feature_channels(self.backbone, in_chans)
        self.head_type = head
        self.dropout = nn.Dropout(dropout)
        if head == "linear":
            self.head = nn.Linear(self.num_features, n_classes)
        else:
            self.head = ArcMarginProduct(self.num_features, n_classes, s=arc_s, m=arc_m, margins=margins,
                                         k=arc_k if head == "subcenter" else 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, num_features)``."""
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``(N, n_classes)``; ArcFace heads put their margin on ``labels`` when given."""
        f = self.dropout(self.features(x))
        if self.head_type == "linear":
            return self.head(f).float()
        return self.head(f, labels)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The head's parameters (``head_lr_mult`` x the base learning rate)."""
        return self.head.parameters()


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
                           arc_k=cfg["arc_k"], margins=margins)


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


def test_truth(comp: Competition, label_column: str) -> pd.Series | None:
    """Ground-truth classes of the test images (from ``test.csv``), indexed by image, or ``None``."""
    path = comp.root / "test.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype=str)
    if label_column not in table.columns:
        return None
    return table.set_index("image")[label_column].astype(str)


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


def _loader(dataset, cfg: ClassifierConfig, device: torch.device, shuffle: bool = False, seed: int = 0,
            sampler: torch.utils.data.Sampler | None = None, batch_size: int | None = None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        drop_last=(shuffle or sampler is not None) and len(dataset) > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed))


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
    if cfg.force and out.exists():
        shutil.rmtree(out)
    if store.stage_done(out, params):
        return pd.read_csv(out / "log.csv")
    if store.stage_done(out):
        raise RuntimeError(f"{out} holds a model trained with other parameters; use force=True to retrain")

    from common.train import crops_available, image_paths

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + fold)
    table = folds.merge(comp.train[["image", "path"]], on="image", how="left", validate="one_to_one")
    used_crops = cfg.use_crops and crops_available(cfg.exp)
    table = table.assign(path=image_paths(table, cfg.exp, "train", used_crops))
    fit, valid = split_fold(table, table["fold"].to_numpy(), fold)
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
    last = out / "last.pt"
    if last.exists():
        old = store.read_json(out / "config.json")
        if {k: old["config"].get(k) for k in _MODEL_FIELDS} != params:
            raise RuntimeError(f"{last}: checkpoint from other parameters; use force=True to start over")
    y_fit = np.array([class_index[c] for c in fit["label"]])
    soft = None
    if cfg.distill_from:  # checked before the model is built: a missing teacher fails in a second
        soft = torch.from_numpy(teacher_targets(cfg, list(fit["image"]), classes))
    store.write_json(out / "config.json", meta)

    n_classes = len(classes)
    model = build_model(meta).to(device)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
    criterion = build_criterion(cfg.loss, n_classes, np.maximum(counts, 1), label_smoothing=cfg.label_smoothing,
                                focal_gamma=cfg.focal_gamma, eql_tau=cfg.eql_tau, la_tau=cfg.la_loss_tau)
    criterion = criterion.to(device)
    mixer = BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, seed=cfg.seed * 1000 + fold)
    if cfg.distill_from and cfg.distill_mode == "kd" and mixer.enabled:
        raise ValueError("distill_mode=kd with CutMix/Mixup is not supported: the teacher saw unmixed images; "
                         "use distill_mode=mix (its soft targets are mixed with the images)")
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
    steps_per_epoch = len(_loader(fit_ds, cfg, device, shuffle=True, sampler=sampler))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))

    start_epoch, rows = 0, []
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        criterion.load_state_dict(state["criterion"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch = int(state["epoch"])
        rows = pd.read_csv(out / "log.csv").to_dict("records") if (out / "log.csv").exists() else []
        rows = [r for r in rows if r["epoch"] <= start_epoch]

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        # Reseed every random source each epoch: a resumed run draws what an unbroken one does.
        seed_everything((cfg.seed + fold) * 1000 + epoch)
        train_tf.set_random_seed(cfg.seed * 1000 + epoch)
        mixer.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = _loader(fit_ds, cfg, device, shuffle=True, seed=cfg.seed * 1000 + epoch, sampler=sampler)
        model.train()
        criterion.train()
        total_loss = correct = seen = 0.0
        bar = progress(loader, desc=f"fold {fold} epoch {epoch}/{cfg.epochs}", leave=False)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            target: torch.Tensor = y
            if soft is not None and cfg.distill_mode == "mix":
                target = mix_hard_soft(y, soft[batch["index"]].to(device), n_classes, cfg.distill_weight)
            if mixer.enabled:
                x, target = mixer(x, to_soft_targets(target, n_classes))
            # ArcFace heads put the margin on the dominant class of a mixed target.
            margin_labels = target.argmax(1) if target.ndim == 2 else y
            with amp_context(device, cfg.amp):
                logits = model(x, labels=margin_labels if cfg.head != "linear" else None)
            loss = criterion(logits.float(), target)
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
        eval_model = ema.module if ema is not None else model
        report = evaluate(eval_model, valid_ds, cfg, device, n_classes)
        elapsed = time.perf_counter() - t0
        rows.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                     "valid_loss": report["loss"], "valid_acc": report["accuracy"],
                     "valid_balanced_acc": report["balanced_accuracy"], "lr": opt.param_groups[0]["lr"],
                     "seconds": round(elapsed, 2), "images_per_s": round(seen / elapsed, 1)})
        if epoch in avg:
            with store.atomic_path(out / f"epoch{epoch}.pt") as tmp:
                torch.save(eval_model.state_dict(), tmp)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "criterion": criterion.state_dict(), "epoch": epoch}
        if ema is not None:
            state["ema"] = ema.state_dict()
        with store.atomic_path(last) as tmp:
            torch.save(state, tmp)
        store.write_csv(out / "log.csv", pd.DataFrame(rows, columns=LOG_COLUMNS))

    if avg:
        final = average_checkpoints([out / f"epoch{e}.pt" for e in avg])
    else:
        final = (ema.module if ema is not None else model).state_dict()
    log = pd.DataFrame(rows, columns=LOG_COLUMNS)
    store.write_csv(out / "log.csv", log)
    with store.atomic_path(out / "model.pt") as tmp:
        torch.save(final, tmp)
    store.mark_done(out, params)
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
    folder = fold_dir(exp, fold)
    if not store.stage_done(folder):
        raise FileNotFoundError(f"{folder}: fold {fold} has not finished training (run stage 05 first)")
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
    device = torch.device(device)
    model = model.to(device).eval()
    dataset = ImageDataset(image_files, transform=build_transforms(image_size, False, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    out = []
    for batch in progress(loader, desc=desc, leave=False):
        x = batch["image"].to(device, non_blocking=True)
        with amp_context(device, amp):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(logits.cpu())
    n_out = getattr(getattr(model, "head", None), "out_features", 0)
    return torch.cat(out).numpy() if out else np.zeros((0, n_out), np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


def _posthoc(logits: np.ndarray, counts: list[int], tau: float) -> np.ndarray:
    if not tau:
        return logits
    from common.losses import class_prior

    return logit_adjust(logits, class_prior(np.maximum(counts, 1)).numpy(), tau).astype(np.float32)


def run_classification(cfg: ClassifierConfig, comp: Competition | None = None) -> dict[str, Any]:
    """The whole stage: folds, training, out-of-fold and test predictions, submission and metrics.

    Args:
        cfg: stage config.
        comp: the competition (opened from ``cfg.data`` when not given).

    Returns:
        The metrics written to ``05_classifier/metrics.json``.
    """
    from common.data import open_competition
    from common.train import crops_available, image_paths

    comp = comp if comp is not None else open_competition(cfg.data)
    folds = prepare_folds(cfg, comp)
    info = store.read_json(stage_dir(cfg.exp) / "classes.json")
    classes, counts = info["classes"], info["counts"]
    class_index = {c: i for i, c in enumerate(classes)}
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    logs = [train_fold(cfg, comp, folds, k).assign(fold=k) for k in cfg.fold_list()]
    train_seconds = float(sum(log["seconds"].sum() for log in logs))

    use_crops = cfg.use_crops and crops_available(cfg.exp)
    test_files = image_paths(comp.test, cfg.exp, "test", use_crops)
    oof_parts, test_logits = [], {}
    for k in cfg.fold_list():
        model, meta = load_classifier(cfg.exp, k, device)
        valid = folds[folds["fold"] == k].merge(comp.train[["image", "path"]], on="image", how="left")
        files = image_paths(valid, cfg.exp, "train", use_crops)
        args = dict(image_size=cfg.image_size, mean=meta["mean"], std=meta["std"], batch_size=2 * cfg.batch_size,
                    tta_flip=cfg.tta_flip, device=device, num_workers=cfg.num_workers, amp=cfg.amp)
        oof_parts.append((valid, predict_logits(model, files, desc=f"fold {k} out-of-fold", **args), k))
        test_logits[k] = (predict_logits(model, test_files, desc=f"fold {k} test", **args)
                          if len(test_files) else np.zeros((0, len(classes)), np.float32))

    out = stage_dir(cfg.exp)
    oof_images = [img for part, _, _ in oof_parts for img in part["image"]]
    oof_raw = np.concatenate([lg for _, lg, _ in oof_parts]).astype(np.float32)
    oof_label = np.array([class_index[c] for part, _, _ in oof_parts for c in part["label"]])
    oof_fold = np.concatenate([np.full(len(p), k) for p, _, k in oof_parts])
    oof_logits = _posthoc(oof_raw, counts, cfg.la_posthoc_tau)
    store.save_arrays(out / "oof.npz", oof_images, logits=oof_logits, probs=_softmax(oof_logits),
                      label=oof_label, fold=oof_fold)
    test_raw = np.mean([test_logits[k] for k in cfg.fold_list()], axis=0).astype(np.float32)
    per_fold = {f"probs_fold{k}": _softmax(_posthoc(lg, counts, cfg.la_posthoc_tau))
                for k, lg in test_logits.items()}
    test_adj = _posthoc(test_raw, counts, cfg.la_posthoc_tau)
    test_probs = np.mean(list(per_fold.values()), axis=0).astype(np.float32)
    store.save_arrays(out / "test.npz", list(comp.test["image"]), logits=test_adj, probs=test_probs, **per_fold)

    metrics: dict[str, Any] = {
        "label_column": cfg.label_column, "n_classes": len(classes), "folds": cfg.fold_list(),
        "final_weights": meta["final_weights"], "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "posthoc_tau": cfg.la_posthoc_tau,
        "oof": _report(oof_label, oof_logits, len(classes)),
    }
    if cfg.la_posthoc_tau:
        metrics["oof_no_posthoc"] = _report(oof_label, oof_raw, len(classes))
    truth = test_truth(comp, cfg.label_column)
    if truth is not None and len(test_files):
        labels = truth.reindex(comp.test["image"])
        scored = labels.notna().to_numpy() & labels.isin(class_index).to_numpy()
        if scored.any():
            y = np.array([class_index[c] for c in labels[scored]])
            metrics["test"] = _report(y, test_probs[scored], len(classes))
            metrics["test_by_fold"] = {str(k): _report(y, p[scored], len(classes))
                                       for k, p in ((k, per_fold[f"probs_fold{k}"]) for k in cfg.fold_list())}
            if cfg.la_posthoc_tau:
                raw_probs = np.mean([_softmax(test_logits[k]) for k in cfg.fold_list()], axis=0)
                metrics["test_no_posthoc"] = _report(y, raw_probs[scored], len(classes))
            metrics["test_unscored"] = int((~scored).sum())
    if len(test_files):
        top5 = np.argsort(-test_probs, axis=1, kind="stable")[:, :5]
        sub = pd.DataFrame({"image": comp.test["image"],
                            "predictions": [" ".join(classes[i] for i in row) for row in top5]})
        store.write_csv(paths.submission_path(f"{cfg.exp}-classifier"), sub)
    store.write_json(out / "metrics.json", metrics)
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", {"classifier": headline(metrics)})
    store.mark_done(out, cfg.fingerprint())
    return metrics


def _report(y: np.ndarray, scores: np.ndarray, n_classes: int) -> dict[str, Any]:
    rep = classification_report(y, scores, n_classes)
    rep["per_class_recall"] = [None if r is None else round(r, 4) for r in rep["per_class_recall"]]
    return rep


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few figures worth a line: out-of-fold and test accuracy and balanced accuracy."""
    out = {"oof_accuracy": metrics["oof"]["accuracy"], "oof_balanced_accuracy": metrics["oof"]["balanced_accuracy"]}
    if "test" in metrics:
        out.update(test_accuracy=metrics["test"]["accuracy"],
                   test_balanced_accuracy=metrics["test"]["balanced_accuracy"])
    return out


def training_logs(exp: str, folds_run: list[int]) -> pd.DataFrame:
    """Every requested fold's ``log.csv`` stacked, with a ``fold`` column (for the training-curve plot)."""
    return pd.concat([pd.read_csv(fold_dir(exp, k) / "log.csv").assign(fold=k) for k in folds_run],
                     ignore_index=True)


def class_summary(exp: str) -> pd.DataFrame:
    """Classes in logit order with their training-image counts (from ``classes.json``), most frequent first."""
    info = store.read_json(stage_dir(exp) / "classes.json")
    table = pd.DataFrame({"class": info["classes"], "images": info["counts"]})
    return table.sort_values("images", ascending=False, kind="stable").set_index("class")


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per scored set (out-of-fold, test, with and without post-hoc adjustment, per fold)."""
    rows = {}
    for key, rep in metrics.items():
        if isinstance(rep, dict) and "accuracy" in rep:
            rows[key] = rep
    for fold, rep in metrics.get("test_by_fold", {}).items():
        rows[f"test, fold {fold} model"] = rep
    cols = ["accuracy", "balanced_accuracy", "top5", "n"]
    return pd.DataFrame({k: {c: v[c] for c in cols} for k, v in rows.items()}).T.rename_axis("scored on")
