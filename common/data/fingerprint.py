"""Fingerprints of what a stage read: the competition's tables, its images and the stages before it.

A stage is skipped only when its whole fingerprint matches the one in its ``_done.json`` marker:

* the stage's parameters (:meth:`common.config.StageConfig.fingerprint`);
* ``data_files``: a SHA-256 of each competition table (``train.csv``, ``test.csv``, ``boxes.csv``,
  ``sample_submission.csv``; ``None`` when absent) and, per image folder, a hash of every file's name, size and
  modification time (:func:`images_hash`);
* ``upstream``: a hash of each earlier stage's marker that this stage reads (:data:`UPSTREAM`), so a rerun of
  stage 01 on new data makes stage 02 stale, and so on down the chain.

Fold models (stages 02 and 05) record :func:`model_data` in their ``config.json``: the content of ``train.csv``
and the names and sizes of the training images (no times, so a model trained on one machine still loads on
another copy of the same data, e.g. on Kaggle). :func:`check_model` refuses a model trained on other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from common.core import paths, store

TABLES = ("train.csv", "test.csv", "boxes.csv", "sample_submission.csv")
IMAGE_DIRS = ("train_images", "test_images")
# stage -> the stages of the same experiment whose outputs it reads
UPSTREAM = {"01": (), "02": ("01",), "03": ("01", "02"), "04": ("02", "03"), "05": ("01",), "06": ()}


def file_hash(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes (``None`` when it does not exist).

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def images_hash(folder: str | os.PathLike, times: bool = True) -> str | None:
    """SHA-256 over the sorted ``name|size|mtime_ns`` lines of a folder's files (``None`` when absent).

    Args:
        folder: an image folder (not recursive; hidden files skipped).
        times: include modification times (``False``: names and sizes only, the same on every copy).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    lines = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            st = entry.stat()
            lines.append(f"{entry.name}|{st.st_size}" + (f"|{st.st_mtime_ns}" if times else ""))
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def data_fingerprint(root: str | os.PathLike) -> dict[str, str | None]:
    """Hashes of a competition folder's tables and image folders (see the module docstring).

    Args:
        root: the competition folder.
    """
    root = Path(root)
    out: dict[str, str | None] = {name: file_hash(root / name) for name in TABLES}
    out.update({name: images_hash(root / name) for name in IMAGE_DIRS})
    return out


def model_data(root: str | os.PathLike) -> dict[str, str | None]:
    """What a fold model was trained on: ``train.csv``'s content and the training images' names and sizes.

    Args:
        root: the competition folder.
    """
    root = Path(root)
    return {"train.csv": file_hash(root / "train.csv"), "train_images": images_hash(root / "train_images", False)}


def marker_hash(stage_dir: str | os.PathLike) -> str | None:
    """SHA-256 of a finished stage's ``_done.json`` parameters (``None`` when it has not finished).

    Args:
        stage_dir: the stage's folder.
    """
    marker = Path(stage_dir) / "_done.json"
    if not marker.is_file():
        return None
    return fingerprint_key(store.read_json(marker).get("params"))


def fingerprint_key(params: Any) -> str:
    """A short, stable hash of a JSON-able fingerprint (sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def upstream(cfg: Any) -> dict[str, str | None]:
    """Marker hashes of the stages ``cfg``'s stage reads: ``"<exp>/<stage>" -> hash``.

    Besides :data:`UPSTREAM` (this experiment): stage 00 of the experiment that ``pretrained`` names (stages 02
    and 05), stage 01's ``crops_from``, stage 05's ``distill_from``, and stage 06's ``members``/``soup_members``
    (stage 05) and ``embed_members`` (stage 03).

    Args:
        cfg: a stage config.
    """
    reads = [(cfg.exp, s) for s in UPSTREAM.get(cfg.stage, ())]
    if pretrained_stage(cfg) is not None:
        reads.append((cfg.pretrained, "00"))
    if getattr(cfg, "crops_from", ""):
        reads.append((cfg.crops_from, "01"))
    if getattr(cfg, "distill_from", ""):
        reads.append((cfg.distill_from, "05"))
    if cfg.stage == "06":
        reads += [(m, "05") for m in cfg.member_list("members") + cfg.member_list("soup_members")]
        reads += [(m, "03") for m in cfg.member_list("embed_members")]
    return {f"{exp}/{stage}": marker_hash(paths.stage_dir(exp, stage)) for exp, stage in sorted(set(reads))}


def training_inputs(cfg: Any) -> dict[str, str | None]:
    """What a fold model of stage 02 or 05 reads besides the competition: stage 01's train crops (names, sizes,
    times: unchanged crops keep their times when stage 01 reruns) and, for distillation, the teacher's marker.

    Args:
        cfg: an embedder or classifier config.
    """
    crops = paths.stage_dir(cfg.exp, "01") / "crops" / "train"
    out = {"crops": images_hash(crops) if getattr(cfg, "use_crops", False) else None}
    if getattr(cfg, "distill_from", ""):
        out["teacher"] = marker_hash(paths.stage_dir(cfg.distill_from, "05"))
    backbone = pretrained_stage(cfg)
    if backbone is not None:  # the self-supervised backbone's bytes, not only the experiment's name
        out["pretrained"] = file_hash(backbone)
    return out


def pretrained_stage(cfg: Any) -> Path | None:
    """The stage-00 ``backbone.pt`` that ``cfg.pretrained`` names (an experiment whose stage 00 finished), or
    ``None`` (``auto``, ``timm``, ``none``, a weights file, or no such experiment)."""
    name = getattr(cfg, "pretrained", "")
    if not name or name in ("auto", "timm", "none"):
        return None
    from common.core.weights import ssl_backbone_file

    return ssl_backbone_file(name)


def stage_fingerprint(cfg: Any) -> dict[str, Any]:
    """A stage's full fingerprint: its parameters, ``data_files`` and ``upstream`` (see the module docstring).

    The keys must not be parameter names: ``_done.json`` also tells which parameters a run used
    (:func:`common.cli.kaggle.run_params`).

    Args:
        cfg: a stage config (its ``data`` names the competition folder; a missing one hashes to ``None``).
    """
    return {**cfg.fingerprint(), "data_files": data_fingerprint(paths.data_dir(cfg.data)), "upstream": upstream(cfg)}


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, as short phrases (``"epochs 2 -> 3"``, ``"data_files train.csv"``).

    Args:
        old: the recorded fingerprint (``None``: nothing recorded).
        new: the current one.
    """
    if old is None:
        return ["no record of an earlier run"]
    new = json.loads(json.dumps(new, sort_keys=True, default=str))
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if store.same_param(key, a, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key} {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key in ("data_files", "upstream"):
            out.append(key)
        else:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


def recorded(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint in a stage folder's ``_done.json`` (``None`` when absent)."""
    marker = Path(stage_dir) / "_done.json"
    return store.read_json(marker).get("params") if marker.is_file() else None


class StaleModelError(ValueError):
    """A fold model was trained on other data than the competition given now."""


def check_model(meta: dict[str, Any], root: str | os.PathLike, where: str | os.PathLike) -> None:
    """Refuse a fold model whose ``config.json`` records other training data than ``root`` holds now.

    Models written before fingerprints were recorded (no ``data_fingerprint``) are accepted.

    Args:
        meta: the fold's ``config.json``.
        root: the competition folder of this run.
        where: the ``config.json`` path, for the message.
    """
    old = meta.get("data_fingerprint")
    if old is None:
        return
    now = model_data(root)
    differ = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if differ:
        raise StaleModelError(
            f"{where}: this model was trained on other data ({', '.join(differ)} of {root} differ): rerun its "
            "training stage with --force (force=True), or set data to the folder it was trained on")
