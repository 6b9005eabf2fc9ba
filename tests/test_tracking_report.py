"""MLflow tracking (written, then read back with MLflow's own client), the broken-backend case, Optuna pruning
through report_epoch, the comparison report, batch planning and Slurm submission arguments (no Slurm here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from common.cli import batch, pipeline, report, sweep
from common.core import paths, store, tracking


def fake_experiment(exp: str, params: dict, metrics: dict, logs: dict[str, list[float]] | None = None,
                    failed: bool = False, seconds: float = 60.0) -> Path:
    """A working/<exp> folder as the runner leaves it: params.json, metrics.json, stage-05 logs, a record."""
    root = paths.exp_dir(exp)
    store.write_json(root / "params.json", {"exp": exp, **params})
    store.write_json(root / "metrics.json", metrics)
    for fold, accs in (logs or {}).items():
        store.write_csv(root / "05_classifier" / fold / "log.csv",
                        pd.DataFrame({"epoch": range(1, len(accs) + 1), "valid_acc": accs,
                                      "train_loss": [2.0 - a for a in accs]}))
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"duration": seconds, "exception": failed, "end_time": "2026-12-01T10:00:00.0"}
    nbformat.write(nb, root / "05_train_classifier.ipynb")
    return root


# -- tracking ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One MLflow SQLite store for the module: creating its tables takes seconds, so do it once."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def test_flatten_keeps_finite_numbers():
    values = {"a": 1, "b": {"c": 0.5, "d": True, "e": "x", "f": float("nan"), "g": {"h": 2}}, "i": None}
    assert tracking.flatten(values) == {"a": 1.0, "b.c": 0.5, "b.g.h": 2.0}


def test_default_store_is_sqlite_under_working(isolated, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{isolated / 'working' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.tracking_uri() == "http://server:5000" and tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_log_stage_round_trip_with_mlflow_client(isolated, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)

    metrics = {"oof_map5": 0.5, "classifier": {"oof_accuracy": 0.25, "test_accuracy": 0.75, "label_column": "x"}}
    root = fake_experiment("tr1", {"lr": 0.01}, metrics, {"fold0": [0.1, 0.4], "fold1": [0.2, 0.3]}, seconds=12.5)
    paths.submission_path("tr1-classifier").parent.mkdir(parents=True, exist_ok=True)
    paths.submission_path("tr1-classifier").write_text("image,predictions\na.jpg,x\n")
    (root / "05_classifier" / "recall.png").write_bytes(b"png")  # a plot: logged
    (root / "05_classifier" / "crops").mkdir()
    (root / "05_classifier" / "crops" / "a.png").write_bytes(b"png")  # an image folder: not logged
    run_id = tracking.log_stage("tr1", "05", {"lr": 0.01, "head": "arcface"}, root / "05_train_classifier.ipynb")
    assert run_id is not None
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.01", "head": "arcface"}
    assert run.data.tags["exp"] == "tr1" and run.data.tags["stage"] == "05"
    # final metrics of stage 05 only (stage 04's oof_map5 belongs to the 04 run), plus the notebook's duration
    final = {k: v for k, v in run.data.metrics.items() if "/" not in k}
    assert final == {"oof_accuracy": 0.25, "test_accuracy": 0.75, "duration_s": 12.5}
    history = client.get_metric_history(run_id, "fold0/valid_acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.1), (2, 0.4)]
    assert [m.value for m in client.get_metric_history(run_id, "fold1/train_loss")] == [1.8, 1.7]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"05_train_classifier.ipynb", "tr1-classifier.csv", "recall.png"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "tr1" and exp.artifact_location.startswith((isolated / "working").as_uri())


def test_batch_name_groups_runs(isolated, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("REID_TRACK_EXPERIMENT", "mybatch")
    for exp in ("g1", "g2"):
        fake_experiment(exp, {}, {"oof_map5": 0.1})
        assert tracking.log_stage(exp, "04", {"exp": exp}) is not None
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("mybatch").experiment_id])
    assert sorted(r.data.tags["exp"] for r in runs) == ["g1", "g2"]
    assert {r.data.metrics["oof_map5"] for r in runs} == {0.1}


@pytest.mark.parametrize("uri", ["sqlite:///{file}/mlflow.db", "nosuchscheme://host/x"])
def test_broken_backend_warns_once_and_goes_on(isolated, capsys, uri):
    (isolated / "a-file").write_text("not a folder")
    uri = uri.format(file=isolated / "a-file")  # a database under a plain file cannot be created
    fake_experiment("br", {}, {"oof_map5": 0.1})
    assert tracking.log_stage("br", "04", {"exp": "br"}, uri=uri) is None
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking") == 1 and uri in err and "the run goes on" in err


def test_runner_goes_on_when_tracking_fails(isolated, monkeypatch, tmp_path, capsys):
    """The runner's hook: a stage (a trivial notebook standing for 04) finishes and the run returns its metrics
    although MLFLOW_TRACKING_URI points at nothing usable; --no-track (track=False) does not even try."""
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nb_dir / "04_fake.ipynb")
    store.write_json(paths.exp_dir("rb") / "metrics.json", {"oof_map5": 0.3})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/x")
    metrics = pipeline.run(["04"], {"exp": "rb", "data": "demo_tiny"}, log_output=False, notebooks_dir=nb_dir)
    assert metrics == {"oof_map5": 0.3}
    assert capsys.readouterr().err.count("warning: MLflow tracking to nosuchscheme://host/x failed") == 1
    pipeline.run(["04"], {"exp": "rb", "data": "demo_tiny"}, force=True, log_output=False, notebooks_dir=nb_dir,
                 track=False)
    assert "warning" not in capsys.readouterr().err


def test_runner_cli_track_switch(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "run", lambda stages, params, **kw: seen.append(kw["track"]))
    assert pipeline.main(["--stages", "04"]) == 0 and pipeline.main(["--stages", "04", "--no-track"]) == 0
    assert seen == [True, False]


# -- pruning -------------------------------------------------------------------------------------------------
def test_report_epoch_prunes_below_the_median(isolated, monkeypatch):
    import optuna

    storage = f"sqlite:///{isolated / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    done = study.ask()
    done.report(0.8, step=1001)  # fold 1, epoch 1
    study.tell(done, 0.8)
    trial = study.ask()
    env = {"REID_SWEEP_STORAGE": storage, "REID_SWEEP_STUDY": "s", "REID_SWEEP_TRIAL_ID": str(trial._trial_id),
           "REID_SWEEP_EXP": "s-t1", "REID_SWEEP_STAGE": "05", "REID_SWEEP_PRUNER": "median",
           "REID_SWEEP_PRUNER_STARTUP": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tracking.report_epoch("02", 1, 1, {"valid_acc": 0.1})  # another stage than the sweep's: ignored
    tracking.report_epoch("05", 1, 1, {"valid_acc": float("nan")})  # not finite: ignored
    assert study.trials[1].intermediate_values == {}
    tracking.report_epoch("05", 0, 1, {"valid_acc": 0.1})  # step 1: no other trial reported it, no pruning
    with pytest.raises(tracking.TrialPrunedError, match="s-t1 at stage 05, fold 1, epoch 1"):
        tracking.report_epoch("05", 1, 1, {"valid_acc": 0.5})  # below 0.8 at step 1001
    assert study.trials[1].intermediate_values == {1: 0.1, 1001: 0.5}
    marker = store.read_json(paths.exp_dir("s-t1") / tracking.PRUNED_MARKER)
    assert marker == {"stage": "05", "fold": 1, "epoch": 1, "value": 0.5}


def test_report_epoch_outside_sweeps_does_nothing(isolated):
    tracking.report_epoch("05", 0, 1, {"valid_acc": 0.0})  # no REID_SWEEP_* set: no error, no file
    assert not paths.working_dir().exists() or not any(paths.working_dir().rglob(tracking.PRUNED_MARKER))


# -- sweep helpers -------------------------------------------------------------------------------------------
def test_load_space_and_suggest(tmp_path):
    import optuna

    file = tmp_path / "space.yaml"
    file.write_text("lr: {type: float, low: 1e-4, high: 1e-2, log: true}\nepochs: {type: int, low: 1, high: 3}\n"
                    "head: {type: categorical, choices: [linear, arcface]}\n")
    space = sweep.load_space(file)
    assert space["lr"]["low"] == 1e-4  # YAML reads "1e-4" as a string: cast
    trial = optuna.create_study().ask()
    values = sweep.suggest(trial, space)
    assert 1e-4 <= values["lr"] <= 1e-2 and values["epochs"] in (1, 2, 3) and values["head"] in ("linear", "arcface")
    file.write_text("lrr: {type: float, low: 1, high: 2}\n")
    with pytest.raises(ValueError, match="lrr: unknown parameter"):
        sweep.load_space(file)
    file.write_text("lr: {type: float, low: 0, high: 2, log: true}\n")
    with pytest.raises(ValueError, match="0 < low"):
        sweep.load_space(file)


def test_read_metric_and_shares(isolated):
    store.write_json(paths.exp_dir("m") / "metrics.json", {"oof_map5": 0.5, "classifier": {"oof_accuracy": 0.25}})
    assert sweep.read_metric("m", "classifier.oof_accuracy") == 0.25
    assert sweep.read_metric("m", "oof_map5") == 0.5
    with pytest.raises(KeyError, match="metrics.json: no 'map5'"):
        sweep.read_metric("m", "map5")
    assert sweep.shares(3, 2) == [2, 1] and sweep.shares(1, 3) == [1] and sweep.shares(4, 2) == [2, 2]


# -- batch helpers -------------------------------------------------------------------------------------------
def test_grid_and_names():
    assert batch.parse_grid(["lr=1e-3,3e-4", "epochs=1,2"]) == [
        {"lr": 0.001, "epochs": 1}, {"lr": 0.001, "epochs": 2}, {"lr": 0.0003, "epochs": 1},
        {"lr": 0.0003, "epochs": 2}]
    assert batch.exp_name("debug", {"lr": 0.001, "epochs": 2}) == "debug-lr0.001-epochs2"
    assert batch.exp_name("b", {"data": "../x y"}) == "b-data.._x_y"
    exps = batch.plan(["params/debug.yaml"], ["lr=1e-3,3e-4"], ["epochs=2"])
    assert [(e.name, e.params_file, e.overrides) for e in exps] == [
        ("debug-lr0.001", "params/debug.yaml", ["epochs=2", "lr=0.001"]),
        ("debug-lr0.0003", "params/debug.yaml", ["epochs=2", "lr=0.0003"])]
    cmd = exps[0].command("05", track=False)
    assert cmd[1:] == ["-m", "common.cli.pipeline", "--exp", "debug-lr0.001", "--stages", "05", "--quiet", "--params",
                       "params/debug.yaml", "-p", "epochs=2", "-p", "lr=0.001", "--no-track"]
    with pytest.raises(ValueError, match="--grid lrr: unknown parameter"):
        batch.plan([], ["lrr=1"], [])


def test_outcome_reads_the_last_attempt(isolated):
    log = paths.exp_dir("o") / "batch.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"{batch.ATTEMPT}x\n[05] done in 3 s\n{batch.ATTEMPT}x\n[05] 05_x.ipynb: {batch.SKIPPED_LINE}\n")
    exp = batch.Experiment("o")
    assert batch.outcome(exp, 0, 1.0, n_stages=1)["status"] == "skipped"
    assert batch.outcome(exp, 0, 1.0, n_stages=2)["status"] == "ran"  # one of two stages ran
    log.write_text(log.read_text() + f"{batch.ATTEMPT}x\nerror: -p lr: bad\n")
    row = batch.outcome(exp, 2, 1.0, n_stages=1)
    assert (row["status"], row["error"], row["notebook"]) == ("failed", "error: -p lr: bad", "")


def test_slurm_submission_arguments(isolated):
    """submitit's executor is replaced by a recorder: the parameters and one job per experiment."""
    class Recorder:
        def __init__(self):
            self.params, self.jobs = {}, []

        def update_parameters(self, **kw):
            self.params.update(kw)

        def submit(self, fn, *args):
            self.jobs.append((fn, args))
            return type("Job", (), {"job_id": str(100 + len(self.jobs))})()

    ex = Recorder()
    exps = batch.plan([], ["lr=0.1,0.2"], ["data=demo_tiny"], base="sl")
    rows = batch.submit_slurm(exps, "02-04", isolated / "slurm", partition="gpu", gpus=2, time_min=90, mem_gb=64,
                              cpus=6, batch="sl", executor=ex)
    assert ex.params == {"name": "sl-lr0.2", "timeout_min": 90, "mem_gb": 64, "gpus_per_node": 2,
                         "cpus_per_task": 6, "tasks_per_node": 1, "nodes": 1, "slurm_partition": "gpu"}
    assert [r["job_id"] for r in rows] == ["101", "102"] and {r["status"] for r in rows} == {"submitted"}
    fn, (cmd, log, env) = ex.jobs[1]
    assert fn is batch.run_command and env == {"REID_TRACK_EXPERIMENT": "sl"}
    assert cmd[cmd.index("--exp") + 1] == "sl-lr0.2" and log == str(paths.exp_dir("sl-lr0.2") / "batch.log")


def test_slurm_sbatch_script_from_submitit(isolated, monkeypatch):
    """submitit's own Slurm executor, with stand-ins for `srun` and `sbatch` on PATH: the job scripts it writes
    carry the batch's options."""
    import os

    import submitit

    fake_bin = isolated / "bin"
    fake_bin.mkdir()
    for tool, text in (("sbatch", 'echo "Submitted batch job 4242"'), ("srun", "exit 0")):
        (fake_bin / tool).write_text(f"#!/bin/sh\n{text}\n")
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    ex = submitit.AutoExecutor(folder=str(isolated / "slurm"), cluster="slurm")
    exps = batch.plan([], ["lr=0.1"], ["data=demo_tiny"], base="sl")
    (row,) = batch.submit_slurm(exps, "02-04", isolated / "slurm", partition="gpu", gpus=2, time_min=90, mem_gb=64,
                                cpus=6, executor=ex)
    assert row["job_id"] == "4242"
    script = (isolated / "slurm" / "4242_submission.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=90", "--mem=64GB", "--cpus-per-task=6",
                 "--job-name=sl-lr0.1", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script, line


def test_slurm_job_runs_with_submitit_debug_executor(isolated):
    """submitit's DebugExecutor runs the submitted function in this process: the job writes its log."""
    import sys

    import submitit

    ex = submitit.AutoExecutor(folder=str(isolated / "slurm"), cluster="debug")
    exp = batch.Experiment("dbg")
    exp.command = lambda stages, track=True: [sys.executable, "-c", "print('hello from the job')"]
    jobs, submit = [], ex.submit
    ex.submit = lambda *a: jobs.append(submit(*a)) or jobs[-1]
    (row,) = batch.submit_slurm([exp], "04", isolated / "slurm", executor=ex)
    assert row["status"] == "submitted"
    assert jobs[0].result() == 0  # the debug executor runs the job here
    assert "hello from the job" in Path(row["log"]).read_text()


# -- report --------------------------------------------------------------------------------------------------
def test_changed_params_against_stage_defaults():
    defaults = report.stage_defaults()
    assert report.changed_params({"exp": "x", "folds": 0, "lr": 0.001, "epochs": 7, "head": "arcface",
                                  "num_workers": 4}, defaults) == {"epochs": 7, "head": "arcface"}


def test_report_table_and_html(isolated):
    fake_experiment("alpha", {"lr": 0.01, "epochs": 3}, {"classifier": {"oof_accuracy": 0.5}},
                    {"fold0": [0.2, 0.5, 0.6]}, seconds=120)
    fake_experiment("beta", {"head": "arcface"}, {"oof_map5": 0.25}, failed=True, seconds=30)
    store.write_json(paths.exp_dir("beta") / tracking.PRUNED_MARKER, {})
    (paths.working_dir() / "batches").mkdir()  # not an experiment: no params.json
    df = report.report_table()
    assert list(df.index) == ["alpha", "beta"]
    assert df.loc["alpha", "changed"] == "epochs=3, lr=0.01" and df.loc["beta", "changed"] == "head=arcface"
    assert df.loc["alpha", "classifier.oof_accuracy"] == 0.5 and df.loc["beta", "oof_map5"] == 0.25
    assert df.loc["alpha", "minutes"] == 2.0 and df.loc["alpha", "status"] == "ok"
    assert df.loc["beta", "status"] == "pruned" and df.loc["alpha", "stages"] == "05"
    out = report.write_report()
    page = out.read_text()
    assert out == paths.working_dir() / "report.html"
    assert re.search(r"<tr><td>alpha</td><td>05</td><td>ok</td><td>epochs=3, lr=0.01</td>", page)
    assert "<td>beta</td>" in page and "<script>" in page and "src=" not in page and "href=" not in page
    # alpha's curve: 3 points, from (epoch 1, 0.2) at the bottom left to (epoch 3, 0.6) at the top right
    poly = re.findall(r'<polyline[^>]*points="([^"]+)"', page)
    assert len(poly) == 2  # valid_acc and train_loss of alpha's fold 0; beta has no log.csv
    pts = [tuple(map(float, p.split(","))) for p in poly[0].split()]
    assert pts[0] == (30.0, 130.0) and pts[-1] == (290.0, 30.0)


def test_report_cli_prints_the_table(isolated, capsys):
    fake_experiment("gamma", {"epochs": 2}, {"oof_map5": 0.125})
    assert report.main(["--match", "gam"]) == 0
    out = capsys.readouterr().out
    assert "gamma" in out and "0.125" in out and "epochs=2" in out


def test_compare_notebook_parameters():
    import papermill as pm

    nb = Path(__file__).resolve().parents[1] / "notebooks" / "compare_experiments.ipynb"
    assert set(pm.inspect_notebook(str(nb))) == {"working", "match", "html_out"}
    assert "report_table" in json.dumps(json.loads(nb.read_text())["cells"])


def test_the_example_search_space_loads():
    from common.cli import sweep
    from common.config import known_params

    space = sweep.load_space(str(Path(__file__).resolve().parents[1] / "params" / "sweeps" / "embedder.yaml"))
    assert set(space) <= known_params() and {"lr", "epochs"} <= set(space)
