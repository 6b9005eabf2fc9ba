"""Fingerprints that cover the data: tables, image identity and upstream stages (common.data.fingerprint)."""

from __future__ import annotations

import hashlib
import os

import pytest

from common.cli import pipeline
from common.config import EmbedderConfig, ExtractConfig
from common.core import checkpoint, paths, store
from common.data import fingerprint as fp


def make_comp(root):
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,s,x\n")
    (root / "train_images" / "a.jpg").write_bytes(b"12345")
    os.utime(root / "train_images" / "a.jpg", ns=(10**9, 10**9))
    (root / "test_images" / "t.jpg").write_bytes(b"1")
    return root


def test_file_hash(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert fp.file_hash(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()
    assert fp.file_hash(tmp_path / "missing") is None


def test_images_hash_known_answer(tmp_path):
    root = make_comp(tmp_path)
    folder = root / "train_images"
    (folder / ".hidden").write_text("x")  # skipped
    assert fp.images_hash(folder) == hashlib.sha256(b"a.jpg|5|1000000000").hexdigest()
    assert fp.images_hash(folder, times=False) == hashlib.sha256(b"a.jpg|5").hexdigest()
    os.utime(folder / "a.jpg", ns=(2 * 10**9, 2 * 10**9))  # touched: identity changes, names+sizes do not
    assert fp.images_hash(folder) == hashlib.sha256(b"a.jpg|5|2000000000").hexdigest()
    assert fp.images_hash(folder, times=False) == hashlib.sha256(b"a.jpg|5").hexdigest()
    assert fp.images_hash(tmp_path / "nope") is None


def test_data_fingerprint_sees_an_edited_table(tmp_path):
    root = make_comp(tmp_path)
    before = fp.data_fingerprint(root)
    assert before["boxes.csv"] is None and before["train.csv"] is not None
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,s,y\n")
    after = fp.data_fingerprint(root)
    assert fp.changes({"data_files": before}, {"data_files": after}) == ["data_files train.csv"]


def test_changes_names_parameters_data_and_upstream():
    old = {"epochs": 2, "data_files": {"train.csv": "a"}, "upstream": {"e/01": "x"}}
    new = {"epochs": 3, "data_files": {"train.csv": "b"}, "upstream": {"e/01": "y"}}
    assert fp.changes(old, new) == ["data_files train.csv", "epochs 2 -> 3", "upstream e/01"]
    assert fp.changes(None, new) == ["no record of an earlier run"]
    assert fp.changes(new, dict(new)) == []


def test_stage_fingerprint_follows_upstream_and_data(isolated):
    root = make_comp(isolated / "comp")
    cfg = ExtractConfig(data=str(root), exp="e")
    first = fp.stage_fingerprint(cfg)
    assert first["upstream"] == {"e/01": None, "e/02": None}
    assert first["data_files"]["train.csv"] == fp.file_hash(root / "train.csv")
    assert first["data"] == str(root)  # the parameter itself is kept (kaggle.run_params reads it back)
    store.mark_done(paths.stage_dir("e", "02"), {"epochs": 1})
    second = fp.stage_fingerprint(cfg)
    assert second["upstream"]["e/02"] == hashlib.sha256(b'{"epochs": 1}').hexdigest()
    store.mark_done(paths.stage_dir("e", "02"), {"epochs": 2})  # stage 02 rerun: stage 03 is stale
    assert fp.changes(second, fp.stage_fingerprint(cfg)) == ["upstream e/02"]


def test_runner_reruns_after_train_csv_edit_and_says_why(isolated, capsys):
    root = make_comp(isolated / "comp")
    cfg = EmbedderConfig(data=str(root), exp="e")
    store.mark_done(paths.stage_dir("e", "02"), fp.stage_fingerprint(cfg))
    assert pipeline.is_fresh("e", "02", fp.stage_fingerprint(cfg), say=True)
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,s,z\n")
    assert not pipeline.is_fresh("e", "02", fp.stage_fingerprint(cfg), say=True)
    assert "changed since its last run: data_files train.csv" in capsys.readouterr().out


def test_check_model_refuses_other_data(tmp_path):
    root = make_comp(tmp_path)
    meta = {"data_fingerprint": fp.model_data(root)}
    fp.check_model(meta, root, "fold0/config.json")  # same data: fine
    fp.check_model({}, root, "fold0/config.json")  # older model without a record: accepted
    os.utime(root / "train_images" / "a.jpg", ns=(5 * 10**9, 5 * 10**9))  # a copy elsewhere: times differ
    fp.check_model(meta, root, "fold0/config.json")
    (root / "train.csv").write_text("image,species,individual_id\na.jpg,s,other\n")
    with pytest.raises(fp.StaleModelError, match=r"fold0/config.json: this model was trained on other data "
                                                  r"\(train.csv of .* differ\).*--force"):
        fp.check_model(meta, root, "fold0/config.json")


def test_fold_checkpoint_refuses_other_data_naming_it(tmp_path):
    params = {"epochs": 2, "data_fingerprint": {"train.csv": "a"}}
    store.mark_done(tmp_path, params)
    (tmp_path / "log.csv").write_text("epoch,loss\n1,0.5\n")
    assert checkpoint.finished_log(tmp_path, params, force=False)["loss"].tolist() == [0.5]  # same: reused
    with pytest.raises(RuntimeError, match=r"changed: data_fingerprint\); use force=True"):
        checkpoint.finished_log(tmp_path, {**params, "data_fingerprint": {"train.csv": "b"}}, force=False)
    store.write_json(tmp_path / "config.json", {"config": {"epochs": 2}, "data_fingerprint": {"train.csv": "a"}})
    (tmp_path / "last.pt").write_bytes(b"")
    checkpoint.check_resumable(tmp_path, params)
    with pytest.raises(RuntimeError, match=r"last.pt: checkpoint from other parameters or data \(changed: "
                                           r"data_fingerprint\)"):
        checkpoint.check_resumable(tmp_path, {**params, "data_fingerprint": {"train.csv": "b"}})


def test_a_stage_00_backbone_is_part_of_the_fingerprint(isolated):
    root = make_comp(isolated / "comp")
    cfg = EmbedderConfig(data=str(root), exp="e", pretrained="ssl")
    assert "ssl/00" not in fp.stage_fingerprint(cfg)["upstream"]  # no stage 00 of "ssl" yet: a hub tag or file
    assert fp.training_inputs(cfg).get("pretrained") is None
    folder = paths.stage_dir("ssl", "00")
    folder.mkdir(parents=True)
    (folder / "backbone.pt").write_bytes(b"weights v1")
    store.mark_done(folder, {"epochs": 1})
    first = fp.stage_fingerprint(cfg)
    assert first["upstream"]["ssl/00"] == hashlib.sha256(b'{"epochs": 1}').hexdigest()
    assert fp.training_inputs(cfg)["pretrained"] == hashlib.sha256(b"weights v1").hexdigest()
    (folder / "backbone.pt").write_bytes(b"weights v2")  # other weights under the same name: the model is stale
    assert fp.training_inputs(cfg)["pretrained"] == hashlib.sha256(b"weights v2").hexdigest()
    for name in ("auto", "timm", "none"):
        assert fp.pretrained_stage(EmbedderConfig(data=str(root), exp="e", pretrained=name)) is None
