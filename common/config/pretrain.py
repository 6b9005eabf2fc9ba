"""Stage 00's configuration: self-supervised pretraining of a backbone on the competition's own images."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from common.config.base import StageConfig, param


@dataclasses.dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """Stage 00: self-supervised pretraining (no labels) on the train and test images, with lightly's methods.

    Stages 02 and 05 start from the result with ``pretrained=<this experiment's name>`` (the backbone's
    weights in ``working/<exp>/00_pretrain/backbone.pt``). Its fields are prefixed ``ssl_`` where a later stage
    has a field of that name with another meaning (the runner's parameters are one flat namespace);
    ``backbone`` is shared: stage 00 pretrains the backbone the later stages fine-tune.
    """

    stage: ClassVar[str] = "00"

    ssl_method: str = param("simclr", "simclr (SimCLR, NT-Xent on two views), byol (BYOL: online predictor vs momentum target) or mae (masked autoencoder; needs a ViT backbone such as vit_small_patch16_224).", choices=("simclr", "byol", "mae"))
    backbone: str = param("tf_efficientnet_lite0", "timm model name.")
    ssl_pretrained: str = param("auto", "the starting weights: auto (ImageNet from the offline package when there is one), none (from scratch), timm or a path.")
    ssl_image_size: int = param(96, "square input size (pixels).")
    ssl_epochs: int = param(2, "pretraining epochs.")
    ssl_batch_size: int = param(32, "images per step (two views each for simclr and byol).")
    ssl_lr: float = param(1e-4, "peak learning rate (AdamW, warmup then cosine, stepped per batch).")
    ssl_weight_decay: float = param(1e-4, "AdamW weight decay.")
    ssl_warmup_epochs: float = param(0.2, "linear warmup length, in epochs (fractions allowed).")
    ssl_projection_dim: int = param(128, "output size of the projection head (simclr, byol).")
    ssl_hidden_dim: int = param(512, "hidden size of the projection and prediction heads (simclr, byol).")
    ssl_temperature: float = param(0.1, "NT-Xent temperature (simclr).")
    ssl_momentum: float = param(0.99, "starting momentum of BYOL's target network (cosine-scheduled to 1).")
    ssl_mask_ratio: float = param(0.75, "share of patches masked (mae).")
    ssl_decoder_dim: int = param(256, "MAE decoder width.")
    ssl_decoder_depth: int = param(2, "MAE decoder blocks.")
    ssl_min_scale: float = param(0.3, "smallest area share of the random resized crops (simclr, byol).")
    ssl_use_test: bool = param(True, "also pretrain on the test images (no labels are read).")
    max_images: int = param(0, "cap on the images used (0: all), for debug runs.")
    n_examples: int = param(4, "query images in the nearest-neighbour figure.")
    amp: bool = param(True, "mixed precision on CUDA; ignored on CPU unless amp_cpu.")
    amp_cpu: bool = param(False, "with amp, bf16 autocast on the CPU too (the losses stay float32): pays only where "
                          "the CPU has bf16 instructions (AVX512-BF16, AMX); see bench/cpu_bf16.py.")
    channels_last: bool = param(True, "channels-last memory format for the CNN methods (simclr, byol): faster on "
                                "CUDA with AMP and on the CPU (bench/RESULTS.md); mae's ViT is left as it is.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.ssl_mask_ratio < 1.0:
            raise ValueError(f"ssl_mask_ratio={self.ssl_mask_ratio}: must be in (0, 1)")
        if not 0.0 < self.ssl_min_scale <= 1.0:
            raise ValueError(f"ssl_min_scale={self.ssl_min_scale}: must be in (0, 1]")
        if self.ssl_epochs < 1 or self.ssl_batch_size < 2:
            raise ValueError(f"ssl_epochs={self.ssl_epochs}, ssl_batch_size={self.ssl_batch_size}: need "
                             "ssl_epochs >= 1 and ssl_batch_size >= 2 (contrastive losses compare images within a batch)")

    def fingerprint(self) -> dict[str, Any]:
        """As :meth:`StageConfig.fingerprint`, without ``channels_last`` (it changes speed, not results)."""
        fp = super().fingerprint()
        fp.pop("channels_last", None)
        return fp
