"""A corpus of bad inputs, each built from the tiny demo in a fraction of a second, with its exact outcome.

Every case ends in a clear error before any stage runs (naming the file and row, or the parameter, its value
and what is allowed), with nothing written and an earlier run's records untouched; or in the documented
report (a test image also in train is warned about, not refused).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.cli import pipeline
from common.core import paths
from common.data import competition
from common.data.demo import TINY_DEMO, make_demo


@pytest.fixture(scope="module")
def tiny_master(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("master") / "demo_tiny", **TINY_DEMO)


@pytest.fixture
def comp(tiny_master, isolated) -> Path:
    """A fresh copy of the tiny demo, as ``inputs/bad``."""
    return Path(shutil.copytree(tiny_master, isolated / "inputs" / "bad"))


def edit(path: Path, row: int, column: str, value: str) -> None:
    """Set a 1-based data row's cell (as a spreadsheet shows it below the header)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row - 1, column] = value
    df.to_csv(path, index=False)


def first_train(comp: Path) -> str:
    return pd.read_csv(comp / "train.csv", dtype=str)["image"].iloc[0]


# (name, how the folder is broken, the error's text as a regex)
TABLE_CASES = [
    ("NaN id", lambda c: edit(c / "train.csv", 3, "individual_id", "NaN"),
     r"train.csv, row 3: individual_id 'NaN': reads as a missing value"),
    ("nan id", lambda c: edit(c / "train.csv", 2, "individual_id", "nan"),
     r"train.csv, row 2: individual_id 'nan': reads as a missing value"),
    ("None species", lambda c: edit(c / "train.csv", 4, "species", "None"),
     r"train.csv, row 4: species 'None': reads as a missing value"),
    ("trailing space", lambda c: edit(c / "train.csv", 5, "individual_id", "110b5b735094 "),
     r"train.csv, row 5: individual_id '110b5b735094 ': spaces around the id"),
    ("leading space image", lambda c: edit(c / "test.csv", 1, "individual_id", " x"),
     r"test.csv, row 1: individual_id ' x': spaces around the id"),
    ("empty id", lambda c: edit(c / "train.csv", 2, "individual_id", ""),
     r"train.csv, row 2: empty value in column 'individual_id'"),
    ("whitespace-only id", lambda c: edit(c / "train.csv", 2, "individual_id", "  "),
     r"train.csv, row 2: empty value in column 'individual_id'"),
    ("duplicate image", lambda c: edit(c / "train.csv", 2, "image", first_train(c)),
     r"train.csv, row 2: image '.*' appears twice"),
    ("missing image file", lambda c: edit(c / "train.csv", 6, "image", "ghost.jpg"),
     r"train.csv, row 6: image 'ghost.jpg' not found in .*train_images"),
    ("missing column", lambda c: (c / "train.csv").write_text("image,species\na.jpg,x\n"),
     r"train.csv: missing column\(s\) \['individual_id'\]"),
    ("not a CSV", lambda c: (c / "train.csv").write_bytes(b"\xff\xfe\x00\x01garbage\x00"),
     r"train.csv"),
    ("box not a number", lambda c: edit(c / "boxes.csv", 2, "xmin", "left"),
     r"boxes.csv, row 2: xmin is not a number"),
    ("flat box", lambda c: edit(c / "boxes.csv", 3, "xmax", "0"),
     r"boxes.csv, row 3: box has xmax<=xmin or ymax<=ymin"),
    ("box outside its image", lambda c: edit(c / "boxes.csv", 4, "xmax", "100000"),
     r"boxes.csv, row 4: box \[.*100000.*\] of image '.*' lies outside the \d+x\d+ image"),
    ("box of an unknown image", lambda c: edit(c / "boxes.csv", 1, "image", "ghost.jpg"),
     r"boxes.csv, row 1: image 'ghost.jpg' is neither in train.csv nor a test image"),
    ("truth of an unknown image", lambda c: edit(c / "test.csv", 2, "image", "ghost.jpg"),
     r"test.csv, row 2: image 'ghost.jpg' is not a test image"),
    ("submission image missing", lambda c: edit(c / "sample_submission.csv", 1, "image", "ghost.jpg"),
     r"sample_submission.csv, row 1: image 'ghost.jpg' not found"),
]


@pytest.mark.parametrize(("name", "breaks", "message"), TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_bad_tables_are_refused_by_the_runner_before_any_stage(comp, capsys, monkeypatch, name, breaks, message):
    breaks(comp)
    with pytest.raises(competition.DataError, match=message):
        competition.load_competition(comp, check_pixels=False)
    assert_refused(["--data", str(comp), "--exp", "bad", "--stages", "01-04"], message, capsys, monkeypatch)


def assert_refused(argv: list[str], message: str, capsys, monkeypatch) -> None:
    """``main`` returns 2 with ``message`` on stderr, runs no notebook and writes nothing of an earlier run."""
    import papermill

    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook ran although the input is bad")

    monkeypatch.setattr(papermill, "execute_notebook", no_notebook)
    exp_dir = paths.working_dir() / "bad"
    earlier = {"params.json": '{"epochs": 1}\n', "01_crop/_done.json": '{"params": {}}\n'}
    for rel, text in earlier.items():
        (exp_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (exp_dir / rel).write_text(text)
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert {rel: (exp_dir / rel).read_text() for rel in earlier} == earlier
    assert sorted(p.name for p in exp_dir.iterdir()) == ["01_crop", "params.json"]  # no lock, no record left


PARAM_CASES = [
    (["-p", "epochs=-1"], r"epochs=-1: must be >= 0"),
    (["-p", "lr=-1"], r"lr=-1.0: must be > 0"),
    (["-p", "image_size=0"], r"image_size=0: must be >= 32"),
    (["-p", "batch_size=0"], r"batch_size=0: must be >= 1"),
    (["-p", "threshold_step=0"], r"threshold_step=0.0: must be > 0"),
    (["-p", "knn_k=0"], r"knn_k=0: must be >= 1"),
    (["-p", "detector_epochs=0"], r"detector_epochs=0: must be >= 1"),
    (["-p", "oof_new_share=1.5"], r"oof_new_share=1.5: must be in \[0, 1\)"),
    (["-p", "n_folds=2", "-p", "folds=3"], r"folds='3': each fold must be in 0..1"),
    (["-p", "threshold_min=0.8", "-p", "threshold_max=0.2"],
     r"threshold_min=0.8, threshold_max=0.2: need threshold_min < threshold_max"),
    (["-p", "epochs=three"], r"parameter epochs='three': expected int"),
    (["-p", "epoch=3"], r"-p epoch: unknown parameter"),
    (["-p", "fold_merge=max"], r"fold_merge='max': use one of \['mean', 'concat'\]"),
]


@pytest.mark.parametrize(("extra", "message"), PARAM_CASES, ids=[" ".join(c[0]) for c in PARAM_CASES])
def test_bad_parameters_are_refused_before_any_stage(comp, capsys, monkeypatch, extra, message):
    assert_refused(["--data", str(comp), "--exp", "bad", "--stages", "01-04", *extra], message, capsys, monkeypatch)


def test_missing_data_folder_is_refused_and_no_demo_is_made(isolated, capsys, monkeypatch):
    for name in ("nowhere", "demo2", "demo-tiny", "demo_tiny2"):
        assert_refused(["--data", name, "--exp", "bad", "--stages", "01"], rf"--data {name}: no such folder",
                       capsys, monkeypatch)
        assert not (paths.inputs_dir() / name).exists()


def test_bad_yaml_names_the_file_and_line(comp, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlr: [1, 2\nbatch_size: 4\n")
    assert_refused(["--data", str(comp), "--exp", "bad", "--params", str(bad)],
                   rf"{bad}, line \d: not a YAML parameters file", capsys, monkeypatch)
    bad.write_text("epochs: 2\n\tlr: 1\n")  # a tab: YAML's scanner error
    assert_refused(["--data", str(comp), "--exp", "bad", "--params", str(bad)],
                   rf"{bad}, line 2: not a YAML parameters file", capsys, monkeypatch)


def test_a_second_runner_on_the_same_experiment_stops(comp, capsys, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock = paths.working_dir() / "bad" / ".lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "t0"}))
        import papermill

        monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("ran a notebook"))
        assert pipeline.main(["--data", str(comp), "--exp", "bad", "--stages", "01"]) == 2
        assert f"is being run by pid {sleeper.pid}" in capsys.readouterr().err
        assert lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_test_image_also_in_train_is_reported(comp):
    name = first_train(comp)
    shutil.copyfile(comp / "train_images" / name, comp / "test_images" / name)
    sub = pd.read_csv(comp / "sample_submission.csv", dtype=str)
    pd.concat([sub, pd.DataFrame({"image": [name], "predictions": ["x"]})]).to_csv(
        comp / "sample_submission.csv", index=False)
    with pytest.warns(UserWarning, match=rf"sample_submission.csv, row {len(sub) + 1}: test image '{name}' is "
                                         r"also in train.csv \(1 test image\(s\) in all\)"):
        competition.load_competition(comp, check_pixels=False)
    # the same row as a pseudo-label (stage 06's round column > 0) is a test image by design: no warning
    train = pd.read_csv(comp / "train.csv", dtype=str)
    train["round"] = np.where(train["image"] == name, "1", "0")
    train.to_csv(comp / "train.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        competition.load_competition(comp, check_pixels=False)


def test_partial_test_csv_scores_only_the_images_it_labels(comp):
    """13 test images, 5 labelled: MAP@5 counts n=5 (the 8 others used to count as new_individual)."""
    from common.config import RetrievalConfig
    from common.stages.retrieve_submit import score

    truth = pd.read_csv(comp / "test.csv", dtype=str)
    truth.iloc[:5].to_csv(comp / "test.csv", index=False)
    c = competition.load_competition(comp, check_pixels=False)
    assert len(c.test) == 13 and len(c.truth) == 5
    answers = dict(zip(truth["image"], truth["individual_id"], strict=True))
    submission = pd.DataFrame({"image": c.test["image"],
                               "predictions": [f"{answers.get(i, 'zzz')} new_individual" for i in c.test["image"]]})
    sweep = pd.DataFrame({"threshold": [0.5], "map5": [0.4]})
    got = score(RetrievalConfig(), c, submission, 0.5, sweep, folds=[0])
    known = c.known_individuals
    expected = sum(1.0 if t in known else 0.5 for t in truth["individual_id"].iloc[:5]) / 5
    assert got["n"] == 5 and got["map5"] == pytest.approx(expected)


def test_a_failed_rerun_keeps_the_earlier_record_and_params(comp, monkeypatch):
    """The executed notebook and params.json of a rerun replace the record only when the stage succeeds."""
    import papermill

    exp_dir = paths.working_dir() / "rec"
    record = exp_dir / pipeline.notebook_for("01").name
    exp_dir.mkdir(parents=True)
    record.write_text("earlier record")
    (exp_dir / "params.json").write_text('{"earlier": true}\n')

    def fails(nb, out, **kwargs):
        Path(out).write_text("failed run")
        raise RuntimeError("a cell failed")

    monkeypatch.setattr(papermill, "execute_notebook", fails)
    with pytest.raises(RuntimeError, match="a cell failed"):
        pipeline.run(["01"], {"data": str(comp), "exp": "rec"})
    assert record.read_text() == "earlier record" and (exp_dir / "params.json").read_text() == '{"earlier": true}\n'
    assert record.with_suffix(".failed.ipynb").read_text() == "failed run"
    assert not (exp_dir / ".lock").exists()

    monkeypatch.setattr(papermill, "execute_notebook", lambda nb, out, **kwargs: Path(out).write_text("new"))
    pipeline.run(["01"], {"data": str(comp), "exp": "rec"})
    assert record.read_text() == "new" and not record.with_suffix(".failed.ipynb").exists()
    assert json.loads((exp_dir / "params.json").read_text()) == {"data": str(comp), "exp": "rec"}
