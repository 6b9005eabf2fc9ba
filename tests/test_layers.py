"""The package's layers: every import of ``common`` (module level and lazy, inside functions) runs downwards
or within its own layer, and no module imports itself back through a cycle. ``docs/architecture.md`` is the map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "common"
# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ["core", "config", "lib", "data", "engine", "stages", "cli"]
ENTRY = "entry"  # common/<name>.py aliases that keep `python -m common.pipeline` (and kaggle, export) working


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """``common.lib.heads`` -> ``lib``; ``common.pipeline`` -> ``entry``; ``common`` -> None."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else ENTRY


def rank(layer: str) -> int:
    return len(LAYERS) if layer == ENTRY else LAYERS.index(layer)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """Every ``common`` module that ``path`` imports, lazy imports included, with the line number.

    ``from common.lib import heads`` counts as ``common.lib.heads`` when that module exists, else as the
    package ``common.lib``.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "common"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "common":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (root.parent / Path(*sub.split(".")) / "__init__.py").exists()
                found.append((sub if is_module else node.module, node.lineno))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}


def layer_violations(root: Path = PACKAGE) -> list[str]:
    """``file:line: a (layer) imports b (higher layer)`` for every import against the layers."""
    bad = []
    for mod, imps in import_graph(root).items():
        src = layer_of(mod)
        for target, line in imps:
            dst = layer_of(target)
            if src is None or dst is None:
                continue
            if rank(dst) > rank(src):
                bad.append(f"{mod}:{line}: {mod} ({src}) imports {target} ({dst}), a higher layer")
    return bad


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Import cycles between modules (lazy imports included), each as the list of modules around it."""
    graph = {m: sorted({t for t, _ in imps if t != m}) for m, imps in import_graph(root).items()}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t in graph and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m)
    return found


def test_every_module_sits_in_a_layer():
    stray = [m for m in import_graph() if layer_of(m) == ENTRY and m.count(".") != 1]
    assert not stray
    entries = sorted(m for m in import_graph() if layer_of(m) == ENTRY)
    assert entries == [f"common.{m}" for m in ("batch", "export", "kaggle", "pipeline", "report", "sweep")]


def test_imports_run_down_the_layers():
    assert layer_violations() == []


def test_no_import_cycles():
    assert cycles() == []


@pytest.fixture
def package_copy(tmp_path):
    import shutil

    dest = tmp_path / "common"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_a_backward_import_fails_the_check(package_copy):
    # A library module that reaches up into a stage, inside a function (a lazy import), must be caught.
    heads = package_copy / "lib" / "heads.py"
    heads.write_text(heads.read_text() + "\n\ndef _bad():\n    from common.stages import train_embedder\n")
    assert layer_violations(package_copy) == [
        f"common.lib.heads:{len(heads.read_text().splitlines())}: common.lib.heads (lib) imports "
        "common.stages.train_embedder (stages), a higher layer"]


def test_a_cycle_fails_the_check(package_copy):
    store = package_copy / "core" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _bad():\n    from common.core import checkpoint\n")
    assert any({"common.core.store", "common.core.checkpoint"} <= set(c) for c in cycles(package_copy))


def test_the_map_names_every_module():
    # docs/architecture.md is the map of the package: a module missing from it is a module nobody will find.
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [f"{p.parent.name}/{p.name}" for p in sorted(PACKAGE.glob("*/*.py"))
               if p.stem != "__init__" and f"`{p.stem}`" not in doc]
    assert missing == []


def test_readme_links_resolve():
    import re

    root = PACKAGE.parent
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (root / "README.md").read_text())
    assert links, "README.md links to no document"
    assert [link for link in links if not link.startswith("http") and not (root / link).exists()] == []
