"""The models: the embedder (a timm backbone, GeM pooling, a BN-Dropout-Linear-BN neck and ArcFace heads) and
the classifier of stage 05 (a timm backbone, average pooling and a linear or ArcFace head).

Where the backbone's weights come from (``pretrained``: ``"auto"``, ``"none"``, ``"timm"``, ``"offline"`` or
a local file) is decided in :mod:`common.core.weights`.
"""

from __future__ import annotations

from collections.abc import Iterator

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.core.weights import (
    OFFLINE_WEIGHTS,
    backbone_normalization,
    load_backbone_weights,
    resolve_pretrained,
)
from common.lib.heads import ArcMarginProduct

# backbone_normalization is also re-exported here for older imports (bench/embedder_reid.py).
__all__ = ["GeM", "create_backbone", "feature_channels", "EmbeddingModel", "ClassifierModel",
           "backbone_normalization"]


class GeM(nn.Module):
    """Generalized-mean pooling, ``(N, C, H, W) -> (N, C)``: ``(mean(x ** p)) ** (1 / p)`` per channel.

    ``p = 1`` is average pooling and ``p -> inf`` approaches max pooling; a learnable ``p`` lets training pick
    in between. Computed in float32 (``x ** p`` overflows float16 quickly). Credit: Radenović et al.,
    "Fine-tuning CNN Image Retrieval with No Human Annotation", https://arxiv.org/abs/1711.02512.

    Args:
        p: initial (or fixed) exponent.
        eps: inputs are clamped to at least ``eps`` so that fractional powers stay defined.
        learnable: make ``p`` a trainable parameter (else a buffer).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM: p must be > 0, got {p}")
        self.eps = float(eps)
        if learnable:
            self.p = nn.Parameter(torch.tensor([float(p)]))
        else:
            self.register_buffer("p", torch.tensor([float(p)]))

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` of shape ``(N, C, H, W)`` to ``(N, C)`` in ``x``'s dtype."""
        if x.ndim != 4:
            raise ValueError(f"GeM expects (N, C, H, W) feature maps, got shape {tuple(x.shape)}")
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return pooled.to(x.dtype)


# ----------------------------------------------------------------------------------------- the backbone
def create_backbone(name: str, pretrained: str = "auto", in_chans: int = 3) -> nn.Module:
    """A timm backbone that returns feature maps ``(N, C, H, W)`` (``num_classes=0, global_pool=""``).

    Args:
        name: timm model name (e.g. ``"resnet18"``, ``"tf_efficientnet_lite0"``).
        pretrained: ``"auto"``, ``"none"``, ``"timm"``, ``"offline"`` or a path to a weights file; see
            :mod:`common.core.weights`. Resolved (and errors raised) before the model is built.
        in_chans: input channels; pretrained 3-channel stems are adapted.

    Returns:
        The model, with ``weights_source`` set to the resolved source.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}' (see timm.list_models())")
    source = resolve_pretrained(name, pretrained)
    kwargs = dict(num_classes=0, global_pool="", in_chans=in_chans)
    model = timm.create_model(name, pretrained=source == "timm", **kwargs)
    if source == "offline":
        OFFLINE_WEIGHTS[name].loader(model)
    elif source not in ("none", "timm"):
        load_backbone_weights(model, source)
    model.weights_source = source
    return model


# ----------------------------------------------------------------------------------------- the embedder
def feature_channels(backbone: nn.Module, in_chans: int = 3) -> int:
    """Channels of ``backbone``'s output, from a test forward (timm's ``num_features`` can differ from it:
    ``mobilenetv3`` reports 576 but returns 1024 after its ``conv_head``).

    Args:
        backbone: a model returning ``(N, C, H, W)``.
        in_chans: its input channels.
    """
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    side = max(64, *(cfg.get("min_input_size") or (0, 0, 0))[1:])
    size = tuple(cfg["input_size"][1:]) if cfg.get("fixed_input_size") else (side, side)
    param = next(backbone.parameters(), None)
    x = torch.zeros(1, in_chans, *size, device=param.device if param is not None else "cpu")
    was_training = backbone.training
    backbone.eval()  # batch of one: BatchNorm must not use batch statistics
    try:
        with torch.no_grad():
            out = backbone(x)
    finally:
        backbone.train(was_training)
    if out.ndim == 3:  # a ViT's tokens (N, L, C): the classifier averages them (GeM needs feature maps)
        return int(out.shape[2])
    if out.ndim != 4:
        raise ValueError(
            f"the backbone must return (N, C, H, W) feature maps or (N, L, C) tokens; got {tuple(out.shape)}"
        )
    return int(out.shape[1])


class FrozenBlocks(nn.Module):
    """A model whose ``backbone`` can have its stem and first blocks frozen (:func:`frozen_modules`): their
    weights get no gradient and their BatchNorm layers stay in eval mode, also after ``.train()``."""

    frozen: list[nn.Module]

    def freeze_blocks(self, n_blocks: int) -> None:
        """Freeze the stem and the first ``n_blocks`` blocks of ``self.backbone`` (0: nothing)."""
        self.frozen = frozen_modules(self.backbone, n_blocks)
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBlocks:
        """As :meth:`nn.Module.train`, but the frozen part of the backbone stays in eval mode."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


class EmbeddingModel(FrozenBlocks):
    """Backbone -> GeM -> neck (BN, Dropout, Linear, BN) -> embedding, with ArcFace logits for training.

    The embedding is not normalised (normalise it for cosine retrieval). ``logits`` come from an
    :class:`~common.lib.heads.ArcMarginProduct` over individuals; with ``n_species > 0`` a second ArcFace head
    over species gives ``species_logits`` (margin applied when ``species`` labels are passed), an auxiliary
    task as in several Happywhale solutions.

    Args:
        backbone: timm model name.
        pretrained: where the backbone weights come from (see :func:`create_backbone`).
        embedding_dim: embedding size.
        n_classes: number of individuals (classes of the main head).
        n_species: number of species for the auxiliary head; 0 for none.
        gem_p: initial GeM exponent.
        gem_learnable: train the GeM exponent.
        dropout: dropout probability in the neck.
        arc_s: ArcFace scale (both heads).
        arc_m: ArcFace margin in radians (both heads; the individual head uses ``margins`` when given).
        arc_easy_margin: ArcFace easy margin (both heads).
        arc_k: sub-centres per individual.
        margins: optional per-individual margins, shape ``(n_classes,)`` (see
            :func:`~common.lib.heads.dynamic_margins`).
        arc_ls_eps: label smoothing in the individual head.
        in_chans: input channels.
        freeze_blocks: freeze the stem and the first N blocks of the backbone (weights fixed, BatchNorm in eval
            mode), as :class:`ClassifierModel`.
    """

    def __init__(
        self,
        backbone: str,
        pretrained: str = "auto",
        embedding_dim: int = 512,
        *,
        n_classes: int,
        n_species: int = 0,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        dropout: float = 0.0,
        arc_s: float = 30.0,
        arc_m: float = 0.5,
        arc_easy_margin: bool = False,
        arc_k: int = 1,
        margins: torch.Tensor | None = None,
        arc_ls_eps: float = 0.0,
        in_chans: int = 3,
        freeze_blocks: int = 0,
    ) -> None:
        super().__init__()
        if n_species < 0:
            raise ValueError(f"EmbeddingModel: n_species must be >= 0, got {n_species}")
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone, pretrained, in_chans=in_chans)
        self.normalization = backbone_normalization(backbone, self.backbone.weights_source)
        self.num_features = feature_channels(self.backbone, in_chans)
        self.embedding_dim = embedding_dim
        self.gem = GeM(gem_p, learnable=gem_learnable)
        self.neck = nn.Sequential(
            nn.BatchNorm1d(self.num_features),
            nn.Dropout(dropout),
            nn.Linear(self.num_features, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )
        arc = dict(s=arc_s, m=arc_m, easy_margin=arc_easy_margin)
        self.arcface = ArcMarginProduct(
            embedding_dim, n_classes, margins=margins, k=arc_k, ls_eps=arc_ls_eps, **arc
        )
        self.species_head = ArcMarginProduct(embedding_dim, n_species, **arc) if n_species > 0 else None
        self.freeze_blocks(freeze_blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, in_chans, H, W)`` -> embeddings ``(N, embedding_dim)``, not normalised."""
        return self.neck(self.gem(self.backbone(x)))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, species: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Embeddings and logits.

        Args:
            x: images ``(N, in_chans, H, W)``.
            labels: optional individual ids ``(N,)``: the ArcFace margin is applied to them.
            species: optional species ids ``(N,)`` for the species head's margin.

        Returns:
            ``{"embedding": (N, D), "logits": (N, n_classes), "species_logits": (N, n_species) or None}``;
            logits are float32 and already scaled by ``arc_s``.
        """
        embedding = self.embed(x)
        species_logits = None if self.species_head is None else self.species_head(embedding, species)
        return {
            "embedding": embedding,
            "logits": self.arcface(embedding, labels),
            "species_logits": species_logits,
        }

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone (the base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything else: GeM ``p``, neck, ArcFace and species heads (the head learning-rate multiplier)."""
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))


# ----------------------------------------------------------------------------------------- the classifier
class ClassifierModel(FrozenBlocks):
    """A timm backbone, average pooling, dropout and a classification head.

    Args:
        backbone: timm model name.
        n_classes: number of classes.
        pretrained: where the backbone weights come from (see :func:`common.lib.models.create_backbone`).
        head: ``linear``; ``arcface`` (:class:`~common.lib.heads.ArcMarginProduct`, k=1); ``subcenter``
            (``arc_k`` sub-centres, max over them). With ``margins`` the ArcFace margin is per class.
        dropout: dropout before the head.
        arc_s: ArcFace scale.
        arc_m: fixed ArcFace margin (radians).
        arc_k: sub-centres per class (``subcenter``).
        margins: optional per-class margins ``(n_classes,)``, e.g. from :func:`~common.lib.heads.dynamic_margins`.
        in_chans: input channels.
        n_aux: classes of an auxiliary linear head on the same features (e.g. coarse classes, as the
            embedder's species head); 0 for none. ``forward(..., return_aux=True)`` returns its logits too.
        freeze_blocks: freeze the stem and the first N blocks of the backbone (weights fixed, BatchNorm in eval
            mode): faster training on small data and CPUs. Needs a timm model with ``blocks`` (EfficientNet,
            MobileNet, ViT...).
    """

    def __init__(self, backbone: str, n_classes: int, pretrained: str = "auto", head: str = "linear",
                 dropout: float = 0.0, arc_s: float = 30.0, arc_m: float = 0.5, arc_k: int = 1,
                 margins: torch.Tensor | None = None, in_chans: int = 3, n_aux: int = 0,
                 freeze_blocks: int = 0) -> None:
        super().__init__()
        if head not in ("linear", "arcface", "subcenter"):
            raise ValueError(f"ClassifierModel: head={head!r}: use linear, arcface or subcenter")
        self.backbone = create_backbone(backbone, pretrained, in_chans=in_chans)
        self.num_features = feature_channels(self.backbone, in_chans)
        self.head_type = head
        self.dropout = nn.Dropout(dropout)
        if head == "linear":
            self.head = nn.Linear(self.num_features, n_classes)
        else:
            self.head = ArcMarginProduct(self.num_features, n_classes, s=arc_s, m=arc_m, margins=margins,
                                         k=arc_k if head == "subcenter" else 1)
        self.aux_head = nn.Linear(self.num_features, n_aux) if n_aux > 0 else None
        self.freeze_blocks(freeze_blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, num_features)`` (mean over space, or over a ViT's tokens)."""
        out = self.backbone(x)
        return out.mean(dim=1) if out.ndim == 3 else out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, return_aux: bool = False,
                classes: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits ``(N, n_classes)``; ArcFace heads put their margin on ``labels`` when given.
        With ``classes`` (sorted class ids, Partial FC: :func:`~common.lib.heads.sample_classes`), the logits of
        those classes only, ``(N, len(classes))``. With ``return_aux`` (and an auxiliary head),
        ``(logits, aux_logits)``."""
        f = self.dropout(self.features(x))
        if self.head_type != "linear":
            logits = self.head(f, labels, classes)
        elif classes is None:
            logits = self.head(f).float()
        else:
            logits = F.linear(f, self.head.weight[classes], self.head.bias[classes]).float()
        if return_aux:
            if self.aux_head is None:
                raise ValueError("ClassifierModel: return_aux=True but the model has no auxiliary head (n_aux=0)")
            return logits, self.aux_head(f).float()
        return logits

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters (``head_lr_mult`` x the base learning rate)."""
        yield from self.head.parameters()
        if self.aux_head is not None:
            yield from self.aux_head.parameters()


def frozen_modules(backbone: nn.Module, n_blocks: int) -> list[nn.Module]:
    """The modules frozen by ``freeze_blocks=n_blocks``: every child before ``blocks``, then ``blocks[:n]``.

    Args:
        backbone: a timm model with a ``blocks`` sequence (EfficientNet, MobileNet, ViT...).
        n_blocks: how many of its blocks to freeze (0: none).
    """
    if n_blocks <= 0:
        return []
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"freeze_blocks={n_blocks}: {type(backbone).__name__} has no 'blocks' sequence to freeze")
    if n_blocks > len(blocks):
        raise ValueError(f"freeze_blocks={n_blocks}: {type(backbone).__name__} has only {len(blocks)} blocks")
    stem = []
    for name, child in backbone.named_children():
        if name == "blocks":
            break
        stem.append(child)
    return stem + list(blocks[:n_blocks])
