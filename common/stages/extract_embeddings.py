"""Stage 03: embeddings of every train and test image, per fold model, with horizontal-flip TTA.

Writes ``working/<exp>/03_embeddings/fold{k}/train.npz`` and ``test.npz``: an ``embeddings`` array
(float32, L2-normalised, one row per image) and the ``image`` ids in the row order of ``train.csv`` and of the
test table. :func:`load_fold_embeddings` checks that order when reading back.

With ``inference_only`` only ``test.npz`` is computed: the train gallery (``train.npz``) and the fold models
come from an earlier full run of the experiment, read wherever :func:`common.core.paths.find_stage_dir` finds
them (this run's ``working/``, else a Kaggle dataset attached to the notebook).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from common.config import ExtractConfig
from common.core import paths, store
from common.core.runtime import resolve_device
from common.data.artefacts import _embeddings_file, embeddings_dir, image_paths, load_fold_embeddings
from common.data.competition import Competition
from common.data.fingerprint import check_model, data_fingerprint, file_hash, stage_fingerprint, upstream
from common.engine.embedder import load_embedder
from common.engine.predict import forward_images


def extract(
    model: torch.nn.Module,
    image_files: list[str],
    image_size: int,
    mean: list[float],
    std: list[float],
    batch_size: int = 64,
    tta_flip: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool = True,
    desc: str = "embed",
    channels_last: bool = True,
    amp_cpu: bool = False,
) -> np.ndarray:
    """Embed images with a model's ``embed`` method; L2-normalised float32 rows.

    Args:
        model: an :class:`~common.lib.models.EmbeddingModel` (anything with ``embed(x) -> (N, D)``).
        image_files: image paths, one output row each, in order.
        image_size: square input size (the training size).
        mean: normalisation mean.
        std: normalisation std.
        batch_size: images per forward pass.
        tta_flip: average the embedding of each image with that of its horizontal flip (before normalising).
        device: where to run.
        num_workers: loader workers.
        amp: autocast on CUDA.
        desc: progress-bar label.
        channels_last: feed the batches in channels-last layout (faster on CUDA and the CPU).
        amp_cpu: with ``amp``, bf16 autocast on the CPU too.
    """
    model = model.to(torch.device(device)).eval()
    emb = forward_images(model.embed, image_files, image_size, mean, std, batch_size, tta_flip, device,
                         num_workers, amp, desc, n_out=getattr(model, "embedding_dim", 0), channels_last=channels_last,
                         amp_cpu=amp_cpu)
    return torch.nn.functional.normalize(torch.from_numpy(emb), dim=1).numpy().astype(np.float32)


def run_extraction(cfg: ExtractConfig, comp: Competition) -> pd.DataFrame:
    """Embed train and test images with each requested fold's model (and the full model, ``full_fit``); skip
    files that already exist.

    Returns:
        One row per fold and split: file, rows, dimension, whether it was computed now or reused.
    """
    device = resolve_device(cfg.device)
    splits = [("test", comp.test)] if cfg.inference_only else [("train", comp.train), ("test", comp.test)]
    if cfg.inference_only:  # every fold's gallery must be there before any image is embedded
        for fold in cfg.model_folds():
            load_fold_embeddings(cfg.exp, fold, "train", comp.train["image"])
    rows = []
    for fold in cfg.model_folds():  # with full_fit, the full model (fold n_folds) too
        model, meta = load_embedder(cfg.exp, fold, device)
        tcfg = meta["config"]
        weights = paths.find_stage_dir(cfg.exp, "02", f"fold{fold}/model.pt") / f"fold{fold}" / "model.pt"
        check_model(meta, comp.root, weights.parent / "config.json")
        # Reuse only embeddings made by this very model (its bytes) of these images, with the same TTA setting.
        params = {"tta_flip": cfg.tta_flip, "model_sha256": file_hash(weights),
                  "data_files": data_fingerprint(comp.root),
                  "upstream": upstream(cfg), **({"splits": "test"} if cfg.inference_only else {})}
        fresh = cfg.force or not store.stage_done(embeddings_dir(cfg.exp, fold), params)
        for split, table in splits:
            target = embeddings_dir(cfg.exp, fold) / f"{split}.npz"
            reused = target.exists() and not fresh
            if not reused:
                files = image_paths(table, cfg.exp, split, meta["used_crops"])
                emb = extract(model, files, tcfg["image_size"], meta["mean"], meta["std"], cfg.batch_size,
                              cfg.tta_flip, device, cfg.num_workers, tcfg["amp"], desc=f"fold {fold} {split}",
                              channels_last=tcfg.get("channels_last", True), amp_cpu=tcfg.get("amp_cpu", False))
                store.save_arrays(target, table["image"], embeddings=emb)
            arr = store.load_arrays(target, table["image"])["embeddings"]
            rows.append({"fold": fold, "split": split, "file": str(target.relative_to(paths.working_dir())),
                         "rows": arr.shape[0], "dim": arr.shape[1], "reused": reused})
        if cfg.inference_only:
            gallery = _embeddings_file(cfg.exp, fold)
            rows.append({"fold": fold, "split": "train", "file": str(gallery), "rows": len(comp.train),
                         "dim": int(tcfg["embedding_dim"]), "reused": True})
        store.mark_done(embeddings_dir(cfg.exp, fold), params)
    store.mark_done(paths.stage_dir(cfg.exp, "03"), stage_fingerprint(cfg))
    return pd.DataFrame(rows)




