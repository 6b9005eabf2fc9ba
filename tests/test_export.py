"""common.cli.export: conv-BN folding, ONNX Runtime and OpenVINO give the eager model's logits; bad input fails.

Tolerance (:func:`close`): max |diff| <= 1e-5 + 2e-5 * max |eager logit|. Every engine computes in float32
(machine epsilon 1.2e-7) and only the summation order differs (folded weights, fused kernels, other GEMM
blocking); over the ~50 layers of these nets that was measured at 2e-6 of the logit scale at most
(tf_efficientnet_lite0, logits up to 12: 2.3e-5 absolute). The bound leaves 10x headroom and is still ~1,000x
below what one unfolded BatchNorm (an affine map with scale ~0.5-1.5 and shift ~0.2) would change.
BatchNorm statistics and affine parameters are randomised first: at timm's init (mean 0, var 1, weight 1,
bias 0) folding is almost the identity, and a wrong fold would pass unnoticed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnx")

import timm  # noqa: E402

from common.cli import export
from common.core import store
from common.lib.models import ClassifierModel  # noqa: E402

SIZE = 32


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def close(ref: np.ndarray, out: np.ndarray) -> None:
    assert out.shape == ref.shape
    bound = 1e-5 + 2e-5 * float(np.abs(ref).max())
    diff = float(np.abs(ref - out).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def n_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


MODELS = {
    # timm's own classifier: ConvBnAct, SqueezeExcite, Hardswish
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False,
                                                       num_classes=5),
    # stage 05's model, linear head
    "clf_linear": lambda: ClassifierModel("mobilenetv3_small_050", 5, pretrained="none"),
    # stage 05's model on tf_efficientnet_lite0 (Conv2dSame padding, ReLU6) with a sub-center ArcFace head
    "clf_lite0_arcface": lambda: ClassifierModel("tf_efficientnet_lite0", 5, pretrained="none",
                                                 head="subcenter", arc_k=2),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory, one_torch_thread):
    """(eager model, fused model, onnx path, xml path, input batch) for each model."""
    torch.manual_seed(0)
    model = randomize_bn(MODELS[request.param]())
    fused = export.fuse_conv_bn(model, image_size=SIZE)
    folder = tmp_path_factory.mktemp(request.param)
    onnx_path = export.export_onnx(fused, folder / "model.onnx", SIZE)
    xml = export.export_openvino(onnx_path, folder / "model.xml")
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, fused, onnx_path, xml, x


def eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).float().numpy()


def test_fused_matches_eager_and_has_no_batchnorm_left(exported):
    model, fused, _, _, x = exported
    assert n_batchnorm(model) > 10
    assert len(fused.fused_pairs) == n_batchnorm(model)  # every BN in these nets follows a conv
    assert n_batchnorm(fused) == 0
    for conv_name, _ in fused.fused_pairs:
        assert fused.get_submodule(conv_name).bias is not None  # the BN's shift now lives in the conv bias
    close(eager(model, x), eager(fused, x))
    assert n_batchnorm(model) > 0  # the original is left untouched


def test_fused_keeps_the_activation_of_batchnormact():
    from timm.layers import BatchNormAct2d

    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    bn = BatchNormAct2d(4, act_layer=nn.ReLU)
    model = randomize_bn(nn.Sequential(conv, bn))
    fused = export.fuse_conv_bn(model, image_size=8)
    assert fused.fused_pairs == [("0", "1")]
    assert isinstance(fused[1].act, nn.ReLU)
    x = torch.randn(2, 3, 8, 8)
    out = eager(fused, x)
    assert out.min() == 0.0  # the ReLU is still applied after folding
    close(eager(model, x), out)


def test_fold_matches_hand_computed_values():
    # 1x1 conv, one channel, weight 2, no bias; BN mean 1, var 3, eps 1, gamma 4, beta 5:
    # scale = 4 / sqrt(3 + 1) = 2 -> folded weight 2 * 2 = 4, bias (0 - 1) * 2 + 5 = 3
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        bn.weight.fill_(4.0)
        bn.bias.fill_(5.0)
    fused = export.fuse_conv_bn(nn.Sequential(conv, bn).eval(), image_size=2, in_chans=1)
    assert fused[0].weight.item() == 4.0
    assert fused[0].bias.item() == 3.0
    assert isinstance(fused[1], nn.Identity)


def test_bn_not_fed_by_a_conv_is_left_alone():
    # conv -> ReLU -> BN: the BN's input is not the conv's output, so folding would be wrong
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    fused = export.fuse_conv_bn(model, image_size=8)
    assert fused.fused_pairs == []
    assert n_batchnorm(fused) == 1


def test_onnx_runtime_matches_eager(exported):
    model, _, onnx_path, _, x = exported
    runner = export.OnnxRunner(onnx_path, threads=1)
    close(eager(model, x), runner(x.numpy()))
    close(eager(model, x[:1]), runner(x[:1].numpy()))  # dynamic batch: batch 1 from the same file


def test_openvino_matches_eager(exported):
    model, _, onnx_path, xml, x = exported
    assert xml.with_suffix(".bin").is_file()
    close(eager(model, x), export.OpenVinoRunner(xml, threads=1)(x.numpy()))
    close(eager(model, x[:2]), export.OpenVinoRunner(onnx_path, threads=1)(x[:2].numpy()))


def test_runners_reject_missing_files_and_wrong_shapes(exported, tmp_path):
    _, _, onnx_path, xml, x = exported
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        export.OnnxRunner(tmp_path / "nothing.onnx")
    with pytest.raises(FileNotFoundError, match="nothing.xml"):
        export.OpenVinoRunner(tmp_path / "nothing.xml")
    for runner in (export.OnnxRunner(onnx_path, 1), export.OpenVinoRunner(xml, 1)):
        with pytest.raises(ValueError, match=r"dimension 2 is 40.*expects 32"):
            runner(np.zeros((1, 3, 40, SIZE), np.float32))
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            runner(np.zeros((3, SIZE, SIZE), np.float32))


def fake_finished_fold(exp: str) -> tuple[ClassifierModel, dict]:
    """A stage-05 fold folder as training leaves it: config.json, model.pt, _done.json."""
    from common.engine.classifier import fold_dir

    torch.manual_seed(0)
    model = randomize_bn(ClassifierModel("mobilenetv3_small_050", 3, pretrained="none"))
    cfg = {"backbone": "mobilenetv3_small_050", "pretrained": "none", "head": "linear",
           "dynamic_margin": False, "dropout": 0.0, "arc_s": 30.0, "arc_m": 0.5, "arc_k": 1,
           "image_size": SIZE}
    meta = {"config": cfg, "classes": ["a", "b", "c"], "class_counts": [3, 2, 1], "mean": [0.5] * 3,
            "std": [0.25] * 3}
    folder = fold_dir(exp, 0)
    folder.mkdir(parents=True)
    store.write_json(folder / "config.json", meta)
    torch.save(model.state_dict(), folder / "model.pt")
    store.mark_done(folder, {})
    return model, meta


def test_export_classifier_cli_writes_all_files(isolated, one_torch_thread, capsys):
    model, meta = fake_finished_fold("tiny")
    info = export.main(["--exp", "tiny", "--fold", "0", "--threads", "1"])
    folder = export.export_dir("tiny", 0)
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.bin", "model.onnx", "model.xml"]
    saved = json.loads((folder / "export.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["image_size"] == SIZE and saved["classes"] == ["a", "b", "c"]
    assert saved["mean"] == [0.5] * 3 and saved["std"] == [0.25] * 3
    assert saved["fused_pairs"] == n_batchnorm(model)
    for engine in ("fused", "onnx", "openvino"):
        assert saved["parity"][engine]["argmax_agreement"] == 1.0
        assert saved["parity"][engine]["max_abs_diff"] < 1e-4
    x = torch.randn(2, 3, SIZE, SIZE)
    close(eager(model, x), export.OnnxRunner(folder / "model.onnx", 1)(x.numpy()))
    assert "conv-bn pairs fused" in capsys.readouterr().out


def test_export_classifier_errors(isolated):
    with pytest.raises(FileNotFoundError, match="has not finished training"):
        export.export_classifier("missing", 0)
    fake_finished_fold("tiny")
    with pytest.raises(ValueError, match="unknown formats"):
        export.export_classifier("tiny", 0, formats=("tensorrt",))
