"""Field groups that several stages share, each declared once.

* :class:`FoldConfig`: the per-fold stages (02-05);
* :class:`TrainConfig`: the two training stages (02 embedder, 05 classifier): the network, the optimiser and
  schedule, the ArcFace head and its margins, augmentation, processes and GPU speed-ups;
* :class:`SweepFields`: the retrieval search and ``new_individual`` threshold sweep (stages 04 and 06).

A name means the same thing in every stage that has it; per-stage values are set with ``<stage>.<name>``
(see :mod:`common.config.params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from common.config.base import StageConfig, param


@dataclasses.dataclass(frozen=True)
class FoldConfig(StageConfig):
    """Fields of the stages that work per fold (02-05)."""

    n_folds: int = param(5, "number of folds, stratified by individual (stage 05: by class).", model=True)
    folds: str = param("0", "which folds to run: all or a comma list such as 0 or 0,2.")
    fold_seed: int = param(-1, "seed of the fold split, of the individuals each fold treats as new and of the "
                           "max_images draw (-1: seed). Give models trained with other seeds one fold_seed, so that "
                           "stage 06 can ensemble their out-of-fold outputs (it needs one split).", model=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2 (got {self.n_folds}): fold k is validation for model k")
        self.fold_list()  # validates `folds`

    def split_seed(self) -> int:
        """The seed of the fold split: ``fold_seed``, or ``seed`` when it is -1."""
        return self.seed if self.fold_seed < 0 else self.fold_seed

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

    def model_folds(self) -> list[int]:
        """The models to train or use: :meth:`fold_list`, then, with ``full_fit`` (:class:`FullFitField`), the
        model trained on every training image, numbered ``n_folds`` (its folder is ``fold{n_folds}``)."""
        return self.fold_list() + ([self.n_folds] if getattr(self, "full_fit", False) else [])

    def test_folds(self) -> list[int]:
        """The models that answer the test: the full model alone with ``full_fit`` (fold ``n_folds``, trained on
        every image), else every requested fold's; :meth:`fold_list` still gives the out-of-fold scores."""
        return [self.n_folds] if getattr(self, "full_fit", False) else self.fold_list()


@dataclasses.dataclass(frozen=True)
class FullFitField(StageConfig):
    """The model on every training image (stages 02-05; a mixin: list it before the base class)."""

    full_fit: bool = param(False, "after the folds, train one more model on every training image (no validation "
                           "fold, no individual left out; folder fold{n_folds}); it alone answers the test (stages "
                           "03-04 for the embedder, 05 for the classifier), while the folds' models still give the "
                           "out-of-fold scores (threshold, ensemble weights). The Happywhale winners retrained on "
                           "all data the same way.")


@dataclasses.dataclass(frozen=True)
class TrainConfig(FoldConfig):
    """Fields of the training stages (02, 05): network, optimisation, ArcFace, augmentation, processes."""

    backbone: str = param("tf_efficientnet_lite0", "any timm model name.", model=True)
    pretrained: str = param("auto", "auto (offline-known weights, else timm's when online), timm, none, a "
                            "weights file, or the name of an experiment whose stage 00 finished (its "
                            "self-supervised backbone).", model=True)
    image_size: int = param(128, "square input size (pixels).", model=True)
    epochs: int = param(6, "training epochs per fold.", model=True)
    batch_size: int = param(32, "images per step (the global batch when nproc > 1).", model=True)
    lr: float = param(1e-3, "peak learning rate of the backbone (warmup, then cosine, stepped every batch).",
                      model=True)
    head_lr_mult: float = param(10.0, "learning-rate multiplier of the neck and heads.", model=True)
    weight_decay: float = param(1e-4, "decoupled weight decay (AdamW; RAdam's decoupled_weight_decay).",
                                model=True)
    warmup_epochs: float = param(0.5, "linear warmup length, in epochs (fractions allowed).", model=True)
    dropout: float = param(0.0, "dropout before the last linear layer (the neck's, or the head's).", model=True)
    arc_s: float = param(30.0, "ArcFace scale s.", model=True)
    arc_m: float = param(0.5, "ArcFace margin m (radians), used when dynamic_margin is off.", model=True)
    arc_k: int = param(1, "ArcFace sub-centres per class (1: plain ArcFace; stage 05: with head "
                       "subcenter).", model=True)
    dynamic_margin: bool = param(False, "per-class margins, margin_a * n**margin_p + margin_b for a class of "
                                 "n images.", model=True)
    margin_a: float = param(0.5, "dynamic-margin scale.", model=True)
    margin_p: float = param(-0.25, "dynamic-margin exponent (negative: rare classes get larger margins).",
                            model=True)
    margin_b: float = param(0.05, "dynamic-margin offset.", model=True)
    margin_form: str = param("power", "power (margin_a * n**margin_p + margin_b) or rescaled (n**-1/4 min-max "
                             "rescaled into [margin_min, margin_max], as the 3rd place Google Landmark 2020 "
                             "solution: arXiv 2010.05350).", model=True, choices=("power", "rescaled"))
    margin_min: float = param(0.05, "rescaled dynamic margins: the margin of the most frequent class.", model=True)
    margin_max: float = param(0.5, "rescaled dynamic margins: the margin of the rarest class.", model=True)
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy targets.", model=True)
    freeze_blocks: int = param(0, "freeze the backbone's stem and first N blocks (0: train everything): keeps "
                               "the pretrained low-level features and trains faster on small data and CPUs.",
                               model=True)
    rrc_scale_min: float = param(0.7, "smallest area share of the random resized crop (1: no crop; lower "
                                 "values train on parts of the animal).", model=True)
    hflip: bool = param(True, "random horizontal flip in training (off when markings are side-specific).",
                        model=True)
    amp: bool = param(True, "mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); "
                      "ignored on CPU unless amp_cpu.")
    amp_cpu: bool = param(False, "with amp, bf16 autocast on the CPU too, in training and prediction, where the "
                          "CPU has bf16 instructions (AVX512-BF16, AMX): on 2 AMD EPYC cores Lite0 training steps "
                          "1.4-1.6x and prediction 2.5x faster; measure yours with bench/cpu_bf16.py.")
    use_crops: bool = param(True, "train on stage 01's crops when they exist, else on full images.", model=True)
    max_images: int = param(0, "cap on training images (0: all), for debug runs.", model=True)
    nproc: int = param(1, "training processes on this machine; above 1 the notebook launches torchrun "
                       "(DDP, one process per GPU) and batch_size is split across them.")
    nnodes: int = param(1, "machines taking part (torchrun --nnodes); above 1 every machine runs the same stage "
                        "with its own node_rank and the same rdzv_endpoint.")
    node_rank: int = param(0, "this machine's rank, 0 .. nnodes - 1 (node 0 writes the models).")
    rdzv_endpoint: str = param("", "host:port of the c10d rendezvous every machine reaches (usually node 0); "
                               "needed when nnodes > 1.")
    sync_bn: bool = param(False, "synchronise BatchNorm statistics across processes (CUDA only).", model=True)
    norm_eval: bool = param(False, "keep BatchNorm layers in eval mode while training (running statistics "
                            "frozen): for small per-process batches; multi-process then equals one process.",
                            model=True)
    channels_last: bool = param(True, "channels-last memory format, in training and prediction (faster on CUDA with AMP, "
                          "and on the CPU: bench/RESULTS.md).")
    compile: bool = param(False, "torch.compile the training model (slow first steps, then faster on recent "
                          "GPUs).")
    validate_every: int = param(1, "validate every N epochs, and always after the last one (the other epochs "
                                "log NaN): on a GPU validation can take a fifth of an epoch; the weights do not "
                                "change.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: must be >= 1 (processes per machine)")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"nnodes={self.nnodes}, node_rank={self.node_rank}: need nnodes >= 1 and "
                             "0 <= node_rank < nnodes")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint=host:port (the rendezvous every machine "
                             f"reaches, usually node 0's address), got {self.rdzv_endpoint!r}")
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise ValueError(f"rrc_scale_min={self.rrc_scale_min}: must be in (0, 1]")

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`StageConfig.fingerprint`, without the knobs that change speed, not results."""
        fp = super().fingerprint()
        for name in ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "channels_last", "compile", "validate_every"):
            fp.pop(name, None)
        return fp


@dataclasses.dataclass(frozen=True)
class SweepFields:
    """Retrieval and threshold-sweep fields of stages 04 and 06 (a mixin: list it before the stage base)."""

    knn_k: int = param(50, "neighbours retrieved per query image before grouping by individual.")
    oof_new_share: float = param(0.2, "share of out-of-fold queries made unseen individuals by hiding their "
                                 "individual from the fold's gallery, so the threshold is tuned on a test-like "
                                 "mix (0: only naturally unseen ones).")
    oof_gallery: str = param("fold", "the out-of-fold gallery: fold (the other folds' images) or all (every other "
                             "training image, leave-one-out: the test's form, whose gallery is all of train).",
                             choices=("fold", "all"))
    test_new_share: float = param(-1.0, "expected share of new individuals in the test (negative: unknown); when "
                                  "given, the threshold maximises share * map5_new + (1 - share) * map5_known out "
                                  "of fold.")
    share_policy: str = param("estimate", "when test_new_share is not given: estimate (the test's share estimated "
                              "from its own top-1 scores when usable, else minimax), minimax (the threshold whose "
                              "worst loss over test shares 0.1-0.9 is smallest) or oof (the out-of-fold share as "
                              "it is).", choices=("estimate", "minimax", "oof"))
    threshold_min: float = param(0.0, "lowest threshold of the sweep.")
    threshold_max: float = param(1.0, "highest threshold of the sweep.")
    threshold_step: float = param(0.02, "sweep step.")
    new_label: str = param("new_individual", "the id that stands for an unseen individual.")


@dataclasses.dataclass(frozen=True)
class LocalFields:
    """Local-feature re-ranking of stages 04 and 06 (:mod:`common.stages.local_rerank`; a mixin: list it before the
    stage base)."""

    local_features: str = param("none", "re-rank each query's first local_top neighbours by local-feature "
                                "matching: none, or sift (RootSIFT matches that pass Lowe's ratio test, fused with "
                                "the cosine; common.lib.local_features). Helps patterned animals with few images.",
                                choices=("none", "sift"))
    local_weight: float = param(-1.0, "weight of the local similarity in (cosine + w * local) / (1 + w); negative: "
                                "chosen out of fold, the weight whose out-of-fold known-individual MAP@5 is best.")
    local_top: int = param(50, "neighbours per query matched and re-scored (capped at knn_k); the others are dropped.")
    local_side: int = param(0, "longer side (pixels) to which each image is resized, up or down, for SIFT; 0: "
                            "twice the images' median longer side, within 256-512.")
    local_n_features: int = param(1500, "SIFT keypoints kept per image (the strongest; on nyala 1500 beat 600, at ~4x the matching time).")
    local_half: float = param(20.0, "match count at which the local similarity is 0.5 (matches / (matches + "
                              "half)).")
