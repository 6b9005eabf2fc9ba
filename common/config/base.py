"""The machinery every stage config shares: declared fields with their help, coercion, validation, loading.

A field is declared once, with :func:`param`: its default, a one-line help (the notebook's parameters cell
and ``papermill --help-notebook`` show it), whether it defines a trained model (``model=True``: a resumed or
finished fold must agree on it) and, for fields that take one of a few words, the choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_type_hints

from common.config import params as _params

T = TypeVar("T", bound="StageConfig")


def param(default: Any, doc: str, *, model: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A config field: ``backbone: str = param("resnet18", "any timm model name.", model=True)``.

    Args:
        default: the default value (a str, int, float or bool).
        doc: the field's help, one sentence or two; white space is collapsed to single spaces.
        model: the field defines the trained model (listed by :meth:`StageConfig.model_fields`).
        choices: the only values allowed (checked on construction, with the choices in the error).
    """
    meta = {"doc": " ".join(doc.split()), "model": model, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Fields every stage shares, and the machinery: ``from_params``, ``fingerprint``, ``model_fields``."""

    stage: ClassVar[str] = ""

    data: str = param("demo", "competition folder: a name under inputs/ (demo is generated on first use) "
                      "or a path.")
    exp: str = param("demo", "experiment name; outputs go to working/<exp>/ and submissions/<exp>.csv.")
    seed: int = param(42, "seed for splits, initialisation, augmentation and loader order.", model=True)
    device: str = param("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")
    num_workers: int = param(0, "data-loader worker processes (0: the main process; -1: sized to the machine, "
                             "its CPU cores shared by the training processes, one left for the main loop, "
                             "at most 8).")
    force: bool = param(False, "rerun the stage even when its outputs exist with the same parameters.")
    bad_images: str = param("error", "error (stop at the first unreadable image) or skip (drop unreadable train "
                            "images, read unreadable test images as a grey placeholder so each keeps its "
                            "submission row; every skipped image is listed in the notebook and metrics.json).",
                            choices=("error", "skip"))

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(f.name, value, hints[f.name]))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: use one of {list(choices)}")
        from common.config.checks import check  # ranges and cross-field rules (a sibling module: no cycle)

        check(self)

    # -- the fields ----------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """``{field: its one-line help}``, in field order."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

    @classmethod
    def model_fields(cls) -> tuple[str, ...]:
        """The fields tagged ``model=True``: those that define a trained model, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("model"))

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_params(cls: type[T], namespace: Mapping[str, Any], params_file: str | None = None) -> T:
        """Build the config from a notebook's globals (or any mapping).

        Args:
            namespace: usually ``globals()`` of the notebook; keys that are not fields are ignored.
            params_file: optional YAML file; defaults to ``namespace["params_file"]``. Its keys override the
                namespace's values, and its per-stage keys (``02.lr``) override its flat ones for this
                stage. Keys unknown to every stage raise (typos are caught, not ignored).
        """
        names = cls.field_names()
        values = {k: namespace[k] for k in names if k in namespace}
        params_file = params_file if params_file is not None else namespace.get("params_file", "")
        if params_file:
            values.update(_params.for_stage(cls.stage, _params.load_params(params_file), names))
        return cls(**values)

    def split_seed(self) -> int:
        """The seed of the stage's data splits: ``seed`` (the per-fold stages can set it apart: ``fold_seed``)."""
        return self.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The values that decide a stage's outputs (``force`` and ``num_workers`` do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("force", "num_workers", "trust_checkpoint")}


def document(cls: type[StageConfig]) -> type[StageConfig]:
    """Append an ``Args:`` block of every field's help to ``cls.__doc__`` (what ``help(cls)`` shows).

    Args:
        cls: a config class whose fields were declared with :func:`param`.
    """
    block = "\n".join(f"        {name}: {doc}" for name, doc in cls.field_docs().items())
    cls.__doc__ = f"{(cls.__doc__ or cls.__name__).rstrip()}\n\n    Args:\n{block}\n"
    return cls


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Coerce a value to a field's scalar type, with a clear error."""
    target = {"str": str, "int": int, "float": float, "bool": bool}.get(getattr(hint, "__name__", str(hint)))
    if target is None or isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    if target is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif target is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif target is int and isinstance(value, str | float) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().removeprefix("-").isdecimal():  # "--3", "²" -> TypeError
            return int(value)
    elif target is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"parameter {name}={value!r}: expected {target.__name__}")
