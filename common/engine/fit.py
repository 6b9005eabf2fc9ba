"""One training loop for stages 02 and 05: :func:`fit` runs one fold of a :class:`Task`, resumable after a kill.

The loop is the same for the embedder (:class:`common.engine.embedder.EmbedderTask`) and the classifier
(:class:`common.engine.classifier.ClassifierTask`), in the spirit of wildlife-tools' ``BasicTrainer`` with
injected parts (https://github.com/WildlifeDatasets/wildlife-tools, ``wildlife_tools/train/trainer.py``):

* skip a finished fold, refuse a fold or a ``last.pt`` of other parameters (:mod:`common.core.checkpoint`);
* one process, or one of ``nproc`` DDP processes (:mod:`common.core.distributed`): each trains its share of every
  global batch, the epoch sums are all-reduced, rank 0 evaluates and writes;
* seed ``seed + fold`` before the model is built, and ``(seed + fold) * 1000 + epoch`` at the start of every
  epoch, so a resumed run draws what an unbroken one does; the epoch's image order and each image's augmentation
  depend on ``(seed, epoch)`` only (:attr:`~common.data.competition.ImageDataset.sample_seed`);
* the loader workers never wait for the loop to ask: the first epoch's start loading while the model is built,
  and each next epoch's while the last one validates (a small set's epoch is a few batches, and without this the
  workers' first batch, made while the model sits idle, is a large share of it);
* AdamW (or RAdam) with the neck and heads at ``head_lr_mult`` x ``lr``, a linear warmup then a cosine to zero
  stepped every batch, AMP with a GradScaler on CUDA fp16;
* after every epoch ``last.pt`` (model, optimiser, scheduler, scaler and the task's own state), ``log.csv`` and,
  when the task asks, ``epoch{N}.pt``; at the end ``model.pt`` (the task's final weights) and ``_done.json``.

A task holds what really differs between the stages, as hook methods of :class:`Task`: the loss (:meth:`Task.loss`),
the sample order (:meth:`Task.epoch_order`), per-step work such as an EMA (:meth:`Task.after_step`,
:meth:`Task.eval_model`), extra state in the checkpoint (:meth:`Task.setup`) and the final weights
(:meth:`Task.epoch_weights`, :meth:`Task.final_weights`); plus what it trains on and how it is scored
(:meth:`Task.describe`, :meth:`Task.build_model`, :meth:`Task.datasets`, :meth:`Task.validate`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from common.config import TrainConfig
from common.core import checkpoint, distributed, paths, store, tracking
from common.core.runtime import (
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
from common.data.competition import Competition
from common.data.fingerprint import model_data, training_inputs

StateDict = dict[str, torch.Tensor]


class Task:
    """What one training stage adds to :func:`fit`; subclasses override the hooks (defaults: a plain shuffle, no
    per-step work, no extra state, the last epoch's weights).

    Hooks are called in this order: :meth:`describe`, :meth:`datasets`, :meth:`epoch_order` (of the first epoch:
    its batches load while the model is built), :meth:`build_model`, :meth:`initialise` (a fold started from
    scratch, rank 0), :meth:`setup`; then per epoch
    :meth:`start_epoch`, per batch :meth:`loss` and :meth:`after_step`, then :meth:`epoch_order` of the next epoch
    (its batches load while this one validates), :meth:`eval_model`, :meth:`validate` (rank 0) and
    :meth:`epoch_weights`; at the end :meth:`final_weights` (rank 0).

    Args:
        cfg: the stage config (every hook reads it as ``self.cfg``).

    Attributes:
        fold: the fold being trained (set by :func:`fit` before the first hook).
        stage: ``"02"`` or ``"05"``: the fold folders are ``working/<exp>/<stage folder>/fold{k}``.
        model_fields: config fields that change the trained model: a finished or resumed fold must agree on them.
        valid_columns: the log columns :meth:`validate` returns, after ``train_loss`` and ``train_acc``.
        optimizer: ``adamw`` or ``radam`` (decoupled weight decay).
        eval_batch_size: validation batch size.
    """

    stage: ClassVar[str] = ""
    model_fields: ClassVar[tuple[str, ...]] = ()
    valid_columns: ClassVar[tuple[str, ...]] = ("valid_loss", "valid_acc")

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.fold = 0
        self.optimizer = "adamw"
        self.eval_batch_size = cfg.batch_size

    @classmethod
    def log_columns(cls) -> list[str]:
        """The columns of ``log.csv``, in order."""
        return ["epoch", "train_loss", "train_acc", *cls.valid_columns, "lr", "seconds", "images_per_s"]

    def fold_dir(self, fold: int) -> Path:
        """``working/<exp>/<stage folder>/fold{fold}``."""
        return fold_dir(self.cfg.exp, self.stage, fold)

    # ------------------------------------------------------------------------------------------ set-up hooks
    def data_identity(self, comp: Competition) -> dict[str, Any]:
        """What a fold was trained on besides its parameters: the competition's train table and image names and
        sizes (``data_fingerprint``) and the earlier stages' outputs it read (``upstream``: crops, a teacher).
        Stored with the fold; a finished or half-trained fold of other data is refused, not reused.

        Args:
            comp: the validated competition.
        """
        return {"data_fingerprint": model_data(comp.root), "upstream": training_inputs(self.cfg)}

    def describe(self, comp: Competition, fit: pd.DataFrame) -> dict[str, Any]:
        """The fold's classes (``classes``, ``class_counts``) and anything else the model needs, written to
        ``config.json``; also loads what training needs besides the images (it may raise before the model is
        built).

        Args:
            comp: the validated competition.
            fit: the fold's training rows (with ``path``).
        """
        raise NotImplementedError

    def build_model(self, meta: dict[str, Any]) -> nn.Module:
        """The model ``config.json``'s ``meta`` describes (weights not loaded); it has ``backbone_parameters()``
        and ``head_parameters()`` (the two learning rates)."""
        raise NotImplementedError

    def initialise(self, model: nn.Module, meta: dict[str, Any], device: torch.device) -> None:
        """Change the new model's weights before training (e.g. stage 05's ``probe_init``: a head fitted on the
        frozen backbone's features). Called once per fold, on rank 0 only, when the fold starts from scratch
        (never on resume: ``last.pt`` holds the weights then), after :meth:`build_model` and before
        :meth:`setup`; under DDP the other processes get rank 0's weights when the model is wrapped.

        Args:
            model: the model on ``device``.
            meta: the fold's ``config.json`` (with ``classes``, ``mean`` and ``std``).
            device: where the model is.
        """

    def setup(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        """Objects the task needs during training, built once the model is on ``device``; returns those whose
        ``state_dict()`` goes into ``last.pt`` besides the model's, by name (``None`` values are skipped)."""
        return {}

    def datasets(self, fit: pd.DataFrame, valid: pd.DataFrame, meta: dict[str, Any]
                 ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        """Training and validation datasets of the fold's rows (``meta`` as written to ``config.json``, with
        ``mean`` and ``std``); training items are dicts with ``image`` and ``label``, and the training dataset
        has a ``sample_seed`` attribute (set every epoch). Called before the model is built."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ epoch hooks
    def epoch_order(self, epoch: int, n: int) -> list[int]:
        """The epoch's sample order over ``n`` training items (every process gets the same list).

        Called ahead of the epoch: before the model is built (the first epoch) or while the previous epoch
        validates. The order may depend on the epoch and on what :meth:`describe` set, not on the model or the
        training state; work at the start of the epoch itself goes in :meth:`start_epoch`.
        """
        return distributed.epoch_order(n, self.cfg.seed * 1000 + epoch)

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch, before its first batch (e.g. to seed the epoch's own draws)."""

    def loss(self, train_model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, logits, labels)`` of one batch: the scalar loss to back-propagate, and the logits and
        labels that count as correct when they agree (for ``train_acc``).

        Args:
            train_model: the model to call (DDP-wrapped or compiled when asked).
            x: images on the device, in the training memory format.
            y: integer labels on the device.
            batch: the whole batch as loaded (other fields, on the CPU).
        """
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. to update an EMA of ``model``)."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to validate and to save per epoch (the trained one, or e.g. its EMA)."""
        return model

    def validate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device
                 ) -> dict[str, float]:
        """The :attr:`valid_columns` over ``loader`` (in order, not empty), ``model`` in eval mode.

        Feed the model ``self.images(batch, device)``: the layout it was trained in."""
        raise NotImplementedError

    def images(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """``batch["image"]`` on ``device``, channels-last when ``cfg.channels_last`` (the layout the model's
        weights are in: :func:`common.core.runtime.to_memory_format`), for training and validation alike."""
        return to_memory_format(batch["image"].to(device, non_blocking=True), device, self.cfg.channels_last)

    def epoch_weights(self, epoch: int, model: nn.Module) -> StateDict | None:
        """Weights to keep as ``epoch{N}.pt`` after epoch ``epoch`` (``None``: none)."""
        return None

    def final_weights(self, out: Path, model: nn.Module) -> StateDict:
        """The weights written to ``model.pt`` (the fold folder ``out`` holds the ``epoch{N}.pt`` files)."""
        return model.state_dict()


# ------------------------------------------------------------------------------------------ shared pieces
def fold_dir(exp: str, stage: str, fold: int) -> Path:
    """``working/<exp>/<stage folder>/fold{fold}``, where :func:`fit` writes fold ``fold`` of ``stage``."""
    return paths.stage_dir(exp, stage) / f"fold{fold}"


def load_fold(exp: str, stage: str, fold: int, build, device: torch.device | str = "cpu"
              ) -> tuple[nn.Module, dict[str, Any]]:
    """A finished fold's final model (``model.pt``, eval mode, on ``device``) and its ``config.json`` metadata.

    Read where it is: this run's ``working/``, else an attached Kaggle dataset (found by experiment name).

    Args:
        exp: experiment name.
        stage: ``"02"`` or ``"05"``.
        fold: the fold.
        build: ``build(meta, pretrained="none")`` makes the (untrained) model ``config.json`` describes.
        device: where to put the model.
    """
    hint = f"fold {fold} has not finished training (run stage {stage} first)"
    folder = paths.find_stage_dir(exp, stage, f"fold{fold}/_done.json", hint=hint) / f"fold{fold}"
    meta = store.read_json(folder / "config.json")
    model = build(meta, pretrained="none")
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


def eval_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, device: torch.device
                ) -> torch.utils.data.DataLoader:
    """An evaluation loader: in order, no augmentation randomness (training batches come from
    :func:`common.core.distributed.epoch_loader`)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda", worker_init_fn=worker_init)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, task: Task, device: torch.device
             ) -> dict[str, float]:
    """``task``'s validation metrics of ``model`` on ``dataset`` (NaN for an empty dataset).

    Args:
        model: the plain (not DDP-wrapped) model.
        dataset: validation items.
        task: supplies the batch size and :meth:`Task.validate`.
        device: where to run.
    """
    if len(dataset) == 0:
        return dict.fromkeys(task.valid_columns, float("nan"))
    model.eval()
    return task.validate(model, eval_loader(dataset, task.eval_batch_size, task.cfg.num_workers, device), device)


def build_optimizer(model: nn.Module, cfg: TrainConfig, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW or RAdam (decoupled weight decay) with the backbone at ``lr`` and the head at ``head_lr_mult`` x ``lr``.

    Args:
        model: has ``backbone_parameters()`` and ``head_parameters()``.
        cfg: ``lr``, ``head_lr_mult``, ``weight_decay``.
        name: ``adamw`` or ``radam``.
    """
    groups = [{"params": list(model.backbone_parameters()), "lr": cfg.lr},
              {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult}]
    if name == "radam":
        return torch.optim.RAdam(groups, weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
    if name != "adamw":
        raise ValueError(f"optimizer={name!r}: use adamw or radam")
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _epoch_batches(task: Task, dataset: torch.utils.data.Dataset, epoch: int, info: distributed.DistInfo,
                   device: torch.device):
    """Epoch ``epoch``'s training batches, already loading: the loader's iterator, started (``iter()``) with the
    epoch's augmentation seed and order set, so its workers make batches before the loop asks for the first.

    Starting it draws nothing from the global RNGs (the loader has its own generator), so where the loop starts
    it does not change what the model draws.
    """
    cfg = task.cfg
    dataset.sample_seed = cfg.seed * 1000 + epoch  # read by the workers when they start, i.e. now
    order = task.epoch_order(epoch, len(dataset))
    loader = distributed.epoch_loader(dataset, order, cfg.batch_size, info, cfg.num_workers, device,
                                      seed=(cfg.seed + task.fold) * 1000 + epoch)
    return iter(loader)


def _save_weights(path: Path, state: StateDict) -> None:
    with store.atomic_path(path) as tmp:
        torch.save(state, tmp)


# ------------------------------------------------------------------------------------------ the loop
def fit(task: Task, comp: Competition, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Train (or resume, or skip when finished) one fold of ``task``; returns its per-epoch log.

    Args:
        task: the stage's :class:`Task`, holding its config as ``task.cfg``.
        comp: the validated competition.
        folds: the stage's fold table (``image``, ``fold`` and the label columns the task reads).
        fold: the fold used for validation.
    """
    cfg = task.cfg
    task.fold = fold
    out = task.fold_dir(fold)
    config = cfg.to_dict()
    params = {k: config[k] for k in task.model_fields}
    identity = task.data_identity(comp)  # a model of other data (or other crops, another teacher) is not reused
    params.update(identity)
    defaults = type(cfg).defaults()  # a model field added since a fold finished, left at its default, is no change
    done = checkpoint.finished_log(out, params, cfg.force, defaults)
    if done is not None:
        return done

    device = resolve_device(cfg.device)
    info = distributed.setup(device, cfg.batch_size, cfg.sync_bn)  # one process unless launched by torchrun
    device = distributed.process_device(device, info)
    configure_device(device)
    seed_everything(cfg.seed + fold)
    fit_rows, valid_rows, used_crops = fold_split(cfg, comp, folds, fold)
    checkpoint.check_resumable(out, params, defaults)
    start_epoch = checkpoint.saved_epoch(out)
    mean, std = backbone_normalization(cfg.backbone, cfg.pretrained)
    meta = {"config": config, "fold": fold, **task.describe(comp, fit_rows), "mean": list(mean), "std": list(std),
            "used_crops": used_crops, "n_fit": len(fit_rows), "n_valid": len(valid_rows),
            "model_fields": sorted(task.model_fields)}
    meta.update(identity)
    if info.is_main:
        store.write_json(out / "config.json", meta)

    fit_ds, valid_ds = task.datasets(fit_rows, valid_rows, meta)
    upcoming = _epoch_batches(task, fit_ds, start_epoch + 1, info, device) if start_epoch < cfg.epochs else None
    model = distributed.prepare_model(task.build_model(meta), info, device, cfg.sync_bn, cfg.channels_last)
    if start_epoch == 0 and info.is_main:
        task.initialise(model, meta, device)
    extra_state = task.setup(model, device)
    opt = build_optimizer(model, cfg, task.optimizer)
    steps_per_epoch = distributed.ShardSampler(range(len(fit_ds)), cfg.batch_size).n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))

    training_state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, **extra_state}
    resumed, rows = checkpoint.resume(out, training_state)
    if resumed != start_epoch:
        raise RuntimeError(f"{out / 'last.pt'} changed while this run started (epoch {start_epoch}, now {resumed}): "
                           "is another run training this fold?")
    train_model = distributed.wrap(model, info, device, cfg.compile)  # DDP across processes, else `model`
    columns = task.log_columns()

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        # Reseed global RNGs (dropout, drop-path) each epoch: a resumed run draws what an unbroken one does;
        # the epoch's image order and each image's augmentation depend on (seed, epoch) only, so they are the
        # same for any number of processes and loader workers.
        seed_everything((cfg.seed + fold) * 1000 + epoch)
        task.start_epoch(epoch)
        set_train_mode(model, cfg.norm_eval)
        total_loss = correct = seen = 0.0
        bar = progress(upcoming, desc=f"fold {fold} epoch {epoch}/{cfg.epochs}", leave=False, disable=not info.is_main)
        for batch in bar:
            x = task.images(batch, device)
            y = batch["label"].to(device, non_blocking=True)
            loss, logits, labels = task.loss(train_model, x, y, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            task.after_step(model)
            n = len(y)
            total_loss += loss.item() * n
            correct += (logits.argmax(1) == labels).sum().item()
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        # The next epoch's workers start now, and fill their queues while this epoch validates and saves.
        upcoming = _epoch_batches(task, fit_ds, epoch + 1, info, device) if epoch < cfg.epochs else None
        total_loss, correct, seen = distributed.all_sum([total_loss, correct, seen], info, device)
        eval_model = task.eval_model(model)
        # Validation on rank 0 with the plain model (a DDP forward on one rank alone would wait for the others),
        # every `validate_every` epochs and after the last one; the other rows log NaN.
        validate = info.is_main and (epoch % cfg.validate_every == 0 or epoch == cfg.epochs)
        report = (evaluate(eval_model, valid_ds, task, device) if validate
                  else dict.fromkeys(task.valid_columns, float("nan")))
        elapsed = time.perf_counter() - t0
        rows.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                     **report, "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed, 2),
                     "images_per_s": round(seen / elapsed, 1)})
        if info.is_main:  # only rank 0 writes; epoch{N}.pt before last.pt, so a resumed run never misses one
            weights = task.epoch_weights(epoch, model)
            if weights is not None:
                _save_weights(out / f"epoch{epoch}.pt", weights)
            checkpoint.save_state(out, epoch, training_state)
            store.write_csv(out / "log.csv", pd.DataFrame(rows, columns=columns))
        tracking.report_epoch(task.stage, fold, epoch, rows[-1])  # Optuna pruning in sweeps; a no-op otherwise

    log = pd.DataFrame(rows, columns=columns)
    if info.is_main:
        store.write_csv(out / "log.csv", log)  # also when epochs=0 (the untrained baseline)
        _save_weights(out / "model.pt", task.final_weights(out, model))
        store.mark_done(out, params)
    distributed.barrier(info)  # the next fold starts when rank 0 has written this one
    return log
