"""common.core.paths: resolution order of the folders, data_dir, experiment names."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.core import paths

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


# -- Kaggle: attached sources, both mount layouts, slugs -----------------------------------------------------
def test_kaggle_slug_rules():
    assert paths.kaggle_slug("My Exp_01") == "my-exp-01"  # lowercase, runs of other characters -> one dash
    assert paths.kaggle_slug("--ab..cd--") == "ab-cd"  # no leading, trailing or doubled dash
    assert paths.kaggle_slug("ab") == "ab-kaggle"  # padded to Kaggle's minimum length (5)
    long = paths.kaggle_slug("x" * 49 + "-yz")  # cut at 50, and the dash left at the end goes too
    assert long == "x" * 49 and len(long) <= 50
    assert paths.weights_slug("demo_tiny") == "demo-tiny-weights"
    with pytest.raises(ValueError, match="no letter or digit"):
        paths.kaggle_slug("!!!")
    with pytest.raises(ValueError, match="not valid"):
        paths.weights_slug("../etc")


def fake_kaggle(tmp_path: Path, monkeypatch) -> Path:
    """A Kaggle tree: input/ (read side), working/ (this kernel's outputs), Kaggle's run-type marker."""
    root = tmp_path / "kaggle"
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    return root


def put(folder: Path, name: str = "model.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize("mount", ["input/e1-weights", "input/datasets/alice/e1-weights",
                                   "input/notebooks/alice/e1-02-train-embedder"])
def test_find_stage_dir_in_attached_source(tmp_path, monkeypatch, mount):
    root = fake_kaggle(tmp_path, monkeypatch)
    put(root / "input" / "comp" / "train_images", "a.jpg")  # a competition folder is a source too, harmlessly
    stage = put(root / mount / "e1" / "02_embedder" / "fold0")
    assert paths.find_stage_dir("e1", "02", "fold0/model.pt") == stage.parent
    assert root / mount in paths.attached_dirs()


def test_find_stage_dir_prefers_working_then_first_source(tmp_path, monkeypatch):
    root = fake_kaggle(tmp_path, monkeypatch)
    put(root / "input" / "b-weights" / "e1" / "03_embeddings" / "fold0", "train.npz")
    put(root / "input" / "a-out" / "e1" / "03_embeddings" / "fold0", "test.npz")
    # each file is found where it is: the gallery in one dataset, the test embeddings in a kernel's output
    assert paths.find_stage_dir("e1", "03", "fold0/train.npz") == root / "input" / "b-weights" / "e1" / "03_embeddings"
    assert paths.find_stage_dir("e1", "03", "fold0/test.npz") == root / "input" / "a-out" / "e1" / "03_embeddings"
    own = put(root / "working" / "e1" / "03_embeddings" / "fold0", "test.npz")
    assert paths.find_stage_dir("e1", "03", "fold0/test.npz") == own.parent  # this kernel's output wins


def test_find_stage_dir_archive_nesting(tmp_path, monkeypatch):
    root = fake_kaggle(tmp_path, monkeypatch)  # a zipped `e1` folder unpacked into a folder named e1
    stage = put(root / "input" / "e1-weights" / "e1" / "e1" / "04_retrieval", "metrics.json")
    assert paths.find_stage_dir("e1", "04", "metrics.json") == stage


def test_find_stage_dir_missing_names_the_slug(tmp_path, monkeypatch):
    root = fake_kaggle(tmp_path, monkeypatch)
    put(root / "input" / "reid-common", "reid-install-requirements.txt")
    with pytest.raises(paths.MissingStageError) as err:
        paths.find_stage_dir("e1", "02", "fold0/model.pt", hint="run stage 02 first")
    text = str(err.value)
    assert str(root / "working" / "e1" / "02_embedder" / "fold0" / "model.pt") + " not found: run stage 02" in text
    assert "'<owner>/e1-weights'" in text and "reid-common" in text and "1 source(s)" in text
    assert isinstance(err.value, FileNotFoundError)


def test_find_stage_dir_off_kaggle_reads_working_only(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("REID_INPUT_DIR", str(tmp_path / "i"))
    put(tmp_path / "i" / "e1-weights" / "e1" / "02_embedder")  # looks attached, but we are not on Kaggle
    assert paths.attached_dirs() == []
    with pytest.raises(paths.MissingStageError) as err:
        paths.find_stage_dir("e1", "02", "model.pt")
    assert "Kaggle" not in str(err.value)  # no Kaggle advice off Kaggle
    put(tmp_path / "w" / "e1" / "02_embedder")
    assert paths.find_stage_dir("e1", "02", "model.pt") == tmp_path / "w" / "e1" / "02_embedder"


@pytest.mark.parametrize("mount", ["input/happy-whale", "input/competitions/happy-whale"])
def test_data_dir_finds_competition_in_both_layouts(tmp_path, monkeypatch, mount):
    root = fake_kaggle(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    (root / mount).mkdir(parents=True)
    assert paths.data_dir("happy-whale") == (root / mount).resolve()
