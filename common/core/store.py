"""Every file that crosses a stage boundary is written and read here.

Formats (no pickle anywhere):

* arrays: ``.npz`` holding the array(s) plus an ``image`` array of ids, one per row. :func:`load_arrays`
  checks the ids against the ids the caller expects (same set, same order) and raises naming the first row
  that differs, so a reordered table can never silently pair an embedding with the wrong image.
* tables: CSV (pandas), written atomically.
* metrics, configs and stage markers: JSON, written atomically with sorted keys.
* checkpoints: ``torch.save`` of a plain ``dict`` of tensors and numbers, read with ``weights_only=True``.

Atomic means: written to ``<name>.tmp-<pid>`` in the same folder, then ``os.replace``-d onto the final name,
so a killed run leaves either the old file or the new one, never half of one. :func:`atomic_dir` does the same
for a whole folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.core.paths import data_dir


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive).

    Args:
        pid: the process id, as written into a temporary name.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; put it in place of ``path`` only if the block succeeds.

    The block writes into ``.<name>.tmp-<pid>``; on success an existing ``path`` is moved aside to
    ``.<name>.old-<pid>``, the new folder renamed onto ``path`` (``os.replace``, atomic on one file system)
    and the old one deleted. On an exception the temporary folder is deleted and ``path`` is left as it was.
    Temporary folders of ``path`` left by killed processes (SIGKILL skips ``finally``) are deleted first.

    Args:
        path: the folder to create or replace.

    Raises:
        OSError: when another process puts a folder at ``path`` between the move aside and the rename (the
            other folder is kept, ours deleted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            os.replace(path, old)  # os.replace cannot replace a folder that is not empty
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the old folder back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. NumPy scalars and arrays are converted."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def update_json(path: str | os.PathLike, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into the JSON object in ``path`` (created when absent), atomically; returns the result.

    Several stages share ``working/<exp>/metrics.json``: each updates its own keys and keeps the others'.
    """
    path = Path(path)
    current = read_json(path) if path.exists() else {}
    if not isinstance(current, dict):
        raise ValueError(f"{path}: expected a JSON object to update, found {type(current).__name__}")
    current.update(values)
    write_json(path, current)
    return current


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write a table as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def save_arrays(path: str | os.PathLike, image: Sequence[str], **arrays: np.ndarray) -> Path:
    """Save arrays whose rows belong to ``image`` ids.

    Args:
        path: target ``.npz`` file.
        image: one id per row, in row order.
        **arrays: arrays with ``len(image)`` rows each (e.g. ``embeddings=...``).
    """
    ids = np.asarray([str(i) for i in image])
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"{path}: image ids are not unique")
    for name, arr in arrays.items():
        if name == "image":
            raise ValueError("'image' is reserved for the ids")
        if len(arr) != len(ids):
            raise ValueError(f"{path}: array {name!r} has {len(arr)} rows but there are {len(ids)} image ids")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, image=ids, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def load_arrays(path: str | os.PathLike, expected_image: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Load an ``.npz`` written by :func:`save_arrays` and check its row order.

    Args:
        path: the ``.npz`` file.
        expected_image: the ids the caller's table has, in its row order. When given, the file's ids must be
            exactly these, in this order; the error names the first row that differs.

    Returns:
        ``{"image": ids, <name>: array, ...}``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
    with np.load(path, allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}
    if "image" not in out:
        raise ValueError(f"{path}: no 'image' id array (not written by common.core.store.save_arrays)")
    if expected_image is not None:
        check_row_order(out["image"], expected_image, str(path))
    return out


def check_row_order(found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming the first row where ``found`` and ``expected`` ids differ."""
    found = [str(x) for x in found]
    expected = [str(x) for x in expected]
    if len(found) != len(expected):
        raise ValueError(f"{where}: {len(found)} rows but {len(expected)} expected")
    for row, (a, b) in enumerate(zip(found, expected, strict=True)):
        if a != b:
            raise ValueError(f"{where}: row {row} is image {a!r} but {b!r} was expected (row order differs)")


def stage_done(stage_dir: str | os.PathLike, params: dict[str, Any] | None = None,
               defaults: dict[str, Any] | None = None) -> bool:
    """True when ``stage_dir/_done.json`` exists and (if given) was written with the same params
    (:func:`changed_params`: a parameter added to the code after the run counts as unchanged at its default).

    Args:
        stage_dir: the stage (or fold) folder.
        params: the parameters to compare with the recorded ones; ``None``: any finished run.
        defaults: the parameters' defaults (``StageConfig.defaults()``).
    """
    marker = Path(stage_dir) / "_done.json"
    if not marker.exists():
        return False
    if params is None:
        return True
    return not changed_params(read_json(marker).get("params") or {}, params, defaults)


def changed_params(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The keys whose value differs between a recorded ``old`` and a current ``new`` set of parameters (compared
    as JSON), sorted. A key that ``old`` lacks is unchanged when its ``new`` value is its default: a parameter
    added to the code after the run was recorded, left at the default, does not make every earlier run stale;
    so a new parameter's default must reproduce what the code did before it existed.

    Args:
        old: the recorded parameters.
        new: the current ones.
        defaults: the current parameters' defaults (``None``: none; then every missing key is a change).
    """
    def norm(d: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    old, new, defaults = norm(old), norm(new), norm(defaults or {})
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new[key] == defaults[key]:
            continue
        if not same_param(key, old.get(key, _MISSING), new.get(key, _MISSING)):
            out.append(key)
    return out


_MISSING = object()


def same_param(key: str, a: Any, b: Any) -> bool:
    """Whether two recorded values of parameter ``key`` are the same. ``data`` compares the folders it names:
    ``inputs/x``, ``x`` and ``/abs/.../inputs/x`` are one competition (its files are fingerprinted apart)."""
    if a == b:
        return True
    if key == "data" and isinstance(a, str) and isinstance(b, str):
        return data_dir(a).resolve() == data_dir(b).resolve()
    return False


def mark_done(stage_dir: str | os.PathLike, params: dict[str, Any], **extra: Any) -> Path:
    """Write the marker that says a stage finished, with the params it ran with."""
    payload = {"params": json.loads(json.dumps(params, sort_keys=True, default=str)), **extra}
    return write_json(Path(stage_dir) / "_done.json", payload)
