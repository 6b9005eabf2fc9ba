"""common.cli.pipeline without papermill: stage ranges, parameter merging, freshness, notebook lookup, the CLI."""

from __future__ import annotations

import os

import pytest

from common.cli import pipeline
from common.core import paths, store


# -- parse_stages --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("01-04", ["01", "02", "03", "04"]),
        ("1-3", ["01", "02", "03"]),  # zero padding is optional
        ("2,4", ["02", "04"]),
        ("04,02", ["02", "04"]),  # always run in pipeline order
        ("02", ["02"]),
        ("03-03", ["03"]),
        ("01-02, 02-03", ["01", "02", "03"]),  # overlaps collapse
        ("00,05", ["00", "05"]),  # stage 00 (self-supervised pretraining) is selectable
        ("0-2", ["00", "01", "02"]),
    ],
)
def test_parse_stages(text, expected):
    assert pipeline.parse_stages(text) == expected


def test_parse_stages_reversed_range():
    with pytest.raises(ValueError, match=r"'03-01' is not a range"):
        pipeline.parse_stages("03-01")


@pytest.mark.parametrize("text", ["09", "01,07", "", "x"])
def test_parse_stages_unknown(text):
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.parse_stages(text)


@pytest.mark.parametrize("text", ["01-09", "05-00", "01-"])
def test_parse_stages_bad_range(text):
    with pytest.raises(ValueError, match="is not a range"):
        pipeline.parse_stages(text)


# -- merge_params / stage_params -----------------------------------------------------------------------------
@pytest.fixture
def pipeline_params_file(tmp_path):
    f = tmp_path / "base.yaml"
    f.write_text("epochs: 2\n"        # overridden by -p
                 "lr: 0.01\n"         # kept
                 "data: filedata\n"   # overridden by --data
                 "exp: fileexp\n"     # overridden by --exp
                 "knn_k: 9\n")        # stage 04 only
    return f


def test_merge_params_precedence(pipeline_params_file):
    overrides = ["epochs=3", "exp=pexp", "folds=0,2"]
    p = pipeline.merge_params(str(pipeline_params_file), overrides, "clidata", "cliexp")
    assert p == {"epochs": 3, "lr": 0.01, "data": "clidata", "exp": "cliexp", "knn_k": 9, "folds": "0,2"}
    p = pipeline.merge_params(str(pipeline_params_file), ["exp=pexp"], None, None)
    assert (p["exp"], p["data"], p["epochs"]) == ("pexp", "filedata", 2)  # -p beats the file
    assert pipeline.merge_params(None, [], None, None) == {}


def test_merge_params_errors():
    with pytest.raises(ValueError, match="-p epoch: unknown parameter"):
        pipeline.merge_params(None, ["epoch=3"], None, None)
    with pytest.raises(ValueError, match="expected key=value"):
        pipeline.merge_params(None, ["epochs"], None, None)


def test_stage_params_filters_and_validates(pipeline_params_file):
    params = pipeline.merge_params(str(pipeline_params_file), [], None, None)
    assert pipeline.stage_params("01", params) == {"data": "filedata", "exp": "fileexp"}
    expected = {"epochs": 2, "lr": 0.01, "data": "filedata", "exp": "fileexp"}
    assert pipeline.stage_params("02", params) == expected
    assert pipeline.stage_params("04", params)["knn_k"] == 9
    bad = pipeline.merge_params(None, ["epochs=many"], None, None)  # merging accepts it ...
    with pytest.raises(TypeError, match="parameter epochs='many'"):
        pipeline.stage_params("02", bad)  # ... building the stage's config does not
    assert pipeline.stage_params("01", bad) == {}  # stage 01 has no epochs
    with pytest.raises(ValueError, match="fold_merge"):
        pipeline.stage_params("04", {"fold_merge": "max"})


def test_per_stage_parameters_override_the_flat_ones(tmp_path):
    f = tmp_path / "two.yaml"
    f.write_text("backbone: resnet18\n02.backbone: resnet34\nepochs: 2\n")
    params = pipeline.merge_params(str(f), ["05.backbone=mobilenetv3_small_100", "05.epochs=4"], None, None)
    assert pipeline.stage_params("02", params) == {"backbone": "resnet34", "epochs": 2}
    assert pipeline.stage_params("05", params) == {"backbone": "mobilenetv3_small_100", "epochs": 4}
    params = pipeline.merge_params(str(f), ["backbone=vit", "02.epochs=1"], None, None)  # flat -p: still flat
    assert pipeline.stage_params("02", params) == {"backbone": "resnet34", "epochs": 1}  # 02.backbone wins
    assert pipeline.stage_params("05", params) == {"backbone": "vit", "epochs": 2}
    with pytest.raises(TypeError, match="stage 05: parameter epochs='x'"):
        pipeline.stage_params("05", {"05.epochs": "x"})


@pytest.mark.parametrize("item, match", [("09.lr=1", "unknown stage '09'"), ("04.lr=1", "stage 04 has no parameter 'lr'"),
                                         ("02.exp=x", "exp is one for the whole run")])
def test_per_stage_parameter_errors(item, match):
    with pytest.raises(ValueError, match=match):
        pipeline.merge_params(None, [item], None, None)


def test_baseline_drops_per_stage_epochs(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run", lambda stages, params, **kwargs: calls.append(params))
    assert pipeline.main(["--exp", "e1", "-p", "02.epochs=3", "-p", "01.crops_from=x", "--baseline"]) == 0
    assert calls[1] == {"epochs": 0, "exp": "e1-untrained", "crops_from": "e1"}


def test_torchrun_by_hand_takes_the_stage_values(monkeypatch, tmp_path):
    from common.cli import torchrun

    seen = {}
    monkeypatch.setattr(torchrun, "run_stage", lambda stage, config: seen.update(stage=stage, config=config))
    f = tmp_path / "p.yaml"
    f.write_text("backbone: resnet18\n05.backbone: resnet34\nknn_k: 3\n")
    assert torchrun.main(["--stage", "05", "--params", str(f), "-p", "02.epochs=9", "--exp", "t"]) == 0
    assert seen == {"stage": "05", "config": {"backbone": "resnet34", "exp": "t"}}
    assert torchrun.main(["--stage", "02", "--params", str(f), "-p", "02.epochs=9"]) == 0
    assert seen["config"] == {"backbone": "resnet18", "epochs": 9}


# -- notebook_for --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["01", "02", "03", "04"])
def test_notebook_for_real_folder(stage):
    nb = pipeline.notebook_for(stage)
    assert nb.parent == pipeline.NOTEBOOKS_DIR and nb.is_file()
    assert nb.name.startswith(f"{stage}_") and nb.suffix == ".ipynb"


def test_notebook_for_missing_or_ambiguous(tmp_path):
    with pytest.raises(FileNotFoundError, match="found 0"):
        pipeline.notebook_for("02", tmp_path)
    (tmp_path / "02_a.ipynb").write_text("{}")
    (tmp_path / "02_b.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match="found 2"):
        pipeline.notebook_for("02", tmp_path)


# -- is_fresh ------------------------------------------------------------------------------------------------
def set_mtime(path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


@pytest.fixture
def pipeline_working(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_WORKING_DIR", str(tmp_path / "w"))
    return tmp_path / "w"


def test_is_fresh(pipeline_working):
    fp = {"epochs": 2, "exp": "e"}
    assert not pipeline.is_fresh("e", "02", fp)  # no marker yet
    m01 = store.mark_done(paths.stage_dir("e", "01"), {"crop": True})
    m02 = store.mark_done(paths.stage_dir("e", "02"), fp)
    set_mtime(m01, 1_000)  # stage 01 finished first
    set_mtime(m02, 2_000)  # then stage 02
    assert pipeline.is_fresh("e", "02", fp)
    assert pipeline.is_fresh("e", "02", {"exp": "e", "epochs": 2})  # key order does not matter
    assert not pipeline.is_fresh("e", "02", {**fp, "epochs": 3})  # other parameters
    set_mtime(m01, 3_000)  # stage 01 rerun after stage 02: 02 is stale
    assert not pipeline.is_fresh("e", "02", fp)
    set_mtime(m01, 2_000)  # same instant counts as fresh (<=)
    assert pipeline.is_fresh("e", "02", fp)


def test_is_fresh_ignores_later_and_missing_stages(pipeline_working):
    fp = {"knn_k": 5}
    m03 = store.mark_done(paths.stage_dir("e", "03"), fp)
    set_mtime(m03, 1_000)
    m04 = store.mark_done(paths.stage_dir("e", "04"), fp)
    set_mtime(m04, 500)  # a later stage being older does not matter to stage 03
    assert pipeline.is_fresh("e", "03", fp)  # stages 01/02 have no markers (e.g. crops_from): fine
    assert not pipeline.is_fresh("e", "04", fp)  # 04 is older than 03


# -- main (the CLI) without running notebooks ----------------------------------------------------------------
@pytest.fixture
def pipeline_captured_run(monkeypatch):
    seen = {}

    def fake_run(stages, params, force=False, log_output=True, **kwargs):
        seen.update(stages=stages, params=params, force=force)
        return None

    monkeypatch.setattr(pipeline, "run", fake_run)
    return seen


def test_main_exp_name(tmp_path, pipeline_captured_run):
    f = tmp_path / "cpu.yaml"
    f.write_text("epochs: 2\n")
    assert pipeline.main(["--params", str(f), "--stages", "02-03"]) == 0
    assert pipeline_captured_run["params"] == {"epochs": 2, "exp": "cpu"}  # the file's name names the run
    assert pipeline_captured_run["stages"] == ["02", "03"]
    assert pipeline.main(["--params", str(f), "-p", "exp=mine"]) == 0
    assert pipeline_captured_run["params"]["exp"] == "mine"  # -p beats the file's name
    assert pipeline.main(["--params", str(f), "-p", "exp=mine", "--exp", "top", "--force"]) == 0
    assert pipeline_captured_run["params"]["exp"] == "top" and pipeline_captured_run["force"] is True
    assert pipeline.main(["--stages", "04"]) == 0
    assert pipeline_captured_run["params"] == {"exp": "demo"}  # no file, no --exp: the configs' default


def test_main_prints_summary_without_exp(monkeypatch, capsys):
    metrics = {"map5": 0.5, "map5_known": 0.625, "map5_new": None, "threshold": 0.3}
    monkeypatch.setattr(pipeline, "run", lambda stages, params, **kwargs: metrics)
    assert pipeline.main(["--stages", "04"]) == 0  # used to raise KeyError('exp') after the run
    assert "demo: MAP@5 = 0.5000 (known 0.6250, new n/a), threshold 0.30" in capsys.readouterr().out


def test_main_reports_bad_input(capsys, pipeline_captured_run):
    assert pipeline.main(["-p", "epoch=3"]) == 2
    assert "error: -p epoch: unknown parameter" in capsys.readouterr().err
    assert pipeline.main(["--stages", "03-01"]) == 2
    assert pipeline_captured_run == {}  # nothing ran


def test_main_baseline_runs_untrained_copy(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run", lambda stages, params, **kwargs: calls.append(params))
    assert pipeline.main(["--exp", "e1", "-p", "epochs=3", "--baseline"]) == 0
    assert calls == [
        {"epochs": 3, "exp": "e1"},  # the experiment itself
        {"epochs": 0, "exp": "e1-untrained", "crops_from": "e1"},  # same pipeline, untrained, same crops
    ]


def test_summary_line_retrieval_and_classifier():
    both = {"map5": 0.5, "map5_known": 0.6, "map5_new": None, "threshold": 0.42,
            "classifier": {"oof_accuracy": 0.7, "oof_balanced_accuracy": 0.65, "test_accuracy": 0.8,
                           "test_balanced_accuracy": 0.75}}
    assert pipeline.summary_line("e", both).splitlines() == [
        "e: MAP@5 = 0.5000 (known 0.6000, new n/a), threshold 0.42",
        "e classifier: test accuracy = 0.8000, balanced accuracy = 0.7500",
    ]
    only_cls = {"classifier": {"oof_accuracy": 0.7, "oof_balanced_accuracy": 0.65}}
    assert pipeline.summary_line("c", only_cls) == "c classifier: oof accuracy = 0.7000, balanced accuracy = 0.6500"


def test_summary_line_ensemble_lists_its_scalar_figures():
    metrics = {"ensemble": {"submission": "e-ens2-w25", "members": ["a", "b"], "oof_accuracy": 0.75}}
    assert pipeline.summary_line("e", metrics) == "e ensemble: submission = e-ens2-w25, oof_accuracy = 0.7500"
