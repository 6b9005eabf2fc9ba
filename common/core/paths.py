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

Stage outputs of an experiment live under ``working/<exp>/<stage>/``; see :func:`stage_dir`. Writes always go
there. Reads of an earlier stage's outputs go through :func:`find_stage_dir`, which also looks in the
datasets and kernel outputs attached to a Kaggle notebook (both mount layouts: ``/kaggle/input/<slug>`` and
``/kaggle/input/datasets/<owner>/<slug>``), so checkpoints are found by experiment name, not by path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STAGES: dict[str, str] = {
    "00": "00_pretrain",
    "01": "01_crop",
    "02": "02_embedder",
    "03": "03_embeddings",
    "04": "04_retrieval",
    "05": "05_classifier",
    "06": "06_ensemble",
}

_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Kaggle mounts attached sources as <input>/<slug> (older kernels) or <input>/<group>/<owner>/<slug>
# (datasets, notebook outputs), and competitions as <input>/<slug> or <input>/competitions/<slug>.
ATTACHED_GROUPS = ("datasets", "notebooks", "kernels", "models")


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
    package_parent = Path(__file__).resolve().parents[2]  # <root>/common/core/paths.py
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
    candidates = [Path.cwd() / path, project_root() / path, inputs_dir() / path,
                  inputs_dir() / "competitions" / path]  # Kaggle's newer mount of a competition
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
    """``working/<exp>/<stage folder>``; ``stage`` is ``"00"``..``"06"`` or a folder name."""
    name = STAGES.get(stage, stage)
    return exp_dir(exp) / name


def submission_path(exp: str) -> Path:
    """``submissions/<exp>.csv``."""
    return submissions_dir() / f"{check_exp_name(exp)}.csv"


# -- reading an experiment's stage outputs wherever they are ----------------------------------------------------
class MissingStageError(FileNotFoundError):
    """An earlier stage's output is neither in ``working/`` nor in any attached Kaggle source."""


def kaggle_slug(text: str, min_len: int = 5, max_len: int = 50) -> str:
    """Kaggle's slug of a title: lowercase letters, digits and single dashes, ``min_len``..``max_len`` long.

    Kaggle derives a kernel's slug from its title this way and refuses dataset slugs outside 3-50 characters;
    a too-short slug is padded with ``-kaggle``.

    Args:
        text: any title or name (``"My Exp_01"`` -> ``"my-exp-01"``).
        min_len: shortest slug accepted.
        max_len: longest slug (the tail is cut, never leaving a trailing dash).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    if not slug:
        raise ValueError(f"{text!r}: no letter or digit to make a Kaggle slug from")
    slug = slug[:max_len].rstrip("-")
    while len(slug) < min_len:
        slug = f"{slug}-kaggle"[:max_len]
    return slug


def weights_slug(exp: str) -> str:
    """Slug of the Kaggle dataset holding experiment ``exp``'s checkpoints: ``<exp>-weights``."""
    return kaggle_slug(f"{check_exp_name(exp)}-weights")


def attached_dirs() -> list[Path]:
    """Folders of the sources attached to a Kaggle notebook (empty when not on Kaggle).

    Every ``<input>/<slug>`` plus every ``<input>/<group>/<owner>/<slug>`` (``group`` in
    :data:`ATTACHED_GROUPS`) and ``<input>/competitions/<slug>``, sorted, where ``<input>`` is
    :func:`inputs_dir`.
    """
    base = inputs_dir()
    if not on_kaggle() or not base.is_dir():
        return []
    out: list[Path] = []
    for child in sorted(p for p in base.iterdir() if p.is_dir()):
        out.append(child)
        if child.name in ATTACHED_GROUPS:
            for owner in sorted(p for p in child.iterdir() if p.is_dir()):
                out += sorted(p for p in owner.iterdir() if p.is_dir())
        elif child.name == "competitions":
            out += sorted(p for p in child.iterdir() if p.is_dir())
    return out


def stage_candidates(exp: str, stage: str, sources: list[Path] | None = None) -> list[Path]:
    """Where :func:`find_stage_dir` looks, in order: ``working/<exp>/<stage>``, then ``<src>/<exp>/<stage>``
    (and ``<src>/<exp>/<exp>/<stage>``, how an archive of the ``<exp>`` folder may unpack) for every attached
    source ``<src>`` (default: :func:`attached_dirs`)."""
    name = STAGES.get(stage, stage)
    out = [stage_dir(exp, stage)]
    for src in attached_dirs() if sources is None else sources:
        out += [src / exp / name, src / exp / exp / name]
    return out


def find_stage_dir(exp: str, stage: str, need: str = "", hint: str = "") -> Path:
    """The folder of experiment ``exp``'s stage ``stage`` that holds ``need``, for reading.

    Looks first in ``working/<exp>/<stage>`` (this run's own outputs win), then in every source attached to a
    Kaggle notebook (:func:`stage_candidates`). Writes never go through this: they go to :func:`stage_dir`.

    Args:
        exp: experiment name.
        stage: ``"01"``..``"06"`` or a stage folder name.
        need: a file or folder relative to the stage folder that must exist (``""``: the folder itself).
        hint: what to do when nothing is found (e.g. ``"run stage 02 first"``), put in the error.

    Raises:
        MissingStageError: nothing holds ``need``; the message names the path expected in ``working/`` and, on
            Kaggle, where it looked and the dataset slug to attach.
    """
    check_exp_name(exp)
    sources = attached_dirs()
    candidates = stage_candidates(exp, stage, sources)
    for folder in candidates:
        if (folder / need).exists():
            return folder
    message = f"{candidates[0] / need if need else candidates[0]} not found" + (f": {hint}" if hint else "")
    raise MissingStageError(message + missing_hint(exp, stage, need, sources))


def missing_hint(exp: str, stage: str, need: str = "", sources: list[Path] | None = None) -> str:
    """``""`` off Kaggle; on Kaggle, where :func:`find_stage_dir` looked and the dataset slug to attach."""
    if not on_kaggle():
        return ""
    sources = attached_dirs() if sources is None else sources
    names = ", ".join(str(s.relative_to(inputs_dir())) for s in sources) or "none"
    where = "/".join(p for p in (check_exp_name(exp), STAGES.get(stage, stage), need) if p)
    return (
        f". On Kaggle, looked in {working_dir()} and in the {len(sources)} source(s) attached under "
        f"{inputs_dir()} ({names}) for {where}: attach the dataset '<owner>/{weights_slug(exp)}' (made by "
        f"`python -m common.cli.kaggle build --exp {exp}`), or the output of the kernel that ran stage "
        f"{STAGES.get(stage, stage)} of {exp!r}"
    )
