"""Export a stage-05 classifier for CPU inference: conv-BatchNorm folding, ONNX (run by ONNX Runtime) and
OpenVINO IR, each checked against the eager PyTorch model.

* :func:`fuse_conv_bn` folds every eval-mode BatchNorm into the convolution that feeds it
  (``w' = w * g / sqrt(v + eps)``, ``b' = (b - mu) * g / sqrt(v + eps) + beta``; the same algebra as
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``). Pairs are found by running the model once with hooks: a
  pair is fused only where the BatchNorm's input *is* the convolution's output tensor and each module runs
  once, so the module order in ``__init__`` never matters. timm's ``BatchNormAct2d`` (BN + drop + activation
  in one module) keeps its drop and activation; a plain ``BatchNorm2d`` becomes ``Identity``.
* :func:`export_onnx` traces a model to ONNX (opset 17, dynamic batch, input ``image`` ``(N, C, H, W)``
  normalised float32, output ``logits`` ``(N, n_classes)``; ArcFace heads export their margin-free
  ``s * cos``).
* :class:`OnnxRunner` and :class:`OpenVinoRunner` map a float32 batch to logits with a fixed thread count.
* :func:`export_classifier` writes ``working/<exp>/05_classifier/fold{k}/export/`` (``model.onnx``,
  ``model.xml``/``model.bin``, ``export.json`` with the image size, mean, std, classes and the parity
  figures), from ``python -m common.cli.export --exp X --fold 0``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.core import store

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FORMATS = ("onnx", "openvino")


# ----------------------------------------------------------------------------------------- conv-bn folding
class _ActAfterFold(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its BatchNorm is folded into the conv: drop, act."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` pairs where the BN's input is exactly the conv's output, from one forward."""
    conv_out: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive)
    calls: dict[str, int] = {}
    fed_by: dict[str, str | None] = {}
    handles = []

    def on_conv(name: str):
        def hook(_m, _inp, out):
            calls[name] = calls.get(name, 0) + 1
            conv_out[id(out)] = (name, out)
        return hook

    def on_bn(name: str):
        def hook(_m, args):
            calls[name] = calls.get(name, 0) + 1
            hit = conv_out.get(id(args[0])) if args else None
            fed_by[name] = hit[0] if hit is not None and hit[1] is args[0] else None
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(on_bn(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs, used = [], set()
    for bn, conv in fed_by.items():
        # a conv or BN run twice (shared weights) or a conv feeding two BNs cannot be folded
        if conv is None or calls.get(conv) != 1 or calls.get(bn) != 1 or conv in used:
            continue
        used.add(conv)
        pairs.append((conv, bn))
    return pairs


def _fold(conv: nn.Conv2d, bn: _BatchNorm) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv``'s weight and bias, in place (float64 maths)."""
    ones = torch.ones_like(bn.running_var, dtype=torch.float64)
    scale = bn.weight.double() if bn.weight is not None else ones
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    b = (b - bn.running_mean.double()) * scale + shift
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, image_size: int = 64, in_chans: int = 3, check: bool = True,
                 atol: float = 1e-4) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv2d -> BatchNorm pair folded into the conv.

    Args:
        model: any module mapping ``(N, C, H, W)`` images to a tensor (left unchanged).
        image_size: side of the random example run once to find the pairs (and to check parity).
        in_chans: channels of that example.
        check: compare the fused copy with ``model`` on the example and raise when they differ.
        atol: allowed max abs difference, relative to ``max(1, max |output|)``.

    Returns:
        The fused copy, with ``fused_pairs`` (list of ``(conv, bn)`` module names) and ``fuse_max_abs_diff``.

    Raises:
        RuntimeError: when ``check`` finds the fused output off by more than the tolerance.
    """
    fused = copy.deepcopy(model).eval()
    example = torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    pairs = _conv_bn_pairs(fused, example)
    for conv_name, bn_name in pairs:
        bn = fused.get_submodule(bn_name)
        _fold(fused.get_submodule(conv_name), bn)
        act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
        rest = nn.Identity() if act is None and drop is None else _ActAfterFold(drop or nn.Identity(),
                                                                                 act or nn.Identity())
        _set_module(fused, bn_name, rest)
    fused.fused_pairs = pairs
    fused.fuse_max_abs_diff = 0.0
    if check:
        was_training = model.training
        ref, out = model.eval()(example), fused(example)
        model.train(was_training)
        diff = float((ref.float() - out.float()).abs().max()) if ref.numel() else 0.0
        fused.fuse_max_abs_diff = diff
        bound = atol * max(1.0, float(ref.float().abs().max()))
        if not diff <= bound:
            raise RuntimeError(f"fuse_conv_bn: fused output differs from the original by {diff:.3g} "
                               f"(allowed {bound:.3g}) after folding {len(pairs)} pairs")
    return fused


# ----------------------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int, opset: int = 17,
                dynamic_batch: bool = True, in_chans: int = 3) -> Path:
    """Trace ``model`` (eval mode) to an ONNX file, written atomically.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra package (the dynamo exporter
    needs ``onnxscript``) and handles timm's ``Conv2dSame`` padding, which is constant at a fixed image size.

    Args:
        model: maps ``(N, in_chans, image_size, image_size)`` float32 to ``(N, n_classes)`` logits.
        path: the ``.onnx`` file.
        image_size: the (square) input side the graph is fixed to.
        opset: ONNX opset.
        dynamic_batch: leave the batch dimension free (else the graph is fixed to batch 1).
        in_chans: input channels.
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with store.atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning / DeprecationWarning noise of the legacy exporter
            torch.onnx.export(model, (x,), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False,
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    return path


def _check_batch(x: np.ndarray, expected: Sequence[Any], where: Path) -> np.ndarray:
    """``x`` as contiguous float32 after checking it is ``(N, C, H, W)`` matching the static dims."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{where}: expected a batch (N, C, H, W), got shape {x.shape}")
    for axis, (got, want) in enumerate(zip(x.shape[1:], list(expected)[1:], strict=True), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise ValueError(f"{where}: input dimension {axis} is {got}, the model expects {want} "
                             f"(shape {tuple(expected)})")
    return np.ascontiguousarray(x, dtype=np.float32)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (run common.cli.export first)")
    return path


class OnnxRunner:
    """ONNX Runtime on the CPU: ``runner(batch) -> logits``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: ONNX Runtime's default); inter-op is 1.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = _existing(path)
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits ``(N, n_classes)`` of a normalised float batch ``(N, C, H, W)``."""
        x = _check_batch(x, self.input_shape, self.path)
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoRunner:
    """OpenVINO on the CPU, in float32 (no bf16/fp16 downcast): ``runner(batch) -> logits``.

    Args:
        path: an OpenVINO IR ``.xml`` (its ``.bin`` beside it) or an ``.onnx`` file.
        threads: inference threads (``None``: OpenVINO's default).
        hint: ``LATENCY`` or ``THROUGHPUT`` performance hint.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, hint: str = "LATENCY") -> None:
        import openvino as ov

        self.path = _existing(path)
        if self.path.suffix == ".xml":
            _existing(self.path.with_suffix(".bin"))
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else -1 for d in shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits ``(N, n_classes)`` of a normalised float batch ``(N, C, H, W)``."""
        x = _check_batch(x, self.input_shape, self.path)
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()


def export_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``, float32 weights); the ``.bin`` lands first.

    Args:
        onnx_path: the source ``.onnx``.
        xml_path: the ``.xml`` to write (the ``.bin`` gets the same stem).
    """
    import openvino as ov

    xml_path = Path(xml_path)
    tmp_dir = xml_path.parent / f".tmp-openvino-{os.getpid()}"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        ov_model = ov.convert_model(str(_existing(onnx_path)))
        ov.save_model(ov_model, str(tmp_dir / xml_path.name), compress_to_fp16=False)
        os.replace(tmp_dir / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
        os.replace(tmp_dir / xml_path.name, xml_path)
    finally:
        for f in tmp_dir.glob("*"):
            f.unlink()
        tmp_dir.rmdir()
    return xml_path


# ----------------------------------------------------------------------------------------- stage 05
def parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """``max_abs_diff`` and ``argmax_agreement`` (fraction of rows with the same top class) of two logits."""
    if not reference.size:
        return {"max_abs_diff": 0.0, "argmax_agreement": 1.0}
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "argmax_agreement": float((reference.argmax(1) == other.argmax(1)).mean())}


def export_dir(exp: str, fold: int) -> Path:
    """``working/<exp>/05_classifier/fold{fold}/export``."""
    from common.engine.classifier import fold_dir

    return fold_dir(exp, fold) / "export"


def export_classifier(exp: str, fold: int, formats: Sequence[str] = FORMATS, opset: int = 17,
                      n_check: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Fuse, export and check a finished stage-05 fold; writes ``export/`` beside its ``model.pt``.

    Args:
        exp: experiment name.
        fold: fold index (must have finished training).
        formats: any of ``onnx``, ``openvino`` (OpenVINO is converted from the ONNX file).
        opset: ONNX opset.
        n_check: random normalised images the parity figures are measured on.
        threads: threads for the ONNX Runtime / OpenVINO parity runs.

    Returns:
        The ``export.json`` content.
    """
    from common.engine.classifier import load_classifier

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"export_classifier: unknown formats {bad}; use {list(FORMATS)}")
    model, meta = load_classifier(exp, fold)
    size = int(meta["config"]["image_size"])
    out = export_dir(exp, fold)
    x = torch.randn(n_check, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).float().numpy()
    t0 = time.perf_counter()
    fused = fuse_conv_bn(model, image_size=size)
    with torch.no_grad():
        checks: dict[str, Any] = {"fused": parity(ref, fused(x).float().numpy())}
    info: dict[str, Any] = {
        "exp": exp, "fold": fold, "backbone": meta["config"]["backbone"], "head": meta["config"]["head"],
        "image_size": size, "in_chans": 3, "mean": list(meta["mean"]), "std": list(meta["std"]),
        "classes": list(meta["classes"]), "input": INPUT_NAME, "output": OUTPUT_NAME,
        "input_layout": "NCHW float32, RGB scaled to [0, 1] then (x - mean) / std", "opset": opset,
        "fused_pairs": len(fused.fused_pairs), "files": {}, "parity": checks, "parity_inputs": n_check,
        "versions": {"torch": torch.__version__},
    }
    if formats:
        import onnx
        import onnxruntime

        info["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
        onnx_path = export_onnx(fused, out / "model.onnx", size, opset=opset)
        info["files"]["onnx"] = onnx_path.name
        checks["onnx"] = parity(ref, OnnxRunner(onnx_path, threads)(x.numpy()))
        if "openvino" in formats:
            import openvino

            info["versions"]["openvino"] = openvino.__version__
            xml = export_openvino(onnx_path, out / "model.xml")
            info["files"].update(openvino_xml=xml.name, openvino_bin=xml.with_suffix(".bin").name)
            checks["openvino"] = parity(ref, OpenVinoRunner(xml, threads)(x.numpy()))
        if "onnx" not in formats:
            onnx_path.unlink()
            del info["files"]["onnx"], checks["onnx"]
    info["seconds"] = round(time.perf_counter() - t0, 2)
    store.write_json(out / "export.json", info)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m common.cli.export --exp X --fold 0 [--formats onnx,openvino]``."""
    parser = argparse.ArgumentParser(prog="python -m common.cli.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", required=True, help="experiment name (working/<exp>/05_classifier)")
    parser.add_argument("--fold", type=int, default=0, help="fold to export")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: onnx, openvino")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=None, help="threads for the parity runs")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    info = export_classifier(args.exp, args.fold, formats, opset=args.opset, threads=args.threads)
    print(f"{export_dir(args.exp, args.fold)}: {info['fused_pairs']} conv-bn pairs fused, files "
          f"{sorted(info['files'].values())}")
    for engine, p in info["parity"].items():
        print(f"  {engine:9s} max |logit diff| {p['max_abs_diff']:.2e}  "
              f"argmax agreement {p['argmax_agreement']:.3f}")
    return info


if __name__ == "__main__":
    main()
