"""Parameter sweeps on Optuna: each trial runs the runner's stages as an ordinary experiment ``<study>-t<N>``.

Usage::

    python -m common.sweep --space params/sweeps/embedder.yaml --params params/debug.yaml --stages 02-04 --n-trials 20
    python -m common.sweep --space params/sweeps/embedder.yaml --stages 05 --n-trials 20 --n-workers 2   # two processes
    python -m common.sweep --space params/sweeps/embedder.yaml --storage postgresql://user:pw@host/db ...  # several machines

The search space is a YAML file, one entry per parameter (https://optuna.readthedocs.io/)::

    lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    epochs: {type: int, low: 1, high: 4}
    head: {type: categorical, choices: [linear, arcface]}

The objective is an out-of-fold metric of ``working/<exp>/metrics.json``: stage 04's ``oof_map5`` when the
stages end at 04, stage 05's ``classifier.oof_accuracy`` when they end at 05 (``--metric`` picks another,
dotted for nested keys). The study lives in ``working/sweeps/<study>.db`` (SQLite) unless ``--storage`` gives
another Optuna URL; every worker process, here (``--n-workers``) or on other machines (the same command with
the same ``--storage``), loads the same study: that is Optuna's own distributed mode. The training loops report
each epoch's validation accuracy to the trial (:func:`common.core.tracking.report_epoch`) so that the pruner
(median by default) stops poor trials early; a pruned trial's folder holds ``_pruned.json``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from common.cli import batch
from common.cli.pipeline import parse_stages
from common.config import known_params
from common.core import paths, store, tracking

DEFAULT_METRIC = {"04": "oof_map5", "05": "classifier.oof_accuracy"}
TRAINING_STAGE = {"04": "02", "05": "05"}  # the stage whose epochs are reported for the objective


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a search-space YAML file (see the module docstring); errors name the file and key."""
    space = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{path}: expected a mapping parameter -> {{type, low, high | choices}}")
    for name, spec in space.items():
        where = f"{path}: {name}"
        if name not in known_params():
            raise ValueError(f"{where}: unknown parameter")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ValueError(f"{where}: give type: float, int or categorical")
        if spec["type"] == "categorical":
            if not spec.get("choices"):
                raise ValueError(f"{where}: categorical needs a non-empty `choices` list")
        else:
            cast = float if spec["type"] == "float" else int
            try:
                spec["low"], spec["high"] = cast(float(spec["low"])), cast(float(spec["high"]))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: needs numeric `low` and `high` ({err})") from err
            if spec["low"] > spec["high"] or (spec.get("log") and spec["low"] <= 0):
                raise ValueError(f"{where}: need 0 < low <= high with log, low <= high otherwise")
    return space


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's values for every parameter of ``space``."""
    out = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            out[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")),
                                            step=spec.get("step"))
        elif spec["type"] == "int":
            out[name] = trial.suggest_int(name, spec["low"], spec["high"], log=bool(spec.get("log")),
                                          step=int(spec.get("step", 1)))
        else:
            out[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return out


def read_metric(exp: str, metric: str) -> float:
    """``metric`` (dotted for nested keys) from ``working/<exp>/metrics.json``; errors name the file and key."""
    file = paths.exp_dir(exp) / "metrics.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: did the stages that write {metric!r} run?")
    value: Any = store.read_json(file)
    for key in metric.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"{file}: no {metric!r}")
        value = value[key]
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{file}: {metric} = {value!r} is not a finite number")
    return float(value)


def default_storage(study: str) -> str:
    """``sqlite:///working/sweeps/<study>.db`` (the folder is created)."""
    folder = paths.working_dir() / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{study}.db'}"


def make_objective(args: argparse.Namespace, space: dict[str, dict[str, Any]], storage: str):
    """The Optuna objective: run the runner for one trial and return its metric."""
    import optuna

    last = parse_stages(args.stages)[-1]
    metric = args.metric or DEFAULT_METRIC.get(last, "")
    if not metric:
        raise ValueError(f"--stages {args.stages}: give --metric (defaults exist for stages ending at 04 or 05)")

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        exp = batch.exp_name(args.study, {"t": trial.number})
        trial.set_user_attr("exp", exp)
        over = list(args.param) + [f"{k}={v}" for k, v in values.items()]
        job = batch.Experiment(exp, args.params or "", over)
        env = {"REID_SWEEP_STORAGE": storage, "REID_SWEEP_STUDY": args.study, "REID_SWEEP_EXP": exp,
               "REID_SWEEP_TRIAL_ID": str(trial._trial_id),  # Optuna's Trial(study, trial_id) takes the id
               "REID_SWEEP_STAGE": TRAINING_STAGE.get(last, ""), "REID_SWEEP_METRIC": args.prune_metric,
               "REID_SWEEP_PRUNER": args.pruner, "REID_SWEEP_PRUNER_STARTUP": str(args.pruner_startup),
               "REID_TRACK_EXPERIMENT": args.study}
        print(f"trial {trial.number}: {exp} {values}", flush=True)
        rc = batch.run_command(job.command(args.stages, args.track), str(paths.exp_dir(exp) / "sweep.log"), env)
        if (paths.exp_dir(exp) / tracking.PRUNED_MARKER).exists():
            print(f"trial {trial.number}: pruned", flush=True)
            raise optuna.TrialPruned()
        if rc != 0:
            where = batch.failed_notebook(exp) or str(paths.exp_dir(exp) / "sweep.log")
            raise RuntimeError(f"trial {trial.number} ({exp}) failed: see {where}")
        value = read_metric(exp, metric)
        print(f"trial {trial.number}: {metric} = {value:.4f}", flush=True)
        return value

    return objective


def worker(args: argparse.Namespace, storage: str, n_trials: int) -> None:
    """One worker process: load the shared study and run ``n_trials`` trials of it."""
    import optuna

    space = load_space(args.space)
    study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler(args),
                              pruner=pruner(args))
    study.optimize(make_objective(args, space, storage), n_trials=n_trials, catch=(RuntimeError, OSError,
                                                                                   KeyError, ValueError))


def sampler(args: argparse.Namespace):
    import optuna

    # Each worker seeds its own sampler (seed + worker index): two workers with one seed would propose alike.
    seed = None if args.seed is None else args.seed + args.worker_index
    return optuna.samplers.TPESampler(seed=seed)


def pruner(args: argparse.Namespace):
    return tracking.make_pruner(args.pruner, args.pruner_startup)


def shares(n_trials: int, n_workers: int) -> list[int]:
    """``n_trials`` split over ``n_workers`` as evenly as possible (``shares(3, 2) == [2, 1]``), zeros dropped."""
    return [s for s in (n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)) if s]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", required=True, help="search-space YAML file")
    parser.add_argument("--study", default="", help="study name and experiment prefix (default: the space's name)")
    parser.add_argument("--params", default="", help="parameters file shared by every trial")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter shared by every trial (repeatable)")
    parser.add_argument("--stages", default="02-04", help="the runner's --stages for each trial")
    parser.add_argument("--metric", default="", help="key of metrics.json to maximise (dotted), e.g. oof_map5")
    parser.add_argument("--direction", default="maximize", choices=["maximize", "minimize"])
    parser.add_argument("--n-trials", type=int, default=10, help="trials run by this command (all its workers)")
    parser.add_argument("--n-workers", type=int, default=1, help="worker processes sharing the study")
    parser.add_argument("--devices", default="", help="CUDA devices, one worker per device (sets --n-workers)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default working/sweeps/<study>.db)")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed")
    parser.add_argument("--pruner", default="median", choices=["median", "none"])
    parser.add_argument("--pruner-startup", type=int, default=2, help="completed trials before pruning starts")
    parser.add_argument("--prune-metric", default="valid_acc", help="log.csv column reported each epoch")
    parser.add_argument("--no-track", dest="track", action="store_false", help="do not log to MLflow")
    parser.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import optuna

    try:
        args.study = paths.check_exp_name(args.study or Path(args.space).stem)
        load_space(args.space)
        parse_stages(args.stages)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    storage = args.storage or default_storage(args.study)
    if args.worker_index >= 0:  # a worker started below
        worker(args, storage, args.n_trials)
        return 0
    optuna.create_study(study_name=args.study, storage=storage, direction=args.direction, load_if_exists=True)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    n_workers = len(devices) or max(1, args.n_workers)
    procs = []
    for i, n in enumerate(shares(args.n_trials, n_workers)):
        cmd = [sys.executable, "-m", "common.cli.sweep", *(argv if argv is not None else sys.argv[1:]),
               "--storage", storage, "--study", args.study, "--n-trials", str(n), "--worker-index", str(i)]
        env = batch.child_env({"CUDA_VISIBLE_DEVICES": devices[i]} if devices else {})
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    study = optuna.load_study(study_name=args.study, storage=storage)
    states = [t.state.name for t in study.trials]
    print(f"study {args.study} ({storage}): {len(states)} trials, "
          + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states))))
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed", file=sys.stderr)
        return 1
    print(f"best trial {best.number} ({best.user_attrs.get('exp', '')}): value {best.value:.4f}")
    print(f"best parameters: {best.params}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
