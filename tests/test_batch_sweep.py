"""End to end on the tiny demo (stage 05 only, 32-pixel images, one fold, one epoch): a 2-worker CPU batch of
3 experiments, one failing on purpose, and a 3-trial Optuna sweep whose SQLite study two worker processes share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import batch, report, sweep
from common.core import paths, store
from common.data import demo

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_experiments.ipynb"

TINY = ["data=demo_tiny", "backbone=mobilenetv3_small_050", "pretrained=none", "tta_flip=false", "image_size=32",
        "epochs=1", "batch_size=8", "n_folds=2", "folds=0", "use_crops=false", "num_workers=0"]


@pytest.fixture
def tiny(isolated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs at a time on a 2-core box
    demo.ensure_demo(paths.data_dir("demo_tiny"))  # generated once, before the parallel runs
    return isolated


def test_batch_two_workers_one_failure(tiny, capsys):
    from mlflow.tracking import MlflowClient

    args = ["--name", "b", "--stages", "05", "--workers", "2", "--grid", "label_column=individual_id,species,nosuch"]
    for item in TINY:
        args += ["-p", item]
    assert batch.main(args) == 1  # one experiment failed
    out = capsys.readouterr().out
    ok, bad = ["b-label_columnindividual_id", "b-label_columnspecies"], "b-label_columnnosuch"
    summary = store.read_json(paths.working_dir() / "batches" / "b.json")
    status = {r["exp"]: r["status"] for r in summary["results"]}
    assert status == {ok[0]: "ran", ok[1]: "ran", bad: "failed"}, out
    failed = next(r for r in summary["results"] if r["exp"] == bad)
    assert failed["notebook"] == str(paths.exp_dir(bad) / "05_train_classifier.failed.ipynb")
    assert f"failed notebook: {failed['notebook']}" in out and "2 ran, 1 failed" in out
    for exp in ok:
        metrics = store.read_json(paths.exp_dir(exp) / "metrics.json")
        assert 0.0 <= metrics["classifier"]["oof_accuracy"] <= 1.0
        assert "[05] done" in (paths.exp_dir(exp) / "batch.log").read_text()
    # every finished stage went to MLflow, under the batch's name
    client = MlflowClient(tracking_uri=f"sqlite:///{paths.working_dir() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("b").experiment_id])
    assert sorted(r.data.tags["exp"] for r in runs) == ok
    assert all("oof_accuracy" in r.data.metrics and "fold0/valid_acc" in r.data.metrics for r in runs)
    # the report shows the three experiments, the failing one as failed
    df = report.report_table()
    assert list(df.index) == sorted([bad, *ok])
    assert df.loc[bad, "status"] == "failed (05_train_classifier.failed.ipynb)"
    assert df.loc[ok[1], "changed"].startswith("backbone=mobilenetv3_small_050, batch_size=8, data=demo_tiny")
    assert "label_column=species" in df.loc[ok[1], "changed"] and "label_column" not in df.loc[ok[0], "changed"]
    page = report.write_report().read_text()
    assert all(f"<tr><td>{e}</td>" in page for e in (bad, *ok)) and page.count("<polyline") == 4
    # the notebook cell shows the same table
    import papermill as pm

    nb = pm.execute_notebook(str(NOTEBOOK), str(tiny / "compare.ipynb"), cwd=str(NOTEBOOK.parent),
                             parameters={"match": "b-"}, progress_bar=False)
    shown = "".join(o.get("data", {}).get("text/plain", "") for c in nb.cells for o in c.get("outputs", []))
    assert all(e in shown for e in (bad, *ok)) and "failed (05_train_classifier.failed.ipynb)" in shown
    # resumed: the finished experiments are skipped, the failed one runs (and fails) again
    assert batch.main(args) == 1
    summary = store.read_json(paths.working_dir() / "batches" / "b.json")
    assert {r["exp"]: r["status"] for r in summary["results"]} == {ok[0]: "skipped", ok[1]: "skipped", bad: "failed"}


def test_sweep_three_trials_two_workers(tiny, tmp_path, capfd):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "head: {type: categorical, choices: [linear, arcface]}\n")
    args = ["--space", str(space), "--study", "sw", "--stages", "05", "--n-trials", "3", "--n-workers", "2",
            "--seed", "0", "--no-track"]
    for item in TINY:
        args += ["-p", item]
    assert sweep.main(args) == 0
    out = capfd.readouterr().out
    import optuna

    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{paths.working_dir() / 'sweeps' / 'sw.db'}")
    assert len(study.trials) == 3
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    for t in study.trials:
        exp = paths.exp_dir(f"sw-t{t.number}")
        params = json.loads((exp / "params.json").read_text())
        assert params["head"] == t.params["head"] and params["lr"] == pytest.approx(t.params["lr"])
        if t.state.name == "COMPLETE":
            assert t.value == sweep.read_metric(f"sw-t{t.number}", "classifier.oof_accuracy")
    assert f"best parameters: {study.best_trial.params}" in out
    assert "study sw" in out and "3 trials" in out
