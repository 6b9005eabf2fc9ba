"""Packaging and repository hygiene: pins agree, CI runs the README's command, notebooks are clean and thin,
and no weights or caches are committed."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGE_NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))  # others: e.g. compare_experiments
MAX_CELL_LINES = 15  # cells after the parameters cell call common functions; logic belongs in common/


def pins(lines: list[str], where: str) -> dict[str, str]:
    """``{canonical name: version}`` from ``name==version`` lines; anything else is an error."""
    out: dict[str, str] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        assert match, f"{where}: {line!r} is not an exact `name==version` pin"
        name = canonicalize_name(match.group(1))
        assert name not in out, f"{where}: {name} is pinned twice"
        out[name] = match.group(2)
    return out


def requirement_pins() -> dict[str, str]:
    return pins((ROOT / "requirements.txt").read_text().splitlines(), "requirements.txt")


def environment_pip_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml: expected exactly one `pip:` section"
    assert "pip" in env["dependencies"], "environment.yml: list `pip` itself before its `pip:` section"
    return pins(sections[0], "environment.yml pip section")


# ---------------------------------------------------------------------------------------------- pins
def test_environment_yml_repeats_requirements_txt():
    req, env = requirement_pins(), environment_pip_pins()
    only_req = sorted(set(req) - set(env))
    only_env = sorted(set(env) - set(req))
    assert not only_req and not only_env, (
        f"only in requirements.txt: {only_req}; only in environment.yml: {only_env}"
    )
    differ = {name: (req[name], env[name]) for name in req if req[name] != env[name]}
    assert not differ, f"versions differ (requirements.txt, environment.yml): {differ}"


def test_both_opencv_wheels_pinned_to_one_version():
    req = requirement_pins()
    # ultralytics pulls opencv-python, albumentations opencv-python-headless: both write cv2/
    assert "opencv-python" in req and "opencv-python-headless" in req
    assert req["opencv-python"] == req["opencv-python-headless"]


def test_pyproject_dependencies_are_pinned_within_their_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = requirement_pins()
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    for text in declared:
        dep = Requirement(text)
        name = canonicalize_name(dep.name)
        assert name in req, f"pyproject.toml needs {text!r} but requirements.txt does not pin it"
        assert dep.specifier.contains(req[name], prereleases=True), (
            f"requirements.txt pins {name}=={req[name]}, outside pyproject.toml's {text!r}"
        )


# ---------------------------------------------------------------------------------------------- CI
def test_ci_runs_make_test():
    script = ROOT / ".ci" / "run"
    commands = [ln.strip() for ln in script.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "make test" in commands, f"{script}: no `make test` line in {commands}"


def test_readme_test_command_is_make_test():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", readme.read_text(), flags=re.S)
    lines = [ln.strip() for block in blocks for ln in block.splitlines()]
    assert "make test" in lines, "README.md: no ```bash block runs `make test` (the command CI runs)"


# ---------------------------------------------------------------------------------------------- notebooks
def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def test_there_is_one_notebook_per_stage():
    from common.config import STAGE_CONFIGS

    assert [p.name[:3] for p in STAGE_NOTEBOOKS] == [f"{s}_" for s in STAGE_CONFIGS], [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(code_cells(nb)):
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has outputs (run nbstripout)"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution count"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state is committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = json.loads(path.read_text())
    cells = code_cells(nb)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged `parameters`, expected exactly 1"
    for i, cell in enumerate(cells):
        # IPython magics and shell escapes are not Python: blank them before parsing
        text = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source(cell).splitlines())
        tree = ast.parse(text, filename=f"{path.name} cell {i}")
        kinds = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        defs = [n.name for n in ast.walk(tree) if isinstance(n, kinds)]
        assert not defs, f"{path.name}: code cell {i} defines {defs}; put them in common/"
        if i > tagged[0]:
            n = len([ln for ln in source(cell).splitlines() if ln.strip()])
            assert n < MAX_CELL_LINES, f"{path.name}: code cell {i} has {n} lines"
    params = ast.parse(source(cells[tagged[0]]))
    assert all(isinstance(n, ast.AnnAssign | ast.Assign) for n in params.body), (
        f"{path.name}: the parameters cell must only assign values"
    )


# ---------------------------------------------------------------------------------------------- git tree
FORBIDDEN = ("*.pt", "*.pth", "*.onnx", "*.ckpt", "*.safetensors", "*.pyc", ".DS_Store")
FORBIDDEN_DIRS = ("__pycache__", ".ipynb_checkpoints")


def test_no_weights_or_caches_in_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = [f for f in files.decode().split("\0") if f]
    assert names, "git ls-files listed nothing"
    bad = [f for f in names if any(fnmatch.fnmatch(Path(f).name, pat) for pat in FORBIDDEN)
           or any(part in FORBIDDEN_DIRS for part in Path(f).parts)]
    assert not bad, f"committed files that must not be in git: {bad}"
