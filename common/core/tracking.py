"""Experiment tracking with MLflow, and per-epoch reports to an Optuna trial for pruning.

After each stage the runner calls :func:`log_stage`: one MLflow run per (experiment, stage) with the stage's
parameters, its per-epoch metrics (each ``log.csv`` under the stage folder, step = epoch, one series per fold),
its final metrics (``working/<exp>/metrics.json``), its time (papermill's duration of the executed notebook)
and its key artefacts (executed notebook, submission CSV, plots).

Where runs go (https://mlflow.org/docs/latest/ml/tracking/):

- default: a SQLite file ``working/mlflow.db`` (MLflow 3 made SQLite its default store; the ``mlruns/`` file
  store is legacy), artefacts under ``working/mlartifacts/<mlflow experiment>/``. See them with
  ``mlflow ui --backend-store-uri sqlite:///working/mlflow.db``;
- ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``) sends them elsewhere, e.g. ``http://server:5000``;
- the MLflow experiment is our experiment's name, or ``REID_TRACK_EXPERIMENT`` (the batch or sweep name) so a
  batch's runs sit side by side.

Tracking never blocks a run: any failure prints one warning and the stage's result stands.

:func:`report_epoch` is called by the training loops once per epoch. It does nothing unless a sweep
(:mod:`common.cli.sweep`) set ``REID_SWEEP_*`` in the environment: then it reports the epoch's validation value to
the trial and, when Optuna's pruner says so, writes ``working/<exp>/_pruned.json`` and raises
:class:`TrialPrunedError` (the sweep turns the failed run into ``optuna.TrialPruned``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd

from common.core import paths, store

# Keys of working/<exp>/metrics.json that hold each stage's final metrics (stage 04 writes top-level values).
STAGE_METRICS = {"04": None, "05": "classifier", "06": "ensemble"}
PRUNED_MARKER = "_pruned.json"
IMAGE_FOLDERS = {"crops", "images", "labels", "train", "test", "val"}
MAX_PLOTS = 20
SWEEP_ENV = ("REID_SWEEP_STORAGE", "REID_SWEEP_STUDY", "REID_SWEEP_TRIAL_ID", "REID_SWEEP_EXP")


class TrialPrunedError(RuntimeError):
    """Raised by :func:`report_epoch` when the sweep's pruner stops the trial."""


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<working>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.working_dir() / 'mlflow.db'}"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a.b": value}`` (booleans and non-finite values left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def stage_metrics(exp: str, stage: str) -> dict[str, float]:
    """A stage's final numeric metrics from ``working/<exp>/metrics.json`` (empty for stages 01-03)."""
    file = paths.exp_dir(exp) / "metrics.json"
    if stage not in STAGE_METRICS or not file.exists():
        return {}
    metrics = store.read_json(file)
    key = STAGE_METRICS[stage]
    if key is None:
        return flatten({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return flatten(metrics.get(key) or {})


def epoch_logs(exp: str, stage: str) -> dict[str, pd.DataFrame]:
    """Every ``log.csv`` under the stage folder, keyed by its folder relative to the stage (``fold0``)."""
    root = paths.stage_dir(exp, stage)
    if not root.exists():
        return {}
    return {str(f.parent.relative_to(root)): pd.read_csv(f) for f in sorted(root.rglob("log.csv"))}


def notebook_seconds(record: Path) -> float | None:
    """Papermill's duration of an executed notebook (``None`` when it has none)."""
    try:
        duration = json.loads(Path(record).read_text())["metadata"]["papermill"]["duration"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return float(duration) if duration is not None else None


def artefacts(exp: str, stage: str, record: Path | None) -> list[Path]:
    """The executed notebook, the stage's submission CSV and its plots (those that exist)."""
    files = [Path(record)] if record else []
    subs = {"04": exp, "05": f"{exp}-classifier"}
    if stage == "06":
        file = paths.exp_dir(exp) / "metrics.json"
        ens = store.read_json(file).get("ensemble", {}) if file.exists() else {}
        subs["06"] = ens.get("submission", "")
    if subs.get(stage):
        files.append(paths.submission_path(subs[stage]))
    stage_path = paths.stage_dir(exp, stage)
    if stage_path.exists():  # plots, not data: image folders (crops, YOLO's images) are left out
        plots = sorted(p for ext in ("png", "svg", "html") for p in stage_path.rglob(f"*.{ext}")
                       if not IMAGE_FOLDERS & set(p.relative_to(stage_path).parts[:-1]))
        files += plots[:MAX_PLOTS]
    return [f for f in files if f.is_file()]


def _lock(uri: str):
    """Serialise writers of one local SQLite store (parallel batch workers) with a file lock."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=120)


def _experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = uri.startswith(("sqlite:", "file:", "/"))
    location = (paths.working_dir() / "mlartifacts" / name).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        found = client.get_experiment_by_name(name)  # another process of the batch created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def _log(exp: str, stage: str, params: dict[str, Any], record: Path | None, uri: str) -> str:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server fails in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    with _lock(uri):
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("REID_TRACK_EXPERIMENT") or exp
        run = client.create_run(_experiment_id(client, name, uri), run_name=f"{exp}-{stage}",
                                tags={"exp": exp, "stage": stage, "notebook": Path(record).name if record else ""})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        now = int(pd.Timestamp.now().timestamp() * 1000)
        series = []
        for folder, log in epoch_logs(exp, stage).items():
            prefix = "" if folder == "." else f"{folder}/"
            for row in log.to_dict("records"):
                series += [Metric(f"{prefix}{k}", float(v), now, int(row["epoch"])) for k, v in row.items()
                           if k != "epoch" and isinstance(v, int | float) and math.isfinite(v)]
        final = stage_metrics(exp, stage)
        seconds = notebook_seconds(record) if record else None
        if seconds is not None:
            final["duration_s"] = seconds
        series += [Metric(k, v, now, 0) for k, v in final.items()]
        for i in range(0, len(series), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=series[i:i + 1000])
        for file in artefacts(exp, stage, record):
            client.log_artifact(run_id, str(file))
        client.set_terminated(run_id)
    return run_id


def log_stage(exp: str, stage: str, params: dict[str, Any], record: Path | None = None,
              uri: str | None = None) -> str | None:
    """Log one finished stage to MLflow; returns the run id, or ``None`` (with one warning) when tracking fails.

    Args:
        exp: experiment name (``working/<exp>``).
        stage: ``"01"`` .. ``"06"``.
        params: the stage's config values (logged as MLflow parameters).
        record: the executed notebook (logged as an artefact; its papermill duration as ``duration_s``).
        uri: tracking URI; default :func:`tracking_uri`.
    """
    uri = tracking_uri(uri)
    try:
        return _log(exp, stage, params, record, uri)
    except Exception as err:  # noqa: BLE001 - tracking must never stop a run
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        print(f"warning: MLflow tracking to {uri} failed ({type(err).__name__}: {first}); the run goes on",
              file=sys.stderr, flush=True)
        return None


def make_pruner(name: str, startup: int = 2):
    """Optuna's pruner for a sweep (a study does not store its pruner: the sweep and each trial build it alike).

    Args:
        name: ``median`` (stop a trial whose value is below the median of earlier trials at the same step) or
            ``none``.
        startup: completed trials before the median pruner prunes anything.
    """
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    raise ValueError(f"pruner {name!r}: use median or none")


def report_epoch(stage: str, fold: int, epoch: int, metrics: dict[str, Any]) -> None:
    """Report one epoch's validation value to the sweep's Optuna trial; raise when the pruner says stop.

    A no-op outside sweeps (``REID_SWEEP_*`` unset), on ranks other than 0, for other stages than the sweep's
    ``REID_SWEEP_STAGE`` and for a non-finite value. The pruner is ``REID_SWEEP_PRUNER`` (:func:`make_pruner`). The step is ``fold * 1000 + epoch``, so trials compare
    the same fold's epochs.

    Args:
        stage: the training stage calling (``"02"`` or ``"05"``).
        fold: the fold being trained.
        epoch: the epoch just finished (1-based).
        metrics: the epoch's row of ``log.csv``; ``REID_SWEEP_METRIC`` (default ``valid_acc``) is reported.
    """
    env = os.environ
    if not all(env.get(k) for k in SWEEP_ENV) or env.get("RANK", "0") != "0":
        return
    if env.get("REID_SWEEP_STAGE", stage) != stage:
        return
    value = metrics.get(env.get("REID_SWEEP_METRIC", "valid_acc"))
    if not isinstance(value, int | float) or not math.isfinite(value):
        return
    try:
        import optuna

        study = optuna.load_study(study_name=env["REID_SWEEP_STUDY"], storage=env["REID_SWEEP_STORAGE"],
                                  pruner=make_pruner(env.get("REID_SWEEP_PRUNER", "median"),
                                                     int(env.get("REID_SWEEP_PRUNER_STARTUP", "2"))))
        trial = optuna.trial.Trial(study, int(env["REID_SWEEP_TRIAL_ID"]))
        trial.report(float(value), step=int(fold) * 1000 + int(epoch))
        prune = trial.should_prune()
    except Exception as err:  # noqa: BLE001 - a sweep's bookkeeping must not stop training
        print(f"warning: reporting to the Optuna trial failed ({type(err).__name__}: {err})", file=sys.stderr)
        return
    if prune:
        store.write_json(paths.exp_dir(env["REID_SWEEP_EXP"]) / PRUNED_MARKER,
                         {"stage": stage, "fold": int(fold), "epoch": int(epoch), "value": float(value)})
        raise TrialPrunedError(f"Optuna pruned trial {env['REID_SWEEP_EXP']} at stage {stage}, fold {fold}, "
                               f"epoch {epoch} ({value:.4f})")
