"""Stage 00's configuration: self-supervised pretraining of a backbone on the competition's own images."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from common.config import StageConfig


@dataclasses.dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """Stage 00: self-supervised pretraining (no labels) on the train and test images, with lightly's methods.

    Stages 02 and 05 start from the result with ``pretrained=<this experiment's name>`` (the backbone's
    weights in ``working/<exp>/00_pretrain/backbone.pt``). Its fields are prefixed ``ssl_`` where a later stage
    has a field of that name with another meaning (the runner's parameters are one flat namespace);
    ``backbone`` is shared: stage 00 pretrains the backbone the later stages fine-tune.

    Args:
        ssl_method: ``simclr`` (SimCLR, NT-Xent on two views), ``byol`` (BYOL: online predictor vs momentum
            target) or ``mae`` (masked autoencoder; needs a ViT backbone such as ``vit_small_patch16_224``).
        backbone: timm model name.
        ssl_pretrained: the starting weights: ``auto`` (ImageNet from the offline package when there is one),
            ``none`` (from scratch), ``timm`` or a path.
        ssl_image_size: square input size (pixels).
        ssl_epochs: pretraining epochs.
        ssl_batch_size: images per step (two views each for simclr and byol).
        ssl_lr: peak learning rate (AdamW, warmup then cosine, stepped per batch).
        ssl_weight_decay: AdamW weight decay.
        ssl_warmup_epochs: linear warmup length, in epochs (fractions allowed).
        ssl_projection_dim: output size of the projection head (simclr, byol).
        ssl_hidden_dim: hidden size of the projection and prediction heads (simclr, byol).
        ssl_temperature: NT-Xent temperature (simclr).
        ssl_momentum: starting momentum of BYOL's target network (cosine-scheduled to 1).
        ssl_mask_ratio: share of patches masked (mae).
        ssl_decoder_dim: MAE decoder width.
        ssl_decoder_depth: MAE decoder blocks.
        ssl_min_scale: smallest area share of the random resized crops (simclr, byol).
        ssl_use_test: also pretrain on the test images (no labels are read).
        max_images: cap on the images used (0 = all), for debug runs.
        n_examples: query images in the nearest-neighbour figure.
        amp: mixed precision on CUDA; ignored on CPU.
    """

    stage: ClassVar[str] = "00"
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"ssl_method": ("simclr", "byol", "mae")}

    ssl_method: str = "simclr"
    backbone: str = "tf_efficientnet_lite0"
    ssl_pretrained: str = "auto"
    ssl_image_size: int = 96
    ssl_epochs: int = 2
    ssl_batch_size: int = 32
    ssl_lr: float = 1e-4
    ssl_weight_decay: float = 1e-4
    ssl_warmup_epochs: float = 0.2
    ssl_projection_dim: int = 128
    ssl_hidden_dim: int = 512
    ssl_temperature: float = 0.1
    ssl_momentum: float = 0.99
    ssl_mask_ratio: float = 0.75
    ssl_decoder_dim: int = 256
    ssl_decoder_depth: int = 2
    ssl_min_scale: float = 0.3
    ssl_use_test: bool = True
    max_images: int = 0
    n_examples: int = 4
    amp: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.ssl_mask_ratio < 1.0:
            raise ValueError(f"ssl_mask_ratio={self.ssl_mask_ratio}: must be in (0, 1)")
        if not 0.0 < self.ssl_min_scale <= 1.0:
            raise ValueError(f"ssl_min_scale={self.ssl_min_scale}: must be in (0, 1]")
        if self.ssl_epochs < 1 or self.ssl_batch_size < 2:
            raise ValueError(f"ssl_epochs={self.ssl_epochs}, ssl_batch_size={self.ssl_batch_size}: need "
                             "ssl_epochs >= 1 and ssl_batch_size >= 2 (contrastive losses compare images within a batch)")
