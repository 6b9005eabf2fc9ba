"""Checks that only a CUDA GPU can run, skipped on machines without one (CI has none, so CI skips them all):
the ArcFace margin maths stays float32 under autocast, and stage 02 and stage 00 (MAE) train under AMP on the
GPU to the same kind of result as on the CPU.

Run them on a GPU machine: ``.venv/bin/python -m pytest tests/test_gpu.py -ra``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.config import EmbedderConfig
from common.config.pretrain import PretrainConfig
from common.core.runtime import amp_context
from common.engine import embedder as train
from common.lib.heads import ArcMarginProduct
from common.stages import pretrain_ssl, train_embedder

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
              pytest.mark.usefixtures("isolated")]


def autocast_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def test_arcface_margin_maths_is_float32_under_autocast():
    torch.manual_seed(0)
    head = ArcMarginProduct(64, 10, s=30.0, margins=torch.linspace(0.2, 0.5, 10), k=2)
    emb = torch.randn(48, 64).to(autocast_dtype())  # what a backbone under autocast hands the head
    labels = torch.randint(0, 10, (48,))
    expected = copy.deepcopy(head)(emb.float(), labels)  # the CPU in float32 on the same values
    gpu = head.cuda()
    with amp_context(torch.device("cuda"), True):
        out = gpu(emb.cuda(), labels.cuda())
        plain = gpu(emb.cuda())
    assert out.dtype == torch.float32 and plain.dtype == torch.float32
    # In bf16 the margin would be lost in rounding (cos + 0.5 rad changes the logit by ~0.1 x s); in float32
    # the GPU agrees with the CPU to float32 rounding.
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4 * 30)
    margin_effect = (plain.cpu() - out.cpu()).gather(1, labels[:, None])
    assert (margin_effect > 0).all()


def test_stage_02_trains_under_amp_on_the_gpu(comp):
    cfg = EmbedderConfig(data=str(comp.root), exp="gpu", backbone="mobilenetv3_small_050", pretrained="none",
                         image_size=64, embedding_dim=16, epochs=2, batch_size=4, n_folds=2, folds="0",
                         device="cuda", warmup_epochs=0.5, amp=True, oof_new_share=0.0)
    folds = train_embedder.prepare_folds(cfg, comp)
    log = train.train_fold(cfg, comp, folds, 0)
    assert len(log) == 2 and np.isfinite(log["train_loss"]).all() and (log["images_per_s"] > 0).all()
    model, _ = train.load_embedder("gpu", 0, device="cuda")
    x = torch.randn(3, 3, 64, 64, device="cuda")
    with torch.no_grad(), amp_context(torch.device("cuda"), True):
        emb = model.embed(x)
    assert emb.shape == (3, 16) and torch.isfinite(emb.float()).all()


def test_stage_00_mae_trains_under_amp_on_the_gpu(comp):
    cfg = PretrainConfig(data=str(comp.root), exp="ssl", backbone="vit_tiny_patch16_224", ssl_method="mae",
                         ssl_pretrained="none", ssl_image_size=224, ssl_epochs=2, ssl_batch_size=8,
                         ssl_decoder_dim=32, ssl_decoder_depth=1, device="cuda", amp=True, n_examples=2)
    metrics = pretrain_ssl.run_pretrain(cfg)
    log = pretrain_ssl.training_log("ssl")
    assert len(log) == 2 and np.isfinite(log["loss"]).all()
    assert metrics["method"] == "mae" and np.isfinite(metrics["last_loss"])
