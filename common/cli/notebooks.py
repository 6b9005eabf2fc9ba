"""Write each notebook's ``parameters`` cell from its stage config: ``python -m common.cli.notebooks [--check]``.

The cell is flat and type-hinted, one line per field with the field's help as its comment (what
``papermill --help-notebook`` prints), grouped by the config class that declares the field. Nothing in it is
derived: the config computes derived values. Change a default or a help text in ``common/config/`` and run
this command; ``--check`` (run by the tests) exits 1 when a notebook's cell differs from what it would write.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, get_type_hints

from common.cli.pipeline import NOTEBOOKS_DIR, notebook_for
from common.config import NOTEBOOK_ONLY_PARAMS, STAGE_CONFIGS, StageConfig

# Group headings, by the class that declares the fields (the stage's own class: "stage NN only").
GROUPS = {
    "StageConfig": "every stage",
    "FoldConfig": "per-fold stages (02-05)",
    "TrainConfig": "training stages (02, 05)",
    "SweepFields": "retrieval and threshold sweep (04, 06)",
}


def literal(value: Any) -> str:
    """The Python source of a default: ``"demo"``, ``42``, ``0.001``, ``True``.

    Args:
        value: a str, int, float or bool.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a double-quoted Python string for plain text
    if isinstance(value, bool | int | float):
        return repr(value)
    raise TypeError(f"default {value!r}: parameters are str, int, float or bool")


def line(name: str, hint: str, value: Any, doc: str) -> str:
    """One parameter line: ``name: hint = value  # doc``.

    Args:
        name: the parameter.
        hint: its type's name (``str``, ``int``, ``float``, ``bool``).
        value: its default.
        doc: its help; must not contain ``=`` (papermill skips a line with two, so the help would be lost).
    """
    if "=" in doc or "\n" in doc:
        raise ValueError(f"parameter {name}: its help {doc!r} has '=' or a line break; papermill cannot read it")
    return f"{name}: {hint} = {literal(value)}  # {doc}".rstrip()


def declared_by(cls: type, name: str) -> type:
    """The class in ``cls``'s bases (itself included) that first declares field ``name``."""
    for base in reversed(cls.__mro__):
        if name in vars(base).get("__annotations__", {}):
            return base
    raise KeyError(name)


def parameters_cell(cls: type[StageConfig]) -> str:
    """The source of the ``parameters`` cell of stage ``cls.stage``.

    Args:
        cls: a stage config class.
    """
    hints = get_type_hints(cls)
    out = [f"# Stage {cls.stage} parameters, written from common.config.{cls.__name__} by "
           "`python -m common.cli.notebooks`:",
           "# edit the config, then rerun it. The runner injects its values in a cell below this one.",
           *(line(n, "str", "", doc.replace("<stage>", cls.stage)) for n, doc in NOTEBOOK_ONLY_PARAMS.items())]
    group = None
    docs = cls.field_docs()
    for f in dataclasses.fields(cls):
        owner = declared_by(cls, f.name)
        heading = GROUPS.get(owner.__name__, f"stage {cls.stage} only")
        if heading != group:
            out += ["", f"# -- {heading}"]
            group = heading
        out.append(line(f.name, hints[f.name].__name__, f.default, docs[f.name]))
    return "\n".join(out)


def tagged_cell(nb: dict, path: Path) -> dict:
    """The one code cell tagged ``parameters`` of a notebook (as read by :mod:`json`)."""
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: {len(cells)} cells tagged `parameters`, expected exactly 1")
    return cells[0]


def source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def stale(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The notebooks whose parameters cell differs from :func:`parameters_cell`."""
    out = []
    for stage, cls in STAGE_CONFIGS.items():
        path = notebook_for(stage, notebooks_dir)
        if source(tagged_cell(json.loads(path.read_text()), path)) != parameters_cell(cls):
            out.append(path)
    return out


def write(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Rewrite the parameters cell of every stale notebook, keeping the rest byte for byte; returns them."""
    changed = stale(notebooks_dir)
    for path in changed:
        nb = json.loads(path.read_text())
        stage = path.name[:2]
        lines = parameters_cell(STAGE_CONFIGS[stage]).splitlines(keepends=True)
        tagged_cell(nb, path)["source"] = lines
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")  # nbformat's layout
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is stale")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="the notebooks folder")
    args = parser.parse_args(argv)
    if args.check:
        found = stale(args.notebooks)
        for path in found:
            print(f"{path}: parameters cell differs from its config; run python -m common.cli.notebooks")
        return 1 if found else 0
    for path in write(args.notebooks):
        print(f"wrote the parameters cell of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
