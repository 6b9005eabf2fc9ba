"""Fixtures shared by the test files."""

from __future__ import annotations

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


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A test whose outputs land in its own tmp_path (never in the repository's working/)."""
    return isolate_dirs(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: on a loaded 2-core CPU, intra-op threads spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
