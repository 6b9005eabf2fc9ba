"""Fold checkpoints shared by the training stages (02 and 05): skip, refuse, save and resume.

A fold folder holds ``config.json`` (with the stage config under ``"config"``), ``last.pt`` (the training state
after the last finished epoch), ``log.csv`` (one row per epoch) and, once finished, ``_done.json``. The rules:

* a fold that finished with the same model parameters is skipped (its log is returned);
* a fold that finished with other parameters, or a ``last.pt`` written under other parameters, is refused
  (``force=True`` starts over) rather than silently mixed in;
* the state is one ``torch.save`` of plain state dicts (loaded with ``weights_only=True``), rewritten atomically
  after every epoch; resuming restores every object and keeps the log rows up to that epoch.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from common.core import store


def finished_log(out: Path, params: dict[str, Any], force: bool,
                 defaults: dict[str, Any] | None = None) -> pd.DataFrame | None:
    """The log of a fold that already finished with ``params``, else ``None`` (train it).

    Args:
        out: the fold folder.
        params: the values that decide the trained model.
        force: delete the folder first (retrain from scratch).
        defaults: the parameters' defaults: one added to the code since the fold finished, at its default,
            is not a change (:func:`common.core.store.changed_params`).

    Raises:
        RuntimeError: the fold finished with other parameters.
    """
    if force and out.exists():
        shutil.rmtree(out)
    if store.stage_done(out, params, defaults):
        return pd.read_csv(out / "log.csv")
    if store.stage_done(out):
        old = store.read_json(out / "_done.json").get("params", {})
        changed = _changed(old, params, defaults)
        unknown = sorted(set(old) - set(params))  # saved by a version of the code with more model parameters
        if unknown:
            changed.append(f"{', '.join(unknown)}, which this version does not know: a newer version trained it")
        raise RuntimeError(f"{out} holds a model trained with other parameters or data (changed: "
                           f"{'; '.join(changed)}); use force=True (--force) to retrain")
    return None


def check_resumable(out: Path, params: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse a ``last.pt`` written under other parameters (read from the fold's ``config.json``), or by a version
    with model fields this one lacks (``config.json``'s ``model_fields``: the fields that decided that model).

    Args:
        out: the fold folder.
        params: the values that decide the trained model (their keys are the ones compared).
        defaults: the parameters' defaults (see :func:`finished_log`).
    """
    if not (out / "last.pt").exists():
        return
    meta = store.read_json(out / "config.json")
    old = {**meta["config"], **{k: meta[k] for k in ("data_fingerprint", "upstream") if k in meta}}
    changed = _changed(old, params, defaults)
    unknown = sorted(set(meta.get("model_fields", ())) - set(params))  # a newer version's model fields
    if unknown:
        changed.append(f"{', '.join(unknown)}, which this version does not know: a newer version started it")
    if changed:
        raise RuntimeError(f"{out / 'last.pt'}: checkpoint from other parameters or data (changed: "
                           f"{', '.join(changed)}); use force=True to start over")


def _changed(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The keys of ``new`` whose value differs in ``old`` (compared as JSON; see
    :func:`common.core.store.changed_params` for ``defaults``)."""
    return [k for k in store.changed_params(old, new, defaults) if k in new]


def save_state(out: Path, epoch: int, objects: Mapping[str, Any]) -> None:
    """Write ``last.pt`` atomically: ``epoch`` and each object's ``state_dict()`` under its name.

    Args:
        out: the fold folder.
        epoch: the epoch just finished.
        objects: name -> anything with ``state_dict()`` (model, optimizer, scheduler, scaler, EMA, loss);
            ``None`` values are skipped.
    """
    state = {name: obj.state_dict() for name, obj in objects.items() if obj is not None}
    state["epoch"] = int(epoch)
    with store.atomic_path(out / "last.pt") as tmp:
        torch.save(state, tmp)


def saved_epoch(out: Path) -> int:
    """The last finished epoch that ``last.pt`` holds (0: none), read without loading its tensors (memory-mapped),
    so a loop can start the next epoch's data loading before it builds the model that :func:`resume` restores.

    Args:
        out: the fold folder.
    """
    last = out / "last.pt"
    if not last.exists():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def resume(out: Path, objects: Mapping[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Restore ``last.pt`` into ``objects``; returns the last finished epoch and the log rows up to it.

    Args:
        out: the fold folder.
        objects: the same names as given to :func:`save_state`; ``None`` values are skipped.

    Returns:
        ``(0, [])`` when there is no ``last.pt`` (a fresh start).
    """
    last = out / "last.pt"
    if not last.exists():
        return 0, []
    state = torch.load(last, map_location="cpu", weights_only=True)
    for name, obj in objects.items():
        if obj is not None:
            if name not in state:
                raise RuntimeError(f"{last}: no {name!r} state to resume from; use force=True to start over")
            obj.load_state_dict(state[name])
    epoch = int(state["epoch"])
    rows = pd.read_csv(out / "log.csv").to_dict("records") if (out / "log.csv").exists() else []
    return epoch, [r for r in rows if r["epoch"] <= epoch]
