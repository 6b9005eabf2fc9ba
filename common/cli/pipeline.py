"""The runner: execute a range of stage notebooks with papermill, one experiment at a time.

Usage::

    python -m common.cli.pipeline --data demo --exp demo --stages 01-04 --params params/demo.yaml -p epochs=3
    python -m common.cli.pipeline --params params/demo_classifier.yaml --stages 01,05

What it does:

1. merges the parameters file and the ``-p key=value`` pairs (the latter win) on top of each stage's
   defaults, and builds every selected stage's config first, so a typo or a bad value fails in a second,
   not after an hour of training;
2. runs each notebook with papermill, injecting only the parameters that notebook declares, from the
   ``notebooks/`` folder (the same working folder Jupyter uses), and keeps the executed copy in
   ``working/<exp>/<notebook>.ipynb`` as the run's record;
3. skips a stage whose outputs exist with the same parameters, unless ``--force``;
4. prints ``working/<exp>/metrics.json`` at the end (stage 04's retrieval scores, stage 05's under ``classifier``).

A stage rerun by hand in Jupyter with the same parameters (``params_file`` in its parameters cell, or the
executed record opened and run again) computes the same result: both paths go through the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import STAGE_CONFIGS, check_key, for_stage, load_params, parse_cli_value, split_key
from common.core import distributed, lock, paths, store, tracking
from common.data import fingerprint as fp

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"  # <root>/common/cli/pipeline.py


def notebook_for(stage: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """The notebook of a stage: ``notebooks/<stage>_*.ipynb`` (exactly one must exist)."""
    found = sorted(notebooks_dir.glob(f"{stage}_*.ipynb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one notebook {notebooks_dir}/{stage}_*.ipynb, found {len(found)}")
    return found[0]


def parse_stages(text: str) -> list[str]:
    """``"01-04"`` -> ``["01", "02", "03", "04"]``; ``"02,04"`` -> ``["02", "04"]``."""
    known = list(STAGE_CONFIGS)
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:  # "".zfill(2) would read as stage "00"
            raise ValueError(f"--stages {text!r}: unknown stage {part!r}; known: {known}")
        if "-" in part:
            lo, hi = (p.strip().zfill(2) for p in part.split("-", 1))
            if lo not in known or hi not in known or known.index(lo) > known.index(hi):
                raise ValueError(f"--stages {text!r}: {part!r} is not a range of {known}")
            out += known[known.index(lo): known.index(hi) + 1]
        else:
            if part.zfill(2) not in known:
                raise ValueError(f"--stages {text!r}: unknown stage {part!r}; known: {known}")
            out.append(part.zfill(2))
    return sorted(set(out), key=known.index)


def merge_params(params_file: str | None, overrides: list[str], data: str | None, exp: str | None) -> dict:
    """Parameters file, then ``key=value`` overrides, then ``--data``/``--exp``; unknown keys raise.

    A key is flat (``backbone``) or for one stage (``05.backbone``); :func:`stage_params` resolves them.
    """
    params: dict[str, Any] = load_params(params_file) if params_file else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"-p {item!r}: expected key=value")
        key, value = item.split("=", 1)
        check_key(key.strip(), f"-p {key}")
        params[key.strip()] = parse_cli_value(value)
    if data is not None:
        params["data"] = data
    if exp is not None:
        params["exp"] = exp
    return params


def stage_params(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a stage's config takes (its flat keys, then its ``<stage>.key`` ones over them),
    validated by building the config."""
    cls = STAGE_CONFIGS[stage]
    mine = for_stage(stage, params, cls.field_names())
    try:
        cls(**mine)  # raises on bad values before anything runs
    except (ValueError, TypeError) as err:
        raise type(err)(f"stage {stage}: {err}") from err
    return mine


def without(params: dict[str, Any], *names: str) -> dict[str, Any]:
    """``params`` without ``names``, flat or per stage (``epochs`` drops ``epochs`` and ``02.epochs``)."""
    return {k: v for k, v in params.items() if split_key(k)[1] not in names}


def is_fresh(exp: str, stage: str, fingerprint: dict[str, Any], say: bool = False) -> bool:
    """A stage is fresh when it finished with this fingerprint (parameters, data, upstream stages: see
    :mod:`common.data.fingerprint`) after every earlier stage finished (like make).

    Args:
        exp: the experiment.
        stage: the stage.
        fingerprint: :func:`common.data.fingerprint.stage_fingerprint` of the stage's config.
        say: print what changed when the stage finished earlier with another fingerprint.
    """
    marker = paths.stage_dir(exp, stage) / "_done.json"
    if not store.stage_done(marker.parent, fingerprint, STAGE_CONFIGS[stage].defaults()):
        if say and marker.exists():
            changed = fp.changes(fp.recorded(marker.parent), fingerprint)
            print(f"[{stage}] reruns: changed since its last run: {', '.join(changed)}", flush=True)
        return False
    earlier = [paths.stage_dir(exp, s) / "_done.json" for s in STAGE_CONFIGS if s < stage]
    return all(not m.exists() or m.stat().st_mtime_ns <= marker.stat().st_mtime_ns for m in earlier)


def check_data(data: str) -> None:
    """Refuse a ``--data`` folder that does not exist (unless it is a demo the runner generates: ``demo``,
    ``demo_tiny``) and check an existing one's tables (ids, columns, rows) before any stage runs.

    Args:
        data: the ``data`` parameter.
    """
    from common.data.competition import load_competition
    from common.data.demo import PRESETS

    root = paths.data_dir(data)
    if not root.exists() or (root.name in PRESETS and root.is_dir() and not any(root.iterdir())):
        if root.name in PRESETS:
            return  # generated by stage 01 on first use
        raise FileNotFoundError(f"--data {data}: no such folder ({root}); give a competition folder, a name "
                                f"under {paths.inputs_dir()}, or one of the generated demos {sorted(PRESETS)}")
    load_competition(root, check_pixels=False)  # raises naming the file and row


def run(stages: list[str], params: dict[str, Any], force: bool = False, log_output: bool = True,
        notebooks_dir: Path = NOTEBOOKS_DIR, kernel_name: str | None = None, track: bool = True) -> dict | None:
    """Execute ``stages`` in order; returns the experiment's metrics (``None`` unless stage 04, 05 or 06 ran).

    Every parameter and the data folder are checked first, then the experiment is locked
    (``working/<exp>/.lock``) for the whole run. With ``track`` each stage that ran is logged to MLflow
    (:func:`common.core.tracking.log_stage`; never fails the run).
    """
    exp = paths.check_exp_name(params.get("exp", STAGE_CONFIGS["01"]().exp))
    per_stage = {s: stage_params(s, params) for s in stages}
    check_data(str(params.get("data", STAGE_CONFIGS["01"]().data)))
    exp_dir = paths.exp_dir(exp)
    with lock.experiment_lock(exp_dir / ".lock", exp):  # a second runner on this experiment stops here
        _run_stages(stages, per_stage, params, exp_dir, force, log_output, notebooks_dir, kernel_name, track)
    metrics_file = exp_dir / "metrics.json"
    scored = any(s in stages for s in ("04", "05", "06"))
    return store.read_json(metrics_file) if scored and metrics_file.exists() else None


def _run_stages(stages: list[str], per_stage: dict[str, dict], params: dict[str, Any], exp_dir: Path,
                force: bool, log_output: bool, notebooks_dir: Path, kernel_name: str | None, track: bool) -> None:
    """Run each stage's notebook (see :func:`run`). The executed notebook is written aside
    (``<notebook>.running.ipynb``) and replaces the record only when the stage succeeds (a failed one is kept as
    ``<notebook>.failed.ipynb``); ``params.json`` is rewritten only after a stage succeeds: the records always
    describe the outputs."""
    import papermill as pm

    exp = exp_dir.name
    env_before = os.environ.get("REID_PROGRESS")
    os.environ["REID_PROGRESS"] = env_before or "text"  # text progress bars in papermill logs
    try:
        for stage in stages:
            nb = notebook_for(stage, notebooks_dir)
            cfg = STAGE_CONFIGS[stage](**per_stage[stage])
            if force:
                cfg = type(cfg)(**{**cfg.to_dict(), "force": True})
            if not force and is_fresh(exp, stage, fp.stage_fingerprint(cfg), say=True):
                print(f"[{stage}] {nb.name}: finished earlier with the same parameters, skipped (--force reruns)")
                continue
            declared = pm.inspect_notebook(str(nb))
            inject = {k: v for k, v in cfg.to_dict().items() if k in declared}
            record = exp_dir / nb.name
            running, failed = record.with_suffix(".running.ipynb"), record.with_suffix(".failed.ipynb")
            print(f"[{stage}] {nb.name} -> {record}", flush=True)
            t0 = time.perf_counter()
            try:
                pm.execute_notebook(str(nb), str(running), parameters=inject, cwd=str(nb.parent),
                                    log_output=log_output, progress_bar=False, kernel_name=kernel_name)
            except BaseException:
                if running.exists():
                    os.replace(running, failed)
                raise
            os.replace(running, record)
            failed.unlink(missing_ok=True)
            store.write_json(exp_dir / "params.json", params)
            if track:
                tracking.log_stage(exp, stage, cfg.to_dict(), record)
            print(f"[{stage}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if env_before is None:
            os.environ.pop("REID_PROGRESS", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="competition folder or name under inputs/ (default: the demo)")
    parser.add_argument("--exp", help="experiment name (default: the parameters file's name, else 'demo')")
    parser.add_argument("--stages", default="01-04", help="e.g. 01-04, 02, 03-04, 02,04, 01,05")
    parser.add_argument("--params", help="YAML parameters file, e.g. params/cpu.yaml")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (repeatable); 05.KEY=VALUE: for stage 05 only")
    parser.add_argument("--force", action="store_true", help="rerun stages that finished with the same params")
    parser.add_argument("--quiet", action="store_true", help="do not stream notebook output")
    parser.add_argument("--no-track", dest="track", action="store_false",
                        help="do not log stages to MLflow (default: on, to $MLFLOW_TRACKING_URI or working/mlflow.db)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run <exp>-untrained (same pipeline and crops, epochs=0) and compare MAP@5")
    args = parser.parse_args(argv)
    exp = args.exp
    if exp is None and args.params and not any(p.split("=", 1)[0].strip() == "exp" for p in args.param):
        exp = Path(args.params).stem  # the file's name names the experiment, unless -p exp=... says otherwise
    try:
        if distributed.launch_info().enabled:  # also raises on a half-set torchrun environment
            raise distributed.LaunchError(
                "the runner itself is not started with torchrun: run `python -m common.cli.pipeline ... -p nproc=N` "
                "(the training notebooks launch torchrun), or `torchrun --nproc_per_node=N -m common.cli.torchrun "
                "--stage 02 ...` for one training stage by hand")
        params = merge_params(args.params, args.param, args.data, exp)
        params.setdefault("exp", STAGE_CONFIGS["01"]().exp)  # named below (summary, baseline): never missing
        stages = parse_stages(args.stages)
        metrics = run(stages, params, force=args.force, log_output=not args.quiet, track=args.track)
        if args.baseline:
            base = {**without(params, "epochs", "crops_from"), "exp": f"{params['exp']}-untrained", "epochs": 0,
                    "crops_from": params["exp"]}
            print(f"baseline: {base['exp']} (epochs=0, crops from {params['exp']})", flush=True)
            base_metrics = run(stages, base, force=args.force, log_output=False, track=args.track)
    except (ValueError, FileNotFoundError, TypeError, distributed.LaunchError, lock.LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # papermill's execution error: point at the executed notebook
        if type(err).__name__ == "PapermillExecutionError":
            print(f"error: a notebook cell failed: {err}", file=sys.stderr)
            print(f"the executed notebook with the traceback is {paths.exp_dir(params['exp'])}/<notebook>.failed.ipynb"
                  " (the earlier record and params.json are untouched)", file=sys.stderr)
            return 1
        raise
    if metrics is not None:
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(summary_line(params["exp"], metrics))
        if args.baseline and base_metrics is not None:
            print(summary_line(f"{params['exp']}-untrained", base_metrics))
    return 0


def summary_line(exp: str, metrics: dict) -> str:
    """One line per experiment: MAP@5 (known / new) when scored, else the out-of-fold MAP@5."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = []
    if metrics.get("map5") is not None:
        lines.append(f"{exp}: MAP@5 = {fmt(metrics['map5'])} (known {fmt(metrics.get('map5_known'))}, "
                     f"new {fmt(metrics.get('map5_new'))}), threshold {metrics['threshold']:.2f}")
    elif "oof_map5" in metrics:
        lines.append(f"{exp}: out-of-fold MAP@5 = {fmt(metrics.get('oof_map5'))} "
                     "(no test.csv to score the submission)")
    cls = metrics.get("classifier")
    if cls:
        where = "test" if "test_accuracy" in cls else "oof"
        lines.append(f"{exp} classifier: {where} accuracy = {fmt(cls[f'{where}_accuracy'])}, balanced accuracy = "
                     f"{fmt(cls[f'{where}_balanced_accuracy'])}")
    ens = metrics.get("ensemble")
    if ens:
        shown = ", ".join(f"{k} = {fmt(v) if isinstance(v, float) else v}" for k, v in ens.items()
                          if isinstance(v, int | float | str) and not isinstance(v, bool))
        lines.append(f"{exp} ensemble: {shown}")
    return "\n".join(lines) if lines else f"{exp}: no scores"


if __name__ == "__main__":
    sys.exit(main())
