"""Tests for common.lib.models: GeM, backbone creation, the embedder (weight sources: tests/test_weights.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.lib.models import EmbeddingModel, GeM, create_backbone

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ GeM
def test_gem_hand_computed_2x2():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one image, one channel, 2x2
    # p = 2: sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5)
    assert GeM(p=2.0)(x).item() == pytest.approx(math.sqrt(7.5), rel=1e-6)
    # p = 3: cbrt((1 + 8 + 27 + 64) / 4) = cbrt(25)
    assert GeM(p=3.0, learnable=False)(x).item() == pytest.approx(25 ** (1 / 3), rel=1e-6)


def test_gem_p1_is_average_and_large_p_approaches_max():
    x = torch.rand(2, 5, 4, 4) + 0.5  # values in [0.5, 1.5)
    torch.testing.assert_close(GeM(p=1.0)(x), F.adaptive_avg_pool2d(x, 1).flatten(1))
    # (mean x^p)^(1/p) lies in [max / 16^(1/p), max]: within 3% of max at p = 100.
    big = GeM(p=100.0)(x)
    max_pool = x.amax(dim=(2, 3))
    assert (big <= max_pool + 1e-5).all()
    torch.testing.assert_close(big, max_pool, rtol=0.03, atol=0)


def test_gem_learnable_p_gets_a_gradient():
    gem = GeM(p=3.0)
    assert [n for n, _ in gem.named_parameters()] == ["p"]
    gem(torch.rand(2, 3, 4, 4)).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    fixed = GeM(p=3.0, learnable=False)
    assert list(fixed.parameters()) == [] and "p" in fixed.state_dict()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        gem(torch.rand(2, 3))


# ------------------------------------------------------------------------------------------ the embedder
MARGINS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


@pytest.fixture(scope="module")
def resnet_model() -> EmbeddingModel:
    """One resnet18 embedder shared by several tests (building one runs a test forward)."""
    torch.manual_seed(0)
    return EmbeddingModel(
        "resnet18", "none", embedding_dim=32, n_classes=7, n_species=3, arc_k=2, margins=MARGINS
    ).eval()


def _check_outputs(model: EmbeddingModel, n_species: int) -> None:
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["embedding"].shape == (2, model.embedding_dim)
    assert out["logits"].shape == (2, 7) and out["logits"].dtype == torch.float32
    if n_species:
        assert out["species_logits"].shape == (2, n_species)
    else:
        assert out["species_logits"] is None and model.species_head is None
    # Labels put the margin on the target: its logit drops, the others stay.
    with_labels = model(x, labels=torch.tensor([1, 4]), species=torch.tensor([0, 2]) if n_species else None)
    diff = (with_labels["logits"] - out["logits"]).detach()
    assert (diff[[0, 1], [1, 4]] < 0).all() and diff[0, 0] == 0
    torch.testing.assert_close(with_labels["embedding"], out["embedding"])  # eval mode: deterministic


def test_output_shapes_resnet18(resnet_model):
    _check_outputs(resnet_model, n_species=3)
    assert resnet_model.backbone.weights_source == "none" and resnet_model.num_features == 512
    torch.testing.assert_close(resnet_model.arcface.margin, MARGINS)  # per-class margins reach the head


def test_output_shapes_efficientnet_lite0():
    model = EmbeddingModel(LITE0, "none", embedding_dim=16, n_classes=7).eval()
    assert model.num_features == 1280
    _check_outputs(model, n_species=0)


@pytest.fixture(scope="module")
def mobilenet_model() -> EmbeddingModel:
    """A small embedder (1.5 M parameters) for the neck-sizing test."""
    torch.manual_seed(0)
    return EmbeddingModel("mobilenetv3_small_100", "none", embedding_dim=16, n_classes=4)


def test_neck_sized_from_a_forward_for_mobilenetv3(mobilenet_model):
    model = mobilenet_model
    assert model.backbone.num_features == 576  # what timm reports ...
    assert model.num_features == 1024  # ... and what its conv_head really outputs
    assert model.neck[0].num_features == 1024 and model.neck[2].in_features == 1024
    assert model.training  # the test forward ran in eval mode and restored train mode
    assert model(torch.randn(2, 3, 64, 64))["embedding"].shape == (2, 16)


def test_parameter_groups_partition_all_parameters(resnet_model):
    backbone = {id(p) for p in resnet_model.backbone_parameters()}
    head = {id(p) for p in resnet_model.head_parameters()}
    every = {id(p) for p in resnet_model.parameters()}
    assert backbone and head and not backbone & head and backbone | head == every
    names = {id(p): n for n, p in resnet_model.named_parameters()}
    assert {names[i] for i in head} == {
        "gem.p",
        "neck.0.weight",
        "neck.0.bias",
        "neck.2.weight",
        "neck.2.bias",
        "neck.3.weight",
        "neck.3.bias",
        "arcface.weight",
        "species_head.weight",
    }
    assert resnet_model.arcface.weight.shape == (7 * 2, 32)  # arc_k = 2 sub-centres


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("not_a_model", "none")


def test_classifier_aux_head_and_frozen_blocks():
    from common.lib.models import ClassifierModel, frozen_modules

    model = ClassifierModel("tf_efficientnet_lite0", 5, pretrained="none", n_aux=3, freeze_blocks=2)
    x = torch.randn(2, 3, 64, 64)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, 5) and aux.shape == (2, 3)
    # The stem (conv_stem, bn1) and blocks 0-1 are frozen; block 2 and the heads train.
    frozen = {id(p) for m in frozen_modules(model.backbone, 2) for p in m.parameters()}
    assert len(frozen_modules(model.backbone, 2)) == 4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not frozen & trainable and frozen
    assert all(p.requires_grad for p in model.backbone.blocks[2].parameters())
    assert {id(p) for p in model.aux_head.parameters()} <= {id(p) for p in model.head_parameters()}
    model.train()  # frozen BatchNorm stays in eval mode: its running statistics do not move
    assert not model.backbone.bn1.training and model.backbone.blocks[2].training
    before = model.backbone.bn1.running_mean.clone()
    model(x)
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)
    with pytest.raises(ValueError, match="only 7 blocks"):
        frozen_modules(model.backbone, 8)
    with pytest.raises(ValueError, match="no auxiliary head"):
        ClassifierModel("tf_efficientnet_lite0", 5, pretrained="none")(x, return_aux=True)


def test_embedder_frozen_blocks_keep_weights_and_statistics():
    from common.lib.models import EmbeddingModel

    model = EmbeddingModel("tf_efficientnet_lite0", "none", 16, n_classes=4, freeze_blocks=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.", "backbone.blocks.2."))
                   for n in trainable)
    assert any(n.startswith("backbone.blocks.3.") for n in trainable) and "neck.2.weight" in trainable
    model.train()
    assert not model.backbone.blocks[2].training and model.backbone.blocks[3].training and model.neck.training
    before = {k: v.clone() for k, v in model.backbone.blocks[1].state_dict().items()}
    out = model(torch.randn(4, 3, 64, 64), labels=torch.tensor([0, 1, 2, 3]))
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    out["logits"].logsumexp(1).mean().backward()
    assert model.backbone.blocks[1][0].conv_dw.weight.grad is None
    for k, v in model.backbone.blocks[1].state_dict().items():  # running statistics unchanged too
        torch.testing.assert_close(v, before[k])
