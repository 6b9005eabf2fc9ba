"""Weight averaging: the mean of several checkpoints' weights, and an exponential moving average of them.

- Checkpoint averaging (the last epochs of one run, or several fine-tuned runs): Izmailov et al., "Averaging
  Weights Leads to Wider Optima and Better Generalization" (SWA, https://arxiv.org/abs/1803.05407), and the
  uniform/greedy "model soups" of Wortsman et al. (https://arxiv.org/abs/2203.05482), which issue 4 builds on
  :func:`average_state_dicts`.
- :class:`ModelEma`: Polyak-Ruppert averaging as an EMA of the weights during training (Polyak & Juditsky
  1992; Tarvainen & Valpola, https://arxiv.org/abs/1703.01780); the update is timm's ``ModelEmaV3``
  (https://github.com/huggingface/pytorch-image-models/blob/main/timm/utils/model_ema.py).

Floating-point tensors are averaged in float64 and cast back to their dtype; integer tensors (BatchNorm's
``num_batches_tracked``) cannot be averaged and are taken from the last state. BatchNorm running statistics
are averaged like weights: after averaging checkpoints of different runs they may need a recompute on
training data (SWA's ``update_bn``); averaging the last epochs of one run needs none in practice.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _Accumulator:
    """Running weighted sum of state dicts in float64, one state in memory at a time."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.ref: Mapping[str, Any] | None = None
        self.ref_name = ""
        self.last: Mapping[str, Any] | None = None
        self.total = 0.0

    def add(self, state: Mapping[str, Any], weight: float, name: str) -> None:
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{name}: expected a state dict (mapping of names to tensors), got {type(state).__name__}"
            )
        if self.ref is None:
            self.ref, self.ref_name = state, name
            if not state:
                raise ValueError(f"{name}: the state dict is empty")
        else:
            _check_same_layout(self.ref, self.ref_name, state, name)
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                term = value.detach().to("cpu", torch.float64) * weight
                self.sums[key] = term if key not in self.sums else self.sums[key].add_(term)
        self.last = state
        self.total += weight

    def result(self) -> dict[str, Any]:
        assert self.last is not None and self.total > 0
        out: dict[str, Any] = {}
        for key, value in self.last.items():
            if key in self.sums:
                out[key] = (self.sums[key] / self.total).to(device=value.device, dtype=value.dtype)
            else:  # integer/bool tensors (num_batches_tracked) and non-tensor extras: the last state's
                out[key] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        return out


def _check_same_layout(ref: Mapping[str, Any], ref_name: str, state: Mapping[str, Any], name: str) -> None:
    """Raise ValueError naming the first key that is missing, extra, or of another shape."""
    for key in ref:
        if key not in state:
            raise ValueError(f"{name}: key {key!r} is in {ref_name} but missing here")
    for key in state:
        if key not in ref:
            raise ValueError(f"{name}: key {key!r} is not in {ref_name}")
        a, b = ref[key], state[key]
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise ValueError(f"{name}: key {key!r} is a tensor in only one of this state and {ref_name}")
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape:
            raise ValueError(
                f"{name}: key {key!r} has shape {tuple(b.shape)} but {tuple(a.shape)} in {ref_name}"
            )
        if a.is_floating_point() != b.is_floating_point():
            raise ValueError(f"{name}: key {key!r} is {b.dtype} but {a.dtype} in {ref_name}")


def _normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise ValueError(f"average: {len(w)} weights for {n} states")
    if any(not v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"average: weights must be >= 0 with a positive sum, got {w}")
    return w


def average_state_dicts(
    states: Sequence[Mapping[str, Any]],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The (weighted) mean of state dicts with the same keys and shapes.

    Floating-point tensors: ``sum(w_i * s_i) / sum(w_i)`` computed in float64, cast back to the dtype and
    device of the last state's tensor. Integer and bool tensors (``num_batches_tracked``) and non-tensor
    entries are copied from the last state.

    Args:
        states: state dicts, e.g. ``model.state_dict()`` of several epochs or runs.
        weights: one non-negative weight per state (normalised here); ``None`` for a uniform mean.

    Returns:
        A new state dict, ready for ``model.load_state_dict``; the inputs are not modified.

    Raises:
        ValueError: if ``states`` is empty, the weights are invalid, or a key is missing, extra or of another
            shape in some state (the key and the state's index are named).
    """
    if not states:
        raise ValueError("average_state_dicts: no states to average")
    w = _normalised_weights(weights, len(states))
    acc = _Accumulator()
    for i, (state, wi) in enumerate(zip(states, w, strict=True)):
        acc.add(state, wi, f"state {i}")
    return acc.result()


def _load_state(path: Path) -> Mapping[str, Any]:
    """A checkpoint's state dict: the file itself, or its ``"model"`` entry."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: holds no state dict (neither a mapping of tensors nor {{'model': ...}})")
    return obj


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Uniform mean of the model weights stored in checkpoint files.

    Files are read with ``torch.load(weights_only=True)`` onto the CPU, one at a time (memory: one checkpoint
    plus a float64 running sum). Each may be a plain state dict or a training checkpoint
    ``{"model": state_dict, "optimizer": ..., ...}``; only the model weights are averaged.

    Args:
        paths: checkpoint files.

    Returns:
        The averaged state dict (CPU tensors), as :func:`average_state_dicts`.

    Raises:
        FileNotFoundError: if a file is missing (checked for all files before any is read).
        ValueError: if ``paths`` is empty, a file holds no state dict, or the files disagree on a key or shape
            (the file and the key are named).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("average_checkpoints: no checkpoint paths given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"average_checkpoints: checkpoint not found: {', '.join(missing)}")
    acc = _Accumulator()
    for f in files:
        acc.add(_load_state(f), 1.0, str(f))
    return acc.result()


def _parse_epochs(epochs: str | int | Sequence[int]) -> list[int]:
    if isinstance(epochs, int):
        return [epochs]
    if isinstance(epochs, str):
        out = []
        for token in epochs.replace(" ", "").split(","):
            if not token:
                continue
            try:
                out.append(int(token))
            except ValueError:
                msg = f"select_checkpoints: epochs {epochs!r}: {token!r} is not an integer"
                raise ValueError(msg) from None
        return out
    return [int(e) for e in epochs]


def select_checkpoints(
    available: Sequence[int],
    last_n: int = 0,
    epochs: str | int | Sequence[int] = "",
) -> list[int]:
    """Choose which saved epochs to average: an explicit list, the last ``last_n``, or both (their union).

    Args:
        available: epochs that have a checkpoint on disk.
        last_n: also take the ``last_n`` highest available epochs; 0 for none.
        epochs: explicit epochs, as a comma-separated string (``"3,5,7"``), an int, or a sequence of ints;
            ``""`` for none.

    Returns:
        The chosen epochs, sorted and unique; empty when neither ``last_n`` nor ``epochs`` asks for any.

    Raises:
        ValueError: if a requested epoch has no checkpoint (it is named, with the available ones), ``epochs``
            does not parse, or ``last_n`` is negative or larger than the number of available epochs.
    """
    have = sorted({int(e) for e in available})
    wanted = _parse_epochs(epochs)
    missing = [e for e in wanted if e not in set(have)]
    if missing:
        raise ValueError(f"select_checkpoints: no checkpoint for epoch(s) {missing}; available: {have}")
    if last_n < 0:
        raise ValueError(f"select_checkpoints: last_n must be >= 0, got {last_n}")
    if last_n > len(have):
        raise ValueError(f"select_checkpoints: last_n={last_n} but only {len(have)} epochs available: {have}")
    chosen = set(wanted) | (set(have[-last_n:]) if last_n else set())
    return sorted(chosen)


UPDATES_KEY = "_ema_updates"  # ModelEma.state_dict: how many updates the average has had


class ModelEma:
    """timm's ModelEmaV3 doing the update, plus a prefix-free state_dict (earlier checkpoints) and a key check.

    ``ema = decay * ema + (1 - decay) * model``, by ``timm.utils.ModelEmaV3.update`` (a ``lerp`` of every
    floating-point parameter *and* buffer, BatchNorm running statistics included; integer buffers such as
    ``num_batches_tracked`` are copied). This class keeps what timm does not give: :meth:`state_dict` holds
    the averaged model's own keys (timm's are prefixed ``module.``), so checkpoints written before load
    unchanged, and :func:`model_weights` of it loads into a fresh model; and :meth:`update` names a key that is
    missing, extra or of another shape (timm pairs the two state dicts by position, unchecked). :attr:`module` is a deep copy of the
    model in eval mode with gradients off; call :meth:`update` after each optimiser step and evaluate or save
    :attr:`module`. With ``decay = 0.999`` the average spans roughly the last 1,000 steps.

    A short run needs ``warmup``: with a fixed decay of 0.995, 200 steps leave ``0.995**200 = 37 %`` of the
    average on the weights it started from (an untrained head). With ``warmup`` the decay of update ``t`` (from 1)
    is timm's ``min(decay, 1 - t**-3/4)`` (0 at the first update, which copies the model; 0.981 after 200 steps;
    ``decay`` from about 1,170 steps on for 0.995), so the average always spans the recent part of the run.
    The number of updates is kept in :meth:`state_dict` (key :data:`UPDATES_KEY`), so a resumed run goes on with
    the same decays.

    Args:
        model: the model being trained; copied once here, then never modified.
        decay: weight of the running average at each update, in ``[0, 1]``.
        warmup: ramp the decay up from 0 as above (timm's ``use_warmup``, ``warmup_power=3/4``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3

        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ModelEma: decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self._ema = ModelEmaV3(model, decay=self.decay, use_warmup=self.warmup, warmup_power=0.75)
        self.module = self._ema.module
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights.

        Args:
            model: the trained model; same architecture (keys and shapes) as the one given at construction.

        Raises:
            ValueError: naming the first key that is missing, extra or of another shape.
        """
        _check_same_layout(self.module.state_dict(), "the EMA model", model.state_dict(), "ModelEma.update")
        self.updates += 1
        # timm's step t gives decay 0 at t <= 1, then min(decay, 1 - (t - 1) ** -0.75) with warmup
        self._ema.update(model, step=self.updates if self.warmup else None)

    def current_decay(self) -> float:
        """The decay the last :meth:`update` used (``decay`` itself before any, or without ``warmup``)."""
        return self._ema.get_decay(self.updates if self.warmup and self.updates else None)

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's state dict, plus the number of updates under :data:`UPDATES_KEY` (load the
        weights into a plain model with ``module.state_dict()`` or :func:`model_weights`)."""
        return {**self.module.state_dict(), UPDATES_KEY: torch.tensor(self.updates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the averaged weights (e.g. when resuming a run).

        Args:
            state: a state dict from :meth:`state_dict` (or of the same architecture). Without
                :data:`UPDATES_KEY` (a checkpoint written before it was kept) the warm-up counts as finished.
        """
        state = dict(state)
        updates = state.pop(UPDATES_KEY, None)
        self.updates = int(updates) if updates is not None else 10**9
        self.module.load_state_dict(state)


def model_weights(state: Mapping[str, Any]) -> dict[str, Any]:
    """A :meth:`ModelEma.state_dict` without its update count: the averaged model's own state dict."""
    return {k: v for k, v in state.items() if k != UPDATES_KEY}
