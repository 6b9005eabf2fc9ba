"""Parameters files and command-line values: reading, checking, and picking one stage's values.

A parameter is named flat (``backbone``: every stage that has the field) or per stage (``05.backbone``:
stage 05 only, over the flat value). Both forms work in a YAML parameters file, in the runner's
``-p key=value`` and in a notebook's ``params_file``, so one file can give stage 02 and stage 05 different
backbones::

    backbone: tf_efficientnet_lite0      # every stage with a backbone ...
    05.backbone: mobilenetv3_small_100   # ... except stage 05

The stage configs register here (:func:`register`, called once by ``common.config.stages``), so this module
imports no other config module: ``StageConfig.from_params`` can read a file without an import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

# Parameters that are not config fields but that every notebook's parameters cell accepts: name -> help.
NOTEBOOK_ONLY_PARAMS = {
    "params_file": "optional YAML parameters file (flat keys, and <stage>.key ones for this stage only); "
                   "its values override this cell's",
}
# Per-stage names the runner cannot honour: one run has one experiment.
NOT_PER_STAGE = ("exp",)

_STAGES: dict[str, Any] = {}  # "01" -> CropConfig, ...: filled by register()


def register(*classes: Any) -> dict[str, Any]:
    """Record the stage configs (each has ``stage`` and ``field_names()``); returns ``{stage: class}``.

    Args:
        classes: the stage config classes, in stage order.
    """
    for cls in classes:
        if not cls.stage or cls.stage in _STAGES and _STAGES[cls.stage] is not cls:
            raise ValueError(f"{cls.__name__}: stage {cls.stage!r} is empty or registered twice")
        _STAGES[cls.stage] = cls
    return dict(_STAGES)


def known_params() -> set[str]:
    """Every flat parameter name some stage accepts."""
    names: set[str] = set(NOTEBOOK_ONLY_PARAMS)
    for cls in _STAGES.values():
        names.update(cls.field_names())
    return names


def split_key(key: str) -> tuple[str | None, str]:
    """``"05.backbone"`` -> ``("05", "backbone")``; ``"backbone"`` -> ``(None, "backbone")``.

    Args:
        key: a parameter name, flat or per stage.
    """
    stage, dot, name = str(key).partition(".")
    return (stage, name) if dot else (None, str(key))


def check_key(key: str, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` when ``key`` is no flat or per-stage parameter.

    Args:
        key: ``name`` or ``<stage>.name``.
        where: what the key came from, for the message (``params/x.yaml``, ``-p``).
    """
    stage, name = split_key(key)
    if stage is None:
        if name not in known_params():
            raise ValueError(f"{where}: unknown parameter {name!r}; known: {sorted(known_params())}")
        return
    if stage not in _STAGES:
        raise ValueError(f"{where}: {key!r} names unknown stage {stage!r}; stages: {sorted(_STAGES)}")
    fields = _STAGES[stage].field_names()
    if name not in fields:
        raise ValueError(f"{where}: stage {stage} has no parameter {name!r} ({key!r}); "
                         f"its parameters: {fields}")
    if name in NOT_PER_STAGE:
        raise ValueError(f"{where}: {key!r}: {name} is one for the whole run; set it without a stage")


def for_stage(stage: str, params: Mapping[str, Any], fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The values stage ``stage`` takes: its flat fields, then its ``<stage>.name`` keys over them.

    Args:
        stage: ``"01"`` ... ``"06"``.
        params: flat and per-stage keys (a parameters file, ``-p`` values, a notebook's globals).
        fields: the stage's field names (default: those of the registered config of ``stage``).
    """
    names = list(fields) if fields is not None else _STAGES[stage].field_names()
    values = {k: params[k] for k in names if k in params}
    values.update({name: v for k, v in params.items() for s, name in [split_key(k)] if s == stage and name in names})
    return values


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML parameters file and check every key is a known parameter (flat or per stage).

    Args:
        path: the YAML file (relative paths resolve against the current folder, then the project root).
    """
    from common.core.paths import project_root

    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = project_root() / path
    if not path.exists():
        raise FileNotFoundError(f"parameters file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # one line naming the file and line, not a scanner traceback
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not a YAML parameters file "
                         f"({getattr(err, 'problem', None) or type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a flat mapping of parameter: value")
    loaded = {str(k): v for k, v in loaded.items()}
    unknown = sorted(k for k in loaded if split_key(k)[0] is None and k not in known_params())
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; known: {sorted(known_params())}")
    for key in loaded:
        check_key(key, str(path))
    nested = [k for k, v in loaded.items() if isinstance(v, dict | list)]
    if nested:
        raise ValueError(f"{path}: parameters must be flat scalars, not {nested}")
    return loaded


def parse_cli_value(text: str) -> Any:
    """Parse ``-p key=value`` values the way YAML would (``3`` -> int, ``true`` -> bool, ``0.5`` -> float)."""
    return yaml.safe_load(text) if text != "" else ""
