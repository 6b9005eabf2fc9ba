"""Stage 03: embeddings of every train and test image, per fold model, with horizontal-flip TTA.

Writes ``working/<exp>/03_embeddings/fold{k}/train.npz`` and ``test.npz``: an ``embeddings`` array
(float32, L2-normalised, one row per image) and the ``image`` ids in the row order of ``train.csv`` and of the
test table. :func:`load_fold_embeddings` checks that order when reading back.

With ``inference_only`` only ``test.npz`` is computed: the train gallery (``train.npz``) and the fold models
come from an earlier full run of the experiment, read wherever :func:`common.paths.find_stage_dir` finds
them (this run's ``working/``, else a Kaggle dataset attached to the notebook).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import paths, store
from common.config import ExtractConfig
from common.data import Competition, ImageDataset, build_transforms
from common.runtime import amp_context, configure_device, loader_workers, progress, resolve_device
from common.train import image_paths, load_embedder


def embeddings_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/03_embeddings/fold{fold}``."""
    return paths.stage_dir(exp, "03") / f"fold{fold}"


@torch.no_grad()
def forward_images(
    forward,
    image_files: list[str],
    image_size: int,
    mean: list[float],
    std: list[float],
    batch_size: int = 64,
    tta_flip: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool = True,
    desc: str = "predict",
    n_out: int = 0,
) -> np.ndarray:
    """``forward`` over images read and resized as in evaluation, averaged with the horizontal flip's output.

    The one batch loop behind :func:`extract` (embeddings) and
    :func:`common.classify_train.predict_logits` (logits).

    Args:
        forward: maps a batch ``(N, 3, H, W)`` on ``device`` to ``(N, D)`` (e.g. ``model.embed`` or ``model``).
        image_files: image paths, one output row each, in order.
        image_size: square input size (the training size).
        mean: normalisation mean.
        std: normalisation std.
        batch_size: images per forward pass.
        tta_flip: average each output with that of the image's horizontal flip.
        device: where to run.
        num_workers: loader workers.
        amp: autocast on CUDA.
        desc: progress-bar label.
        n_out: columns of the (empty) result when there are no images.

    Returns:
        float32 ``(len(image_files), D)``.
    """
    device = torch.device(device)
    configure_device(device)
    dataset = ImageDataset(image_files, transform=build_transforms(image_size, False, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(num_workers), pin_memory=device.type == "cuda")
    chunks = []
    for batch in progress(loader, desc=desc, leave=False):
        x = batch["image"].to(device, non_blocking=True)
        with amp_context(device, amp):
            out = forward(x).float()
            if tta_flip:
                out = (out + forward(torch.flip(x, dims=[3])).float()) / 2
        chunks.append(out.cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, n_out), dtype=np.float32)


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
) -> np.ndarray:
    """Embed images with a model's ``embed`` method; L2-normalised float32 rows.

    Args:
        model: an :class:`~common.models.EmbeddingModel` (anything with ``embed(x) -> (N, D)``).
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
    """
    model = model.to(torch.device(device)).eval()
    emb = forward_images(model.embed, image_files, image_size, mean, std, batch_size, tta_flip, device,
                         num_workers, amp, desc, n_out=getattr(model, "embedding_dim", 0))
    return torch.nn.functional.normalize(torch.from_numpy(emb), dim=1).numpy().astype(np.float32)


def run_extraction(cfg: ExtractConfig, comp: Competition) -> pd.DataFrame:
    """Embed train and test images with each requested fold's model; skip files that already exist.

    Returns:
        One row per fold and split: file, rows, dimension, whether it was computed now or reused.
    """
    device = resolve_device(cfg.device)
    splits = [("test", comp.test)] if cfg.inference_only else [("train", comp.train), ("test", comp.test)]
    if cfg.inference_only:  # every fold's gallery must be there before any image is embedded
        for fold in cfg.fold_list():
            load_fold_embeddings(cfg.exp, fold, "train", comp.train["image"])
    rows = []
    for fold in cfg.fold_list():
        model, meta = load_embedder(cfg.exp, fold, device)
        tcfg = meta["config"]
        weights = paths.find_stage_dir(cfg.exp, "02", f"fold{fold}/model.pt") / f"fold{fold}" / "model.pt"
        # Reuse only embeddings made by this very model file with the same TTA setting.
        params = {"tta_flip": cfg.tta_flip, "model_mtime_ns": weights.stat().st_mtime_ns,
                  "model_bytes": weights.stat().st_size, **({"splits": "test"} if cfg.inference_only else {})}
        fresh = cfg.force or not store.stage_done(embeddings_dir(cfg.exp, fold), params)
        for split, table in splits:
            target = embeddings_dir(cfg.exp, fold) / f"{split}.npz"
            reused = target.exists() and not fresh
            if not reused:
                files = image_paths(table, cfg.exp, split, meta["used_crops"])
                emb = extract(model, files, tcfg["image_size"], meta["mean"], meta["std"], cfg.batch_size,
                              cfg.tta_flip, device, cfg.num_workers, tcfg["amp"], desc=f"fold {fold} {split}")
                store.save_arrays(target, table["image"], embeddings=emb)
            arr = store.load_arrays(target, table["image"])["embeddings"]
            rows.append({"fold": fold, "split": split, "file": str(target.relative_to(paths.working_dir())),
                         "rows": arr.shape[0], "dim": arr.shape[1], "reused": reused})
        if cfg.inference_only:
            gallery = _embeddings_file(cfg.exp, fold)
            rows.append({"fold": fold, "split": "train", "file": str(gallery), "rows": len(comp.train),
                         "dim": int(tcfg["embedding_dim"]), "reused": True})
        store.mark_done(embeddings_dir(cfg.exp, fold), params)
    store.mark_done(paths.stage_dir(cfg.exp, "03"), cfg.fingerprint())
    return pd.DataFrame(rows)


def _embeddings_file(exp: str, fold: int, split: str = "train") -> Path:
    need = f"fold{fold}/{split}.npz"
    try:
        return paths.find_stage_dir(exp, "03", need, hint="run stage 03 first") / need
    except paths.MissingStageError:
        if paths.on_kaggle():  # the error says which dataset to attach
            raise
        return embeddings_dir(exp, fold) / f"{split}.npz"  # store.load_arrays names the missing file


def load_fold_embeddings(exp: str, fold: int, split: str, images: list[str] | pd.Series) -> np.ndarray:
    """Read one fold's embeddings, checking their rows are ``images`` in this order.

    The file is read from ``working/<exp>/03_embeddings`` or, failing that, from an attached Kaggle source
    that holds ``<exp>/03_embeddings`` (:func:`common.paths.find_stage_dir`).
    """
    return store.load_arrays(_embeddings_file(exp, fold, split), list(images))["embeddings"]
