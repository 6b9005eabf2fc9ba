"""common.core.store: atomic writes, arrays with row-order checks, stage markers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.core import store


# -- atomic writes -------------------------------------------------------------------------------------------
def test_atomic_path_success_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # parent folder is created
    with store.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible under the final name before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # the temp file is gone


def test_atomic_dir_creates_then_replaces_and_leaves_nothing_beside(tmp_path):
    target = tmp_path / "sub" / "comp"  # parent folder is created
    with store.atomic_dir(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == target.parent
        (tmp / "a.txt").write_text("first")
        assert not target.exists()  # nothing visible under the final name before the block ends
    assert (target / "a.txt").read_text() == "first"
    with store.atomic_dir(target) as tmp:  # a folder that is not empty is replaced as a whole
        (tmp / "b.txt").write_text("second")
        assert (target / "a.txt").exists()  # the old folder stays readable while the new one is written
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["comp"]


def test_atomic_dir_exception_keeps_old_folder_and_no_temp(tmp_path):
    target = tmp_path / "comp"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp"]  # no .comp.tmp-* / .comp.old-* left
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"


def test_atomic_dir_deletes_temp_folders_of_dead_processes_only(tmp_path):
    dead = tmp_path / ".comp.tmp-999999999"  # above any pid_max: no such process
    alive = tmp_path / f".comp.tmp-{os.getppid()}"  # our parent: alive, maybe still writing
    for folder in (dead, alive):
        folder.mkdir()
    assert not store.pid_alive(999999999) and store.pid_alive(os.getpid())
    with store.atomic_dir(tmp_path / "comp"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "comp"]


def test_write_json_converts_numpy_and_paths(tmp_path):
    obj = {"b": np.float32(0.5), "a": np.arange(3), "p": Path("x/y"), "n": np.int64(7)}
    path = store.write_json(tmp_path / "m.json", obj)
    assert store.read_json(path) == {"a": [0, 1, 2], "b": 0.5, "n": 7, "p": "x/y"}
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') < text.index('"n"')  # sorted keys


def test_write_json_unserialisable_keeps_old_file(tmp_path):
    path = tmp_path / "m.json"
    store.write_json(path, {"ok": 1})
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        store.write_json(path, {"bad": object()})
    assert store.read_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_csv_round_trip(tmp_path):
    df = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "score": [0.25, 1.0]})
    store.write_csv(tmp_path / "t.csv", df)
    assert (tmp_path / "t.csv").read_text().splitlines() == ["image,score", "a.jpg,0.25", "b.jpg,1.0"]


# -- arrays --------------------------------------------------------------------------------------------------
def test_save_load_arrays_round_trip(tmp_path):
    emb = np.array([[1.0, 0.0],   # a.jpg
                    [0.0, 1.0],   # b.jpg
                    [0.6, 0.8]],  # c.jpg
                   dtype=np.float32)
    label = np.array([2, 0, 1])
    path = store.save_arrays(tmp_path / "e.npz", ["a.jpg", "b.jpg", "c.jpg"], embeddings=emb, label=label)
    out = store.load_arrays(path, expected_image=["a.jpg", "b.jpg", "c.jpg"])
    assert sorted(out) == ["embeddings", "image", "label"]
    assert out["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(out["embeddings"], emb)
    assert out["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], [2, 0, 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]


def test_load_arrays_row_order_error_names_row_and_ids(tmp_path):
    path = store.save_arrays(tmp_path / "e.npz", ["a", "b", "c"], x=np.zeros((3, 2)))
    # row 0 agrees; row 1 (0-based array row) holds "b" where the caller's table has "c"
    with pytest.raises(ValueError, match=r"row 1 is image 'b' but 'c' was expected") as err:
        store.load_arrays(path, expected_image=["a", "c", "b"])
    assert str(path) in str(err.value)


def test_load_arrays_row_count_mismatch(tmp_path):
    path = store.save_arrays(tmp_path / "e.npz", ["a", "b", "c"], x=np.zeros(3))
    with pytest.raises(ValueError, match="3 rows but 2 expected"):
        store.load_arrays(path, expected_image=["a", "b"])


def test_ids_are_compared_as_strings(tmp_path):
    path = store.save_arrays(tmp_path / "e.npz", [1, 2], x=np.zeros(2))  # ints stored as "1", "2"
    assert store.load_arrays(path, expected_image=["1", "2"])["image"].tolist() == ["1", "2"]


def test_save_arrays_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="not unique"):
        store.save_arrays(tmp_path / "e.npz", ["a", "b", "a"], x=np.zeros(3))
    assert not (tmp_path / "e.npz").exists()


def test_save_arrays_rejects_wrong_row_count(tmp_path):
    with pytest.raises(ValueError, match=r"array 'x' has 2 rows but there are 3 image ids"):
        store.save_arrays(tmp_path / "e.npz", ["a", "b", "c"], x=np.zeros((2, 4)))
    assert list(tmp_path.iterdir()) == []


def test_load_arrays_missing_file_and_foreign_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage"):
        store.load_arrays(tmp_path / "nope.npz")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(2))  # no 'image' ids
    with pytest.raises(ValueError, match="no 'image' id array"):
        store.load_arrays(tmp_path / "foreign.npz")


def test_check_row_order_passes_on_equal():
    store.check_row_order(np.array(["a", "b"]), ["a", "b"], "here")  # no error


# -- stage markers -------------------------------------------------------------------------------------------
def test_stage_done_and_mark_done(tmp_path):
    d = tmp_path / "02_embedder"
    params = {"lr": 0.001, "folds": "0,2", "epochs": 3}
    assert not store.stage_done(d)
    assert not store.stage_done(d, params)
    store.mark_done(d, params, seconds=1.5)
    payload = json.loads((d / "_done.json").read_text())
    assert payload == {"params": {"epochs": 3, "folds": "0,2", "lr": 0.001}, "seconds": 1.5}
    assert store.stage_done(d)  # no params: existence is enough
    assert store.stage_done(d, {"epochs": 3, "lr": 0.001, "folds": "0,2"})  # key order does not matter
    assert not store.stage_done(d, {**params, "lr": 0.002})  # one value differs
    assert not store.stage_done(d, {**params, "extra": 1})  # one key more
    assert not store.stage_done(d, {"lr": 0.001, "folds": "0,2"})  # one key fewer


def test_stage_done_params_that_json_changes(tmp_path):
    # a tuple is stored as a list and a Path as its string: the comparison must see through both
    params = {"size": (128, 64), "root": Path("/x/y")}
    store.mark_done(tmp_path, params)
    assert store.stage_done(tmp_path, {"size": (128, 64), "root": Path("/x/y")})
    assert not store.stage_done(tmp_path, {"size": (128, 65), "root": Path("/x/y")})


def test_update_json_merges_keys_and_rejects_non_objects(tmp_path):
    path = tmp_path / "metrics.json"
    assert store.update_json(path, {"map5": 0.5}) == {"map5": 0.5}  # created
    assert store.update_json(path, {"classifier": {"acc": 0.9}}) == {"map5": 0.5, "classifier": {"acc": 0.9}}
    assert store.update_json(path, {"map5": 0.6})["map5"] == 0.6  # a stage's own key is replaced
    assert json.loads(path.read_text()) == {"map5": 0.6, "classifier": {"acc": 0.9}}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object"):
        store.update_json(tmp_path / "list.json", {"a": 1})


def test_changed_params_tolerates_a_parameter_added_at_its_default(tmp_path):
    old = {"epochs": 2, "lr": 0.001}
    defaults = {"epochs": 6, "lr": 0.001, "freeze_blocks": 0}
    assert store.changed_params(old, {"epochs": 2, "lr": 0.001}) == []
    assert store.changed_params(old, {"epochs": 3, "lr": 0.001}) == ["epochs"]
    # freeze_blocks did not exist when the run was recorded: at its default it is no change, else it is
    assert store.changed_params(old, {"epochs": 2, "lr": 0.001, "freeze_blocks": 0}, defaults) == []
    assert store.changed_params(old, {"epochs": 2, "lr": 0.001, "freeze_blocks": 2}, defaults) == ["freeze_blocks"]
    assert store.changed_params(old, {"epochs": 2, "lr": 0.001, "freeze_blocks": 0}) == ["freeze_blocks"]
    assert store.changed_params(old, {"epochs": 2}, defaults) == ["lr"]  # a parameter removed is a change
    store.mark_done(tmp_path, old)
    assert store.stage_done(tmp_path, {**old, "freeze_blocks": 0}, defaults)
    assert not store.stage_done(tmp_path, {**old, "freeze_blocks": 0})


def test_data_spelled_relative_absolute_or_by_name_is_one_competition(tmp_path, monkeypatch):
    from common.core import paths
    from common.data import fingerprint

    comp = paths.inputs_dir() / "spelling_check"
    comp.mkdir(parents=True)
    try:
        monkeypatch.chdir(paths.project_root())
        old = {"data": "spelling_check", "epochs": 2}
        for spelling in ("inputs/spelling_check", str(comp), str(comp) + "/", "./inputs/spelling_check"):
            assert store.changed_params(old, {**old, "data": spelling}) == [], spelling
            assert fingerprint.changes(old, {**old, "data": spelling}) == [], spelling
        other = tmp_path / "spelling_check"  # the same name, another folder: a change
        other.mkdir()
        assert store.changed_params(old, {**old, "data": str(other)}) == ["data"]
        assert fingerprint.changes(old, {**old, "data": str(other)}) == [f"data 'spelling_check' -> {str(other)!r}"]
        assert store.changed_params({"epochs": 2, "data": 1}, {"epochs": 2, "data": "1"}) == ["data"]
    finally:
        comp.rmdir()
