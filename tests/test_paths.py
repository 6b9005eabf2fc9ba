"""common.paths: resolution order of the folders, data_dir, experiment names."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import paths

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = (
    "REID_INPUT_DIR", "REID_WORKING_DIR", "REID_SUBMISSIONS_DIR", "REID_ROOT", "KAGGLE_KERNEL_RUN_TYPE",
)


@pytest.fixture(autouse=True)
def paths_clean_env(monkeypatch, tmp_path):
    """No REID_* / Kaggle variables, and a Kaggle root that does not exist (a real /kaggle cannot leak in)."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "no-kaggle"))


def make_project(root: Path) -> Path:
    """A fake repository: what makes a folder a project root is holding common/ and notebooks/."""
    (root / "common").mkdir(parents=True)
    (root / "notebooks").mkdir()
    return root


# -- project root --------------------------------------------------------------------------------------------
def test_project_root_found_from_nested_cwd(tmp_path, monkeypatch):
    proj = make_project(tmp_path / "proj")
    nested = proj / "notebooks" / "deep" / "er"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert paths.project_root() == proj.resolve()
    assert paths.inputs_dir() == proj.resolve() / "inputs"
    assert paths.working_dir() == proj.resolve() / "working"
    assert paths.submissions_dir() == proj.resolve() / "submissions"


def test_project_root_falls_back_to_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing above tmp_path holds common/ + notebooks/
    assert paths.project_root() == REPO


def test_project_root_half_marker_is_not_a_root(tmp_path, monkeypatch):
    (tmp_path / "half" / "common").mkdir(parents=True)  # common/ without notebooks/
    monkeypatch.chdir(tmp_path / "half")
    assert paths.project_root() == REPO


def test_reid_root_wins_over_cwd(tmp_path, monkeypatch):
    proj = make_project(tmp_path / "proj")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(proj)
    monkeypatch.setenv("REID_ROOT", str(other))
    assert paths.project_root() == other.resolve()
    assert paths.working_dir() == other.resolve() / "working"


# -- explicit variables and Kaggle ---------------------------------------------------------------------------
def test_reid_env_vars_win(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_INPUT_DIR", str(tmp_path / "i"))
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("REID_SUBMISSIONS_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # explicit variables beat Kaggle too
    assert paths.inputs_dir() == (tmp_path / "i").resolve()
    assert paths.working_dir() == (tmp_path / "w").resolve()
    assert paths.submissions_dir() == (tmp_path / "s").resolve()


def test_reid_env_var_relative_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REID_WORKING_DIR", "rel/w")
    assert paths.working_dir() == tmp_path.resolve() / "rel" / "w"


def test_kaggle_by_run_type(tmp_path, monkeypatch):
    root = tmp_path / "kag"  # does not even need to exist: the variable alone says "Kaggle"
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    assert not paths.on_kaggle()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert paths.on_kaggle()
    assert paths.inputs_dir() == root / "input"
    assert paths.working_dir() == root / "working"
    assert paths.submissions_dir() == root / "working"  # Kaggle only keeps /kaggle/working


def test_kaggle_by_fake_tree(tmp_path, monkeypatch):
    root = tmp_path / "kag"
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    (root / "input").mkdir(parents=True)
    assert not paths.on_kaggle()  # input/ alone is not enough
    (root / "working").mkdir()
    assert paths.on_kaggle()
    assert paths.kaggle_root() == root
    assert paths.inputs_dir() == root / "input"
    assert paths.submission_path("e1") == root / "working" / "e1.csv"


# -- data_dir ------------------------------------------------------------------------------------------------
@pytest.fixture
def paths_project(tmp_path, monkeypatch):
    """A project root pinned by REID_ROOT, with an inputs dir, and the cwd in an unrelated folder."""
    proj = make_project(tmp_path / "proj")
    monkeypatch.setenv("REID_ROOT", str(proj))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return proj.resolve(), cwd.resolve()


def test_data_dir_bare_name(paths_project):
    proj, _ = paths_project
    assert paths.data_dir("comp") == proj / "inputs" / "comp"  # not there yet: under inputs/
    (proj / "inputs" / "comp").mkdir(parents=True)
    assert paths.data_dir("comp") == proj / "inputs" / "comp"  # there: same answer


def test_data_dir_bare_name_in_cwd_comes_first(paths_project):
    proj, cwd = paths_project
    (proj / "inputs" / "comp").mkdir(parents=True)
    (cwd / "comp").mkdir()
    assert paths.data_dir("comp") == cwd / "comp"  # documented order: cwd, project root, inputs/


def test_data_dir_relative_path(paths_project):
    proj, cwd = paths_project
    assert paths.data_dir("inputs/x") == proj / "inputs" / "x"  # missing: under the project root
    (proj / "local" / "x").mkdir(parents=True)
    assert paths.data_dir("local/x") == proj / "local" / "x"  # present under the project root only
    (cwd / "local" / "x").mkdir(parents=True)
    assert paths.data_dir("local/x") == cwd / "local" / "x"  # present beside the cwd too: cwd first


def test_data_dir_absolute_and_home(paths_project, tmp_path, monkeypatch):
    target = tmp_path / "abs" / "comp"  # need not exist
    assert paths.data_dir(str(target)) == target
    assert paths.data_dir(target) == target  # PathLike too
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.data_dir("~/comp") == tmp_path / "home" / "comp"


# -- experiment names and the folders built from them --------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "", "a b", ".hidden", "-x", "x/y", "abc\n", None])
def test_check_exp_name_rejects(bad):
    with pytest.raises(ValueError, match="experiment name"):
        paths.check_exp_name(bad)


@pytest.mark.parametrize("good", ["demo", "e1", "cpu.v2_b-3", "0abc"])
def test_check_exp_name_accepts(good):
    assert paths.check_exp_name(good) == good


def test_stage_and_submission_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("REID_SUBMISSIONS_DIR", str(tmp_path / "s"))
    w = (tmp_path / "w").resolve()
    assert paths.exp_dir("e1") == w / "e1"
    assert paths.stage_dir("e1", "01") == w / "e1" / "01_crop"
    assert paths.stage_dir("e1", "04") == w / "e1" / "04_retrieval"
    assert paths.stage_dir("e1", "custom") == w / "e1" / "custom"  # a folder name passes through
    assert paths.submission_path("e1") == (tmp_path / "s").resolve() / "e1.csv"
    with pytest.raises(ValueError):
        paths.stage_dir("../up", "01")
