"""Stage 00: self-supervised pretraining of a backbone on the competition's own images (no labels).

The ACCV-2022 WebFG winners' largest single gain came from self-supervised pretraining (MAE on a ViT) on the
competition's images before any labelled fine-tuning. This stage does that with the methods of the ``lightly``
library (https://github.com/lightly-ai/lightly; Susmelj et al.), not with our own copies:

* ``simclr``: SimCLR (Chen et al., https://arxiv.org/abs/2002.05709): lightly's ``SimCLRTransform`` (two
  views), ``SimCLRProjectionHead`` and ``NTXentLoss``;
* ``byol``: BYOL (Grill et al., https://arxiv.org/abs/2006.07733): ``BYOLTransform``, ``BYOLProjectionHead``,
  ``BYOLPredictionHead``, a momentum copy (``update_momentum``, ``cosine_schedule``), ``NegativeCosineSimilarity``;
* ``mae``: MAE (He et al., https://arxiv.org/abs/2111.06377) for timm ViTs: ``MAETransform``,
  ``MaskedVisionTransformerTIMM``, ``MAEDecoderTIMM``, ``random_token_mask``, ``patchify``; the GPU
  configuration (``params/ssl_gpu.yaml``).

The backbone is built by :func:`common.lib.models.create_backbone` (so ``ssl_pretrained`` starts from the
offline ImageNet weights, ``none`` from scratch). Outputs in ``working/<exp>/00_pretrain/``: ``config.json``,
``last.pt`` (model, optimiser, scheduler, scaler after the last finished epoch: a killed run resumes from it),
``log.csv`` (epoch, loss, lr, seconds, images/s), ``backbone.pt`` (the timm backbone's state dict, what
``pretrained=<exp>`` loads in stages 02 and 05), ``metrics.json`` and ``_done.json`` (with the config's
fingerprint: an unchanged rerun is skipped).
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from common.config.pretrain import PretrainConfig
from common.core import checkpoint, paths, store
from common.core.runtime import (
    amp_context,
    loader_workers,
    needs_grad_scaler,
    progress,
    resolve_device,
    seed_everything,
    to_memory_format,
    warmup_cosine,
)
from common.core.weights import backbone_normalization
from common.data.competition import Competition, build_transforms, open_competition
from common.lib.models import create_backbone, feature_channels

STAGE = "00"
LOG_COLUMNS = ["epoch", "loss", "lr", "seconds", "images_per_s"]


def stage_dir(exp: str) -> Path:
    """``working/<exp>/00_pretrain``."""
    return paths.stage_dir(exp, STAGE)


def spread(files: list[str], n: int) -> list[str]:
    """``n`` of ``files`` evenly spaced over the list (all when ``n`` is 0 or not smaller): a cap that still
    covers every part of a list sorted by class.

    Args:
        files: the list.
        n: how many to keep.
    """
    if not n or n >= len(files):
        return list(files)
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def image_files(cfg: PretrainConfig, comp: Competition) -> list[str]:
    """Every training image, then (``ssl_use_test``) every test image; ``max_images`` of them evenly spaced
    when capped."""
    files = list(comp.train["path"]) + (list(comp.test["path"]) if cfg.ssl_use_test else [])
    return spread(files, cfg.max_images)


class ViewDataset(torch.utils.data.Dataset):
    """Images read with PIL and passed through a lightly transform (a list of views per image)."""

    def __init__(self, files: list[str], transform) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


def pool(out: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` feature maps or a ViT's ``(N, L, C)`` tokens -> ``(N, C)`` by their mean."""
    return out.mean(dim=1) if out.ndim == 3 else out.mean(dim=(2, 3))


class SSLModel(nn.Module):
    """The backbone and the method's heads; :meth:`loss` maps a batch of views to the method's loss.

    Args:
        cfg: the stage config.
        backbone: a timm backbone returning feature maps (simclr, byol) or a timm ViT (mae).
    """

    def __init__(self, cfg: PretrainConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.method = cfg.ssl_method
        self.backbone = backbone
        if cfg.ssl_method == "mae":
            from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

            if not hasattr(backbone, "patch_embed"):
                raise ValueError(f"ssl_method=mae needs a ViT backbone (e.g. vit_small_patch16_224), not "
                                 f"{cfg.backbone!r}")
            scratch = cfg.ssl_pretrained == "none"  # MAE's own initialisation only when there are no weights
            self.encoder = MaskedVisionTransformerTIMM(vit=backbone, weight_initialization="" if scratch else "skip",
                                                       pos_embed_initialization="sincos" if scratch else "skip")
            self.patch_size = backbone.patch_embed.patch_size[0]
            with warnings.catch_warnings():  # lightly 1.6 deprecates it for a decoder without its patch head
                warnings.simplefilter("ignore", FutureWarning)
                self.decoder = MAEDecoderTIMM(num_patches=backbone.patch_embed.num_patches,
                                              patch_size=self.patch_size, embed_dim=backbone.embed_dim,
                                              decoder_embed_dim=cfg.ssl_decoder_dim,
                                              decoder_depth=cfg.ssl_decoder_depth,
                                              decoder_num_heads=max(1, cfg.ssl_decoder_dim // 64))
            self.mask_ratio = cfg.ssl_mask_ratio
            self.criterion = nn.MSELoss()
            return
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead

        dim = feature_channels(backbone)
        if cfg.ssl_method == "simclr":
            self.projection = SimCLRProjectionHead(dim, cfg.ssl_hidden_dim, cfg.ssl_projection_dim)
            self.criterion = NTXentLoss(temperature=cfg.ssl_temperature)
        else:  # byol
            self.projection = BYOLProjectionHead(dim, cfg.ssl_hidden_dim, cfg.ssl_projection_dim)
            self.prediction = BYOLPredictionHead(cfg.ssl_projection_dim, cfg.ssl_hidden_dim, cfg.ssl_projection_dim)
            self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.target_projection = copy.deepcopy(self.projection).requires_grad_(False)
            self.criterion = NegativeCosineSimilarity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, C)`` of the backbone (average over space; a ViT's pooled output)."""
        return pool(self.backbone(x))

    def _criterion(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The method's criterion in float32, outside autocast: NT-Xent's similarities over a temperature of 0.1
        lose too much in bf16 (8 bits of mantissa), and autocast would run its matmul in bf16 again."""
        with torch.autocast(a.device.type, enabled=False):
            return self.criterion(a.float(), b.float())

    def loss(self, views: list[torch.Tensor], momentum: float = 0.99) -> torch.Tensor:
        """The method's loss on one batch of views (BYOL also moves its target network by ``momentum``).

        The networks run in whatever autocast context the caller opened; the criterion runs in float32.
        """
        if self.method == "simclr":
            return self._criterion(self.projection(self.features(views[0])),
                                   self.projection(self.features(views[1])))
        if self.method == "byol":
            from lightly.models.utils import update_momentum

            update_momentum(self.backbone, self.target_backbone, momentum)
            update_momentum(self.projection, self.target_projection, momentum)
            p0, p1 = (self.prediction(self.projection(self.features(v))) for v in views[:2])
            with torch.no_grad():
                t0, t1 = (self.target_projection(pool(self.target_backbone(v))) for v in views[:2])
            return 0.5 * (self._criterion(p0, t1) + self._criterion(p1, t0))
        from lightly.models import utils

        images = views[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(images.shape[0], self.encoder.sequence_length),
                                                     mask_ratio=self.mask_ratio, device=images.device)
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        embedded = self.decoder.embed(encoded)  # bf16/fp16 under autocast: the float32 mask token must match it
        tokens = utils.repeat_token(self.decoder.mask_token.to(embedded.dtype),
                                    (images.shape[0], self.encoder.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, embedded)
        predicted = utils.get_at_index(self.decoder.predict(self.decoder.decode(tokens)), idx_mask - 1)
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return self._criterion(predicted, target)


def build_transform(cfg: PretrainConfig, mean, std):
    """lightly's augmentation pipeline of the method, normalised with the backbone's ``mean``/``std``."""
    from lightly.transforms import BYOLTransform, MAETransform, SimCLRTransform

    norm = {"mean": list(mean), "std": list(std)}
    if cfg.ssl_method == "mae":
        return MAETransform(input_size=cfg.ssl_image_size, min_scale=0.2, normalize=norm)
    if cfg.ssl_method == "byol":
        from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=cfg.ssl_image_size, min_scale=cfg.ssl_min_scale,
                                                normalize=norm),
            view_2_transform=BYOLView2Transform(input_size=cfg.ssl_image_size, min_scale=cfg.ssl_min_scale,
                                                normalize=norm))
    return SimCLRTransform(input_size=cfg.ssl_image_size, min_scale=cfg.ssl_min_scale, normalize=norm)


def _collate(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(views) for views in zip(*batch, strict=True)]


def run_pretrain(cfg: PretrainConfig, comp: Competition | None = None) -> dict[str, Any]:
    """The whole stage: train (or resume, or skip when finished), write ``backbone.pt`` and the metrics.

    Args:
        cfg: stage config.
        comp: the competition (opened from ``cfg.data`` when not given); its labels are never read.

    Returns:
        ``metrics.json``: the method, images used, first and last epoch loss, seconds.
    """
    out = stage_dir(cfg.exp)
    fp = cfg.fingerprint()
    if cfg.force and out.exists():
        import shutil

        shutil.rmtree(out)
    if store.stage_done(out, fp) and (out / "metrics.json").exists():
        return store.read_json(out / "metrics.json")
    comp = comp if comp is not None else open_competition(cfg.data)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    files = image_files(cfg, comp)
    mean, std = backbone_normalization(cfg.backbone, cfg.ssl_pretrained)
    store.write_json(out / "config.json", {"config": fp, "mean": list(mean), "std": list(std),
                                           "n_images": len(files)})
    checkpoint.check_resumable(out, fp)
    backbone = create_backbone(cfg.backbone, cfg.ssl_pretrained)
    layout = cfg.channels_last and cfg.ssl_method != "mae"  # the CNN methods; a ViT gains nothing
    model = to_memory_format(SSLModel(cfg, backbone).to(device), device, layout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.ssl_lr,
                            weight_decay=cfg.ssl_weight_decay)
    loader_args = dict(batch_size=cfg.ssl_batch_size, drop_last=len(files) >= 2 * cfg.ssl_batch_size,
                       collate_fn=_collate, num_workers=loader_workers(cfg.num_workers),
                       pin_memory=device.type == "cuda")
    steps = len(files) // cfg.ssl_batch_size if loader_args["drop_last"] else -(-len(files) // cfg.ssl_batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps * cfg.ssl_epochs, int(cfg.ssl_warmup_epochs * steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))  # fp16 only, as stage 02/05
    state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    start, rows = checkpoint.resume(out, state)
    dataset = ViewDataset(files, build_transform(cfg, mean, std))
    for epoch in range(start + 1, cfg.ssl_epochs + 1):
        seed_everything(cfg.seed * 1000 + epoch)  # a resumed run draws what an unbroken one does
        loader = torch.utils.data.DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(
            cfg.seed * 1000 + epoch), **loader_args)
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        for step, views in enumerate(progress(loader, desc=f"ssl epoch {epoch}/{cfg.ssl_epochs}", leave=False)):
            views = [to_memory_format(v.to(device, non_blocking=True), device, layout) for v in views]
            momentum = cfg.ssl_momentum
            if cfg.ssl_method == "byol":
                from lightly.utils.scheduler import cosine_schedule

                momentum = cosine_schedule((epoch - 1) * steps + step, steps * cfg.ssl_epochs, cfg.ssl_momentum, 1.0)
            with amp_context(device, cfg.amp, cfg.amp_cpu):
                loss = model.loss(views, momentum)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss.float()).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(views[0])
            seen += len(views[0])
        elapsed = time.perf_counter() - t0
        rows.append({"epoch": epoch, "loss": total / max(seen, 1), "lr": opt.param_groups[0]["lr"],
                     "seconds": round(elapsed, 2), "images_per_s": round(seen / elapsed, 1)})
        store.write_csv(out / "log.csv", pd.DataFrame(rows, columns=LOG_COLUMNS))  # before last.pt: resume reads it
        checkpoint.save_state(out, epoch, state)
    with store.atomic_path(out / "backbone.pt") as tmp:
        torch.save(model.backbone.state_dict(), tmp)
    log = pd.DataFrame(rows, columns=LOG_COLUMNS)
    metrics = {"method": cfg.ssl_method, "backbone": cfg.backbone, "start": cfg.ssl_pretrained,
               "images": len(files), "first_loss": float(log["loss"].iloc[0]), "last_loss": float(log["loss"].iloc[-1]),
               "seconds": float(log["seconds"].sum())}
    store.write_json(out / "metrics.json", metrics)
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", {"pretrain": metrics})
    store.mark_done(out, fp)
    return metrics


# ----------------------------------------------------------------------------------------- inspection
def training_log(exp: str) -> pd.DataFrame:
    """``00_pretrain/log.csv`` (the loss curve)."""
    return pd.read_csv(stage_dir(exp) / "log.csv")


@torch.no_grad()
def embed(backbone: nn.Module, files: list[str], image_size: int, mean, std, batch_size: int = 64) -> np.ndarray:
    """L2-normalised pooled features ``(N, C)`` of ``files`` (no augmentation).

    Args:
        backbone: a timm backbone returning feature maps (or a ViT).
        files: image paths.
        image_size: square input size.
        mean: normalisation mean.
        std: normalisation std.
        batch_size: images per forward pass.
    """
    from common.data.competition import ImageDataset

    ds = ImageDataset(files, transform=build_transforms(image_size, False, mean, std))
    backbone.eval()
    feats = []
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size):
        feats.append(pool(backbone(batch["image"])))
    f = torch.cat(feats)
    return torch.nn.functional.normalize(f, dim=1).numpy()


def neighbour_table(exp: str, comp: Competition | None = None, k: int = 4) -> dict[str, Any]:
    """Nearest neighbours of the first ``n_examples`` training images among the other training images, with the
    starting weights (``before``) and after pretraining (``after``); and, when ``train.csv`` has labels, the
    leave-one-out 1-NN accuracy on ``individual_id`` of each (labels are only read here, to judge the features).

    Args:
        exp: a finished stage-00 experiment.
        comp: the competition (opened from the run's ``data`` when not given).
        k: neighbours per query.

    Returns:
        ``{"queries": [...], "before": [[...]], "after": [[...]], "knn_before": float, "knn_after": float}``.
    """
    meta = store.read_json(stage_dir(exp) / "config.json")
    cfg = PretrainConfig(**meta["config"])
    comp = comp if comp is not None else open_competition(cfg.data)
    keep = spread(list(range(len(comp.train))), cfg.max_images)
    files = [comp.train["path"].iloc[i] for i in keep]
    labels = comp.train["individual_id"].to_numpy()[keep]
    out: dict[str, Any] = {"queries": files[: cfg.n_examples]}
    for name, weights in (("before", cfg.ssl_pretrained), ("after", str(stage_dir(exp) / "backbone.pt"))):
        f = embed(create_backbone(cfg.backbone, weights), files, cfg.ssl_image_size, meta["mean"], meta["std"])
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        order = np.argsort(-sim, axis=1, kind="stable")
        out[name] = [[files[j] for j in order[i, :k]] for i in range(min(cfg.n_examples, len(files)))]
        out[f"knn_{name}"] = float((labels[order[:, 0]] == labels).mean())
    return out


def plot_neighbours(table: dict[str, Any], thumb: int = 96):
    """A figure: each query, then its neighbours before (top row) and after (bottom row) pretraining."""
    import matplotlib.pyplot as plt

    n, k = len(table["before"]), len(table["before"][0]) if table["before"] else 0
    fig, axes = plt.subplots(2 * n, k + 1, figsize=(1.6 * (k + 1), 1.6 * 2 * n), squeeze=False)
    for i in range(n):
        for r, name in enumerate(("before", "after")):
            row = axes[2 * i + r]
            for j, file in enumerate([table["queries"][i], *table[name][i]]):
                with Image.open(file) as im:
                    row[j].imshow(im.convert("RGB").resize((thumb, thumb)))
                row[j].set_xticks([]), row[j].set_yticks([])
            row[0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"nearest neighbours; leave-one-out 1-NN accuracy {table['knn_before']:.3f} before, "
                 f"{table['knn_after']:.3f} after", fontsize=9)
    fig.tight_layout()
    return fig
