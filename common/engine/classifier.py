"""Stage 05's training: a timm classifier with the winning solutions' tricks, as a task of the shared loop
(:func:`common.engine.fit.fit`, which also does resuming, DDP, AMP, the schedule and the checkpoints).

Every trick is one :class:`~common.config.ClassifierConfig` field; :class:`ClassifierTask` only wires them in:

* head (``linear``, ``arcface``, ``subcenter`` + ``dynamic_margin``): :class:`common.lib.models.ClassifierModel` on
  :class:`common.lib.heads.ArcMarginProduct`;
* Partial FC (``partial_fc``: each batch scores a sample of the classes): :func:`common.lib.heads.sample_classes`;
* loss, logit adjustment, distillation targets: :mod:`common.lib.losses`;
* LP-FT (``probe_init``: the head starts as a logistic regression on the frozen features): :mod:`common.lib.probe`;
* class-balanced sampling: :mod:`common.lib.sampling`; CutMix / Mixup: :mod:`common.lib.mixing`;
* EMA and checkpoint averaging: :mod:`common.lib.averaging`;
* AdamW / RAdam with a per-batch warmup + cosine schedule and a head learning-rate multiplier: the loop's.

Per fold ``k`` the folder ``working/<exp>/05_classifier/fold{k}/`` holds ``config.json``, ``last.pt`` (model,
optimiser, scheduler, scaler, EMA and loss state after the last finished epoch: a killed run resumes from it and
ends bit-identical to an unbroken one), ``epoch{N}.pt`` (the weights of the epochs to average), ``model.pt`` (the
final weights: the average, else the EMA, else the last epoch's), ``log.csv``, ``probe.json`` (``probe_init``) and
``_done.json``.
The stage as a whole (predictions, metrics, submission) is :mod:`common.stages.train_classifier`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ClassifierConfig
from common.core import paths, store
from common.core.runtime import amp_context
from common.data.artefacts import assign_folds
from common.data.competition import Competition, DataError, ImageDataset, build_transforms
from common.engine import fit as engine
from common.engine.fit import Task
from common.engine.predict import forward_images
from common.lib.averaging import ModelEma, average_checkpoints, select_checkpoints
from common.lib.heads import class_columns, margins_from_config, sample_classes
from common.lib.losses import build_criterion, distillation_loss, mix_hard_soft, to_soft_targets
from common.lib.metrics import classification_report
from common.lib.mixing import BatchMixer
from common.lib.models import ClassifierModel
from common.lib.probe import fit_linear_probe
from common.lib.sampling import ClassBalancedSampler
from common.lib.topk import Scores, TopK, read_scores, remap, to_dense

STAGE = "05"
# Fields that change the trained model: a resumed fold must agree on all of them.
_MODEL_FIELDS = ClassifierConfig.model_fields()  # tagged model=True where declared


def build_model(meta: dict[str, Any], pretrained: str | None = None) -> ClassifierModel:
    """The model a fold's ``config.json`` describes (weights not loaded)."""
    cfg = meta["config"]
    margins = None
    if cfg["head"] != "linear" and cfg["dynamic_margin"]:
        margins = margins_from_config(np.maximum(meta["class_counts"], 1), cfg)
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
    return engine.fold_dir(exp, STAGE, fold)


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


def prepare_folds(cfg: ClassifierConfig, comp: Competition) -> pd.DataFrame:
    """Fold table ``image, label, fold`` (stratified by class), written to ``folds.csv``, with
    ``classes.json``; checks every requested fold has training and validation images before training."""
    table = assign_folds(label_table(comp, cfg.label_column), "label", cfg)
    counts = table["label"].value_counts()
    classes = sorted(counts.index)
    store.write_csv(stage_dir(cfg.exp) / "folds.csv", table[["image", "label", "fold"]])
    store.write_json(stage_dir(cfg.exp) / "classes.json", {
        "label_column": cfg.label_column, "classes": classes,
        "counts": [int(counts[c]) for c in classes]})
    return table[["image", "label", "fold"]]


def teacher_targets(cfg: ClassifierConfig, images: list[str], classes: list[str]) -> Scores:
    """The teacher's out-of-fold probabilities for ``images``, columns reordered to ``classes``.

    A dense ``oof.npz`` gives a float32 ``len(images) x C`` array. A top-k one (:mod:`common.lib.topk`) stays a
    :class:`~common.lib.topk.TopK` (``len(images) x k``): :func:`soft_batch` makes one batch's rows dense, the
    rest mass shared equally by the classes a row does not keep. At Happywhale's size (51k images x 15.5k
    individuals) the dense matrix would take 3.2 GB; the top-k rows take ``k / C`` of it.

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
    rows = np.array([index[img] for img in images], dtype=np.int64)
    probs = read_scores(oof, len(teacher_classes), "probs", source=str(folder / "oof.npz"))
    position = {c: j for j, c in enumerate(classes)}
    if isinstance(probs, TopK):  # teacher class j is student class col_map[j]
        col_map = np.array([position[c] for c in teacher_classes], dtype=np.int64)
        return remap(probs, rows, col_map, len(classes))
    order = [teacher_classes.index(c) for c in classes]
    return np.ascontiguousarray(probs[rows][:, order], dtype=np.float32)


def soft_batch(soft: Scores, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The soft targets of one batch (rows ``index`` of :func:`teacher_targets`), dense ``(B, C)`` float32."""
    rows = index.cpu().numpy()
    return torch.from_numpy(to_dense(soft[rows], spread_rest=True).astype(np.float32, copy=False)).to(device)


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their row number (to look up per-image soft targets)."""

    def __init__(self, base: ImageDataset) -> None:
        self.base = base
        self.transform = base.transform  # worker_init reseeds it

    @property
    def sample_seed(self) -> int | None:
        """The base dataset's per-epoch augmentation seed (:attr:`ImageDataset.sample_seed`)."""
        return self.base.sample_seed

    @sample_seed.setter
    def sample_seed(self, value: int | None) -> None:
        self.base.sample_seed = value

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[i], "index": torch.tensor(i)}


def averaged_epochs(cfg: ClassifierConfig) -> list[int]:
    """The epochs whose weights are averaged into the final model (empty: no averaging)."""
    if not cfg.avg_last and not cfg.avg_epochs:
        return []
    return select_checkpoints(list(range(1, cfg.epochs + 1)), last_n=cfg.avg_last, epochs=cfg.avg_epochs)


# ----------------------------------------------------------------------------------------- training
class ClassifierTask(Task):
    """Stage 05 for :func:`~common.engine.fit.fit`: the classes of ``classes.json``, the configured criterion with
    CutMix/Mixup and distillation, a class-balanced or plain order, a per-step EMA, and the final weights chosen
    by :func:`averaged_epochs` / ``ema_decay``; validation loss, accuracy and balanced accuracy."""

    stage = STAGE
    model_fields = _MODEL_FIELDS
    valid_columns = ("valid_loss", "valid_acc", "valid_balanced_acc")
    cfg: ClassifierConfig

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__(cfg)
        self.optimizer = cfg.optimizer
        self.eval_batch_size = 2 * cfg.batch_size
        self.avg = averaged_epochs(cfg)
        self.ema: ModelEma | None = None
        self.soft: Scores | None = None  # teacher_targets: dense, or top-k rows made dense per batch
        self.aux: torch.Tensor | None = None  # auxiliary-head labels of the training rows (aux_column)
        self.sampler: ClassBalancedSampler | None = None
        self.pfc_generator: torch.Generator | None = None  # Partial FC's class draws (partial_fc > 0)

    def describe(self, comp: Competition, fit: pd.DataFrame) -> dict[str, Any]:
        cfg = self.cfg
        classes = store.read_json(stage_dir(cfg.exp) / "classes.json")["classes"]
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.y_fit = np.array([self.class_index[c] for c in fit["label"]])
        self.fit_paths = list(fit["path"])
        # A class absent from this fold's training part still has a logit; priors and margins count it once.
        self.counts = fit["label"].value_counts().reindex(classes).fillna(0).astype(int).to_numpy()
        self.mixer = BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, seed=cfg.seed * 1000 + self.fold)
        if cfg.sampler != "random":  # built here: the first epoch's order is drawn before the model is built
            self.sampler = ClassBalancedSampler(self.y_fit, power=1.0 if cfg.sampler == "balanced" else 0.5,
                                                seed=cfg.seed * 1000 + self.fold)
        if cfg.distill_from and cfg.distill_mode == "kd" and self.mixer.enabled:
            raise ValueError("distill_mode=kd with CutMix/Mixup is not supported: the teacher saw unmixed images; "
                             "use distill_mode=mix (its soft targets are mixed with the images)")
        if cfg.distill_from:  # read before the model is built: a missing teacher fails in a second
            self.soft = teacher_targets(cfg, list(fit["image"]), classes)
        extra: dict[str, Any] = {}
        if cfg.aux_column:  # auxiliary head (e.g. coarse classes): one label per training image, by row
            if self.mixer.enabled:
                raise ValueError("aux_column with CutMix/Mixup is not supported: the auxiliary labels are not mixed")
            aux_table = label_table(comp, cfg.aux_column).set_index("image")["label"]
            extra["aux_classes"] = sorted(aux_table.unique())
            self.aux = torch.tensor(aux_table.reindex(fit["image"]).map(
                {c: i for i, c in enumerate(extra["aux_classes"])}).to_numpy(dtype=np.int64))
        return {"classes": classes, "class_counts": self.counts.tolist(), "averaged_epochs": self.avg,
                "final_weights": ("average of epochs " + ",".join(map(str, self.avg)) if self.avg
                                  else "EMA" if cfg.ema_decay else "last epoch"), **extra}

    def build_model(self, meta: dict[str, Any]) -> ClassifierModel:
        return build_model(meta)  # the module function, looked up at call time (tests replace it)

    def initialise(self, model: nn.Module, meta: dict[str, Any], device: torch.device) -> None:
        """``probe_init`` (LP-FT): the linear head, and the auxiliary head if any, start as logistic regressions
        fitted on the frozen backbone's pooled features of this fold's training images (:mod:`common.lib.probe`);
        ``probe.json`` in the fold folder records the fit."""
        cfg = self.cfg
        if not cfg.probe_init:
            return
        t0 = time.perf_counter()
        model.eval()
        features = forward_images(model.features, self.fit_paths, cfg.image_size, meta["mean"], meta["std"],
                                  self.eval_batch_size, tta_flip=False, device=device, num_workers=cfg.num_workers,
                                  amp=cfg.amp, amp_cpu=cfg.amp_cpu, desc=f"fold {self.fold} probe features",
                                  n_out=model.num_features)
        heads = [("head", model.head, self.y_fit, len(meta["classes"]))]
        if self.aux is not None:
            heads.append(("aux_head", model.aux_head, self.aux.numpy(), len(meta["aux_classes"])))
        record: dict[str, Any] = {"images": len(features), "l2": cfg.probe_l2}
        for name, head, labels, n_classes in heads:
            probe = fit_linear_probe(features, labels, n_classes, l2=cfg.probe_l2)
            with torch.no_grad():
                head.weight.copy_(torch.from_numpy(probe.weight))
                head.bias.copy_(torch.from_numpy(probe.bias))
            record[name] = {"train_accuracy": round(probe.train_accuracy, 4), "iterations": probe.iterations,
                            "converged": probe.converged}
        record["seconds"] = round(time.perf_counter() - t0, 1)
        store.write_json(self.fold_dir(self.fold) / "probe.json", record)

    def setup(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        cfg = self.cfg
        self.n_classes = len(self.class_index)
        self.ema = ModelEma(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay else None
        self.criterion = build_criterion(
            cfg.loss, self.n_classes, np.maximum(self.counts, 1), label_smoothing=cfg.label_smoothing,
            focal_gamma=cfg.focal_gamma, eql_tau=cfg.eql_tau, la_tau=cfg.la_loss_tau).to(device)
        if cfg.partial_fc:
            self.pfc_generator = torch.Generator()  # seeded per epoch in epoch_order: a resumed run draws the same
        return {"criterion": self.criterion, "ema": self.ema}

    def datasets(self, fit: pd.DataFrame, valid: pd.DataFrame, meta: dict[str, Any]
                 ) -> tuple[_Indexed, ImageDataset]:
        cfg, mean, std = self.cfg, meta["mean"], meta["std"]
        train_tf = build_transforms(cfg.image_size, True, mean, std, scale_min=cfg.rrc_scale_min, hflip=cfg.hflip)
        known = valid[valid["label"].isin(self.class_index)]
        return (_Indexed(ImageDataset(fit["path"], self.y_fit, transform=train_tf)),
                ImageDataset(known["path"], [self.class_index[c] for c in known["label"]],
                             transform=build_transforms(cfg.image_size, False, mean, std)))

    def epoch_order(self, epoch: int, n: int) -> list[int]:
        if self.sampler is None:
            return super().epoch_order(epoch, n)
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def start_epoch(self, epoch: int) -> None:
        self.mixer.set_epoch(epoch)
        if self.pfc_generator is not None:
            self.pfc_generator.manual_seed((self.cfg.seed * 1000 + self.fold) * 1000 + epoch)
        self.criterion.train()

    def loss(self, train_model, x, y, batch):
        cfg, soft, n_classes = self.cfg, self.soft, self.n_classes
        target: torch.Tensor = y
        if soft is not None and cfg.distill_mode == "mix":
            target = mix_hard_soft(y, soft_batch(soft, batch["index"], x.device), n_classes, cfg.distill_weight)
        if self.mixer.enabled:
            x, target = self.mixer(x, to_soft_targets(target, n_classes))
        # ArcFace heads put the margin on the dominant class of a mixed target.
        margin_labels = target.argmax(1) if target.ndim == 2 else y
        extra: dict[str, Any] = {"return_aux": True} if self.aux is not None else {}
        if self.pfc_generator is not None and cfg.partial_fc < n_classes:  # Partial FC: a sample of the classes
            present = target.sum(0).nonzero().view(-1) if target.ndim == 2 else target
            extra["classes"] = classes = sample_classes(present, n_classes, cfg.partial_fc, self.pfc_generator)
            target = target[:, classes] if target.ndim == 2 else class_columns(classes, target)
        with amp_context(x.device, cfg.amp, cfg.amp_cpu):
            logits = train_model(x, labels=margin_labels if cfg.head != "linear" else None, **extra)
        if "classes" in extra:  # the logits' columns are the sampled classes: count train_acc in them
            margin_labels = class_columns(extra["classes"], margin_labels) if target.ndim == 2 else target
        if self.aux is not None:  # auxiliary head: one cross-entropy term on its classes
            logits, aux_logits = logits
        loss = self.criterion(logits.float(), target)
        if self.aux is not None:
            loss = loss + cfg.aux_weight * F.cross_entropy(aux_logits.float(), self.aux[batch["index"]].to(x.device))
        if soft is not None and cfg.distill_mode == "kd":
            kd = distillation_loss(logits, soft_batch(soft, batch["index"], x.device), cfg.distill_temperature)
            loss = (1.0 - cfg.distill_weight) * loss + cfg.distill_weight * kd
        return loss, logits, margin_labels

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.ema.module if self.ema is not None else model

    def validate(self, model, loader, device):
        """Loss (no margin), accuracy and balanced accuracy on validation images of classes seen in training."""
        chunks = []
        for batch in loader:
            x = self.images(batch, device)
            with amp_context(device, self.cfg.amp, self.cfg.amp_cpu):  # as in training and in prediction
                chunks.append(model(x).float().cpu())
        logits = torch.cat(chunks)
        y = torch.as_tensor(loader.dataset.labels)
        rep = classification_report(y.numpy(), logits.numpy(), self.n_classes)
        return {"valid_loss": F.cross_entropy(logits, y).item(), "valid_acc": rep["accuracy"],
                "valid_balanced_acc": rep["balanced_accuracy"]}

    def epoch_weights(self, epoch: int, model: nn.Module):
        return self.eval_model(model).state_dict() if epoch in self.avg else None

    def final_weights(self, out: Path, model: nn.Module):
        if self.avg:
            return average_checkpoints([out / f"epoch{e}.pt" for e in self.avg])
        return self.eval_model(model).state_dict()


LOG_COLUMNS = ClassifierTask.log_columns()


def train_fold(cfg: ClassifierConfig, comp: Competition, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Train (or resume, or skip when finished) one fold; returns its per-epoch log (:func:`~common.engine.fit.fit`).

    Args:
        cfg: stage config.
        comp: the validated competition.
        folds: the table from :func:`prepare_folds`.
        fold: the fold used for validation.
    """
    return engine.fit(ClassifierTask(cfg), comp, folds, fold)


def load_classifier(exp: str, fold: int, device: torch.device | str = "cpu") -> tuple[ClassifierModel, dict]:
    """A finished fold's final model (eval mode) and its ``config.json`` metadata."""
    return engine.load_fold(exp, STAGE, fold, build_model, device)


@torch.no_grad()
def predict_logits(model: nn.Module, image_files: list[str], image_size: int, mean: list[float],
                   std: list[float], batch_size: int = 64, tta_flip: bool = True,
                   device: torch.device | str = "cpu", num_workers: int = 0, amp: bool = True,
                   desc: str = "predict", reduce: Callable[[np.ndarray], Any] | None = None,
                   channels_last: bool = True, amp_cpu: bool = False) -> np.ndarray | list[Any]:
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
        reduce: applied to each batch's logits; the list of its results is returned instead of the array
            (stage 05's top-k format: :func:`common.lib.topk.from_logits` per batch).
        channels_last: feed the batches in channels-last layout (faster on CUDA and the CPU).
        amp_cpu: with ``amp``, bf16 autocast on the CPU too.
    """
    model = model.to(torch.device(device)).eval()
    return forward_images(model, image_files, image_size, mean, std, batch_size, tta_flip, device, num_workers,
                          amp, desc, n_out=getattr(getattr(model, "head", None), "out_features", 0), reduce=reduce,
                          channels_last=channels_last, amp_cpu=amp_cpu)
