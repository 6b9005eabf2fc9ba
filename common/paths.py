"""Where things live: the one place that resolves `inputs/`, `working/` and `submissions/`.

Resolution order for each folder (first match wins):

1. an explicit environment variable: ``REID_INPUT_DIR``, ``REID_WORKING_DIR``, ``REID_SUBMISSIONS_DIR``;
2. on Kaggle (``KAGGLE_KERNEL_RUN_TYPE`` set, or ``/kaggle/input`` present): ``/kaggle/input``,
   ``/kaggle/working`` and ``/kaggle/working`` (the Kaggle root itself is overridable with ``KAGGLE_ROOT``,
   which is how the tests fake one);
3. the project root (``REID_ROOT``, else the nearest folder above the current directory that holds both
   ``common/`` and ``notebooks/``, else the folder that holds this package) + ``inputs``/``working``/
   ``submissions``.

Because the root is found from the current directory *or* from the package itself, a notebook gives the same
paths whether Jupyter started it in ``notebooks/``, papermill started it from the repository root, or a user
opened it from anywhere else with the package installed in editable mode.

Stage outputs of an experiment live under ``working/<exp>/<stage>/``; see :func:`stage_dir`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STAGES: dict[str, str] = {
    "01": "01_crop",
    "02": "02_embedder",
    "03": "03_embeddings",
    "04": "04_retrieval",
    "05": "05_classifier",
    "06": "06_ensemble",
}

_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def on_kaggle() -> bool:
    """True inside a Kaggle kernel (or a faked one: ``KAGGLE_ROOT`` pointing at a fake tree)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return True
    return Path(kaggle_root(), "input").is_dir() and Path(kaggle_root(), "working").is_dir()


def kaggle_root() -> Path:
    """Root of the Kaggle tree: ``/kaggle`` unless ``KAGGLE_ROOT`` overrides it."""
    return Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))


def _looks_like_root(path: Path) -> bool:
    return (path / "common").is_dir() and (path / "notebooks").is_dir()


def project_root() -> Path:
    """The repository root (see the module docstring for the search order)."""
    env = os.environ.get("REID_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if _looks_like_root(candidate):
            return candidate
    package_parent = Path(__file__).resolve().parents[1]
    if _looks_like_root(package_parent):
        return package_parent
    return here


def _resolve(env_var: str, kaggle_sub: str, local_sub: str) -> Path:
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser().resolve()
    if on_kaggle():
        return kaggle_root() / kaggle_sub
    return project_root() / local_sub


def inputs_dir() -> Path:
    """Folder that holds competition folders (``inputs/<competition>/train.csv`` ...)."""
    return _resolve("REID_INPUT_DIR", "input", "inputs")


def working_dir() -> Path:
    """Folder that receives every run's outputs, one sub-folder per experiment."""
    return _resolve("REID_WORKING_DIR", "working", "working")


def submissions_dir() -> Path:
    """Folder that receives submission CSVs (on Kaggle: ``/kaggle/working``)."""
    return _resolve("REID_SUBMISSIONS_DIR", "working", "submissions")


def data_dir(data: str | os.PathLike) -> Path:
    """Resolve a competition folder given as a path or as a name under :func:`inputs_dir`.

    Args:
        data: ``"demo"``, ``"inputs/demo"``, ``"/abs/path/to/comp"`` or ``"~/comp"``.

    Returns:
        An absolute path. It is not required to exist yet (the demo is generated on demand).
    """
    path = Path(data).expanduser()
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, project_root() / path, inputs_dir() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    # A bare name that does not exist yet lives under inputs/; a relative path under the project root.
    return (inputs_dir() / path) if len(path.parts) == 1 else (project_root() / path)


def check_exp_name(exp: str) -> str:
    """Validate an experiment name (it becomes a folder and a file name)."""
    if not _EXP_NAME.fullmatch(exp or ""):  # fullmatch: `$` alone lets "name\n" through
        raise ValueError(
            f"experiment name {exp!r} is not valid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return exp


def exp_dir(exp: str) -> Path:
    """``working/<exp>``."""
    return working_dir() / check_exp_name(exp)


def stage_dir(exp: str, stage: str) -> Path:
    """``working/<exp>/<stage folder>``; ``stage`` is ``"01"``..``"06"`` or a folder name."""
    name = STAGES.get(stage, stage)
    return exp_dir(exp) / name


def submission_path(exp: str) -> Path:
    """``submissions/<exp>.csv``."""
    return submissions_dir() / f"{check_exp_name(exp)}.csv"
