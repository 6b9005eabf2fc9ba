"""Fixtures shared by the test files.

* ``isolated``: inputs/, working/ and submissions/ in the test's own ``tmp_path``; a file whose every test
  needs it says ``pytestmark = pytest.mark.usefixtures("isolated")``. ``isolated_module`` does the same
  once for a whole file (for module-scoped fixtures that run stages).
* ``tiny_demo_root`` / ``comp``: the tiny demo (:data:`common.data.demo.TINY_DEMO`), generated once per test
  file, and loaded as a ``Competition``. Tests must not change it (copy it first).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def isolate_dirs(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point inputs/, working/ and submissions/ into ``root`` and silence progress bars."""
    for var, sub in (("REID_INPUT_DIR", "inputs"), ("REID_WORKING_DIR", "working"),
                     ("REID_SUBMISSIONS_DIR", "submissions")):
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("REID_PROGRESS", "off")
    return root


def _close_figures() -> None:
    if "matplotlib.pyplot" in sys.modules:  # never import matplotlib just to close nothing
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A test whose outputs land in its own tmp_path (never in the repository's working/); figures it left
    open are closed after it."""
    yield isolate_dirs(tmp_path, monkeypatch)
    _close_figures()


@pytest.fixture(scope="module")
def isolated_module(tmp_path_factory) -> Path:
    """inputs/, working/ and submissions/ in one tmp folder for every test of the module."""
    mp = pytest.MonkeyPatch()
    yield isolate_dirs(tmp_path_factory.mktemp("isolated"), mp)
    mp.undo()
    _close_figures()


@pytest.fixture(scope="module")
def tiny_demo_root(tmp_path_factory) -> Path:
    """The tiny demo folder (``common.data.demo.TINY_DEMO``, a few seconds), made once per test file."""
    from common.data.demo import TINY_DEMO, make_demo

    return make_demo(tmp_path_factory.mktemp("comp") / "demo_tiny", **TINY_DEMO)


@pytest.fixture(scope="module")
def comp(tiny_demo_root):
    """The tiny demo as a ``Competition`` (pixels not checked), shared by the tests of one file."""
    from common.data.competition import load_competition

    return load_competition(tiny_demo_root, check_pixels=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: on a loaded 2-core CPU, intra-op threads spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
