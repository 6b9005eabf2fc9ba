"""Batches: run many runner experiments as a queue, one per GPU (or N at a time on CPU), or as Slurm jobs.

Usage::

    python -m common.batch --params params/debug.yaml --stages 02-04 --grid lr=1e-3,3e-4 --grid epochs=1,2 \\
        --devices 0,1,2,3
    python -m common.batch --params params/a.yaml --params params/b.yaml -p epochs=5 --workers 2
    python -m common.batch --params params/gpu.yaml --grid lr=1e-3,3e-4 --slurm --partition gpu --gpus 1

Each experiment is an ordinary runner call (``python -m common.pipeline ...``) in a subprocess, its output in
``working/<exp>/batch.log``, its notebook records in ``working/<exp>/`` as usual. Experiment names are derived
from the parameters file's name and the grid values (``debug-lr0.001-epochs2``). A killed batch, started
again, resumes: the runner skips every stage that finished with the same parameters. The summary (printed and
written to ``working/batches/<name>.json``) says which experiments ran, failed (naming the executed notebook
that holds the traceback) or were skipped (everything had finished before).

With ``--slurm`` each experiment becomes a Slurm job through submitit
(https://github.com/facebookincubator/submitit) instead of a local subprocess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.cli.pipeline import parse_stages, summary_line
from common.config import known_params, parse_cli_value
from common.core import paths, store

SKIPPED_LINE = "finished earlier with the same parameters, skipped"
ATTEMPT = "### run: "  # starts each attempt's part of a log (a resumed batch appends to it)


@dataclass
class Experiment:
    """One runner call of a batch.

    Args:
        name: experiment name (``working/<name>``).
        params_file: the parameters file, or ``""``.
        overrides: ``key=value`` pairs given to the runner with ``-p`` (shared sets, then the grid's values).
    """

    name: str
    params_file: str = ""
    overrides: list[str] = field(default_factory=list)

    def command(self, stages: str, track: bool = True) -> list[str]:
        """The runner's command line for this experiment."""
        cmd = [sys.executable, "-m", "common.cli.pipeline", "--exp", self.name, "--stages", stages, "--quiet"]
        if self.params_file:
            cmd += ["--params", self.params_file]
        for item in self.overrides:
            cmd += ["-p", item]
        return cmd + ([] if track else ["--no-track"])


def parse_grid(grid: list[str]) -> list[dict[str, Any]]:
    """``["lr=1e-3,3e-4", "epochs=1,2"]`` -> the 4 combinations, first key varying slowest; unknown keys raise."""
    axes: list[tuple[str, list[Any]]] = []
    for item in grid:
        if "=" not in item:
            raise ValueError(f"--grid {item!r}: expected key=v1,v2,...")
        key, values = (s.strip() for s in item.split("=", 1))
        if key not in known_params():
            raise ValueError(f"--grid {key}: unknown parameter; known: {sorted(known_params())}")
        parsed = [_number(parse_cli_value(v.strip())) for v in values.split(",") if v.strip()]
        if not parsed:
            raise ValueError(f"--grid {item!r}: no values")
        axes.append((key, parsed))
    return [dict(zip([k for k, _ in axes], combo, strict=True))
            for combo in itertools.product(*[v for _, v in axes])]


def _number(value: Any) -> Any:
    """``"1e-3"`` (YAML reads it as text) -> ``0.001``, so that the experiment's name reads ``lr0.001``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def exp_name(base: str, values: dict[str, Any]) -> str:
    """``exp_name("debug", {"lr": 0.001, "epochs": 2})`` -> ``"debug-lr0.001-epochs2"`` (a valid folder name)."""
    parts = [base] + [f"{k}{v}" for k, v in values.items()]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return paths.check_exp_name(name)


def plan(params_files: list[str], grid: list[str], shared: list[str], base: str = "") -> list[Experiment]:
    """The batch's experiments: every parameters file (or none) times every grid combination.

    Args:
        params_files: parameters files; each names its experiments after its stem unless ``base`` is given.
        grid: ``key=v1,v2`` axes (see :func:`parse_grid`).
        shared: ``key=value`` pairs given to every experiment (before the grid's values, which win).
        base: name prefix; default the file's stem, else ``batch``.
    """
    for item in shared:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in known_params():
            raise ValueError(f"-p {item!r}: expected key=value with a known parameter")
    combos = parse_grid(grid) if grid else [{}]
    files = params_files or [""]
    if base == "" and len(files) > 1 and len({Path(f).stem for f in files}) < len(files):
        raise ValueError(f"--params {files}: two files share a name; give --name")
    out = []
    for file in files:
        stem = base or (Path(file).stem if file else "batch")
        if base and len(files) > 1:
            stem = f"{base}-{Path(file).stem}"
        for values in combos:
            over = list(shared) + [f"{k}={v}" for k, v in values.items()]
            out.append(Experiment(exp_name(stem, values), file, over))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"the batch names two experiments alike: {names}")
    return out


def failed_notebook(exp: str) -> str:
    """The executed notebook under ``working/<exp>/`` whose papermill record holds an exception (the runner keeps a
    failed stage's record as ``<notebook>.failed.ipynb``), or ``""``."""
    for record in sorted(paths.exp_dir(exp).glob("*.ipynb")):
        try:
            meta = json.loads(record.read_text())["metadata"].get("papermill", {})
        except (OSError, ValueError, KeyError):
            continue
        if meta.get("exception"):
            return str(record)
    return ""


def run_command(cmd: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log``; returns the exit code (also what a Slurm job runs)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"{ATTEMPT}{' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(env)).returncode


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this ``common`` importable from any folder."""
    env = {**os.environ, **(extra or {})}
    package_parent = str(Path(__file__).resolve().parents[2])  # <root>/common/cli/batch.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    return env


def outcome(exp: Experiment, rc: int, seconds: float, n_stages: int) -> dict[str, Any]:
    """One summary row: status ``ran`` / ``skipped`` / ``failed``, the log, the failing notebook, the scores."""
    log = paths.exp_dir(exp.name) / "batch.log"
    text = log.read_text() if log.exists() else ""
    last = text[text.rfind(ATTEMPT):]  # this attempt only (the log is appended to on resume)
    row: dict[str, Any] = {"exp": exp.name, "rc": rc, "seconds": round(seconds, 1), "log": str(log)}
    if rc != 0:
        row["status"] = "failed"
        row["notebook"] = failed_notebook(exp.name)
        errors = [ln for ln in last.splitlines() if ln.startswith("error")]
        row["error"] = errors[0][:300] if errors else f"exit code {rc}"
    else:
        row["status"] = "skipped" if last.count(SKIPPED_LINE) >= n_stages else "ran"
        metrics_file = paths.exp_dir(exp.name) / "metrics.json"
        if metrics_file.exists():
            row["summary"] = summary_line(exp.name, store.read_json(metrics_file))
    return row


def run_local(experiments: list[Experiment], stages: str, devices: list[str], workers: int,
              batch: str = "", track: bool = True) -> list[dict[str, Any]]:
    """Run the experiments as a queue: one per device in ``devices`` at a time, else ``workers`` at a time.

    Args:
        experiments: from :func:`plan`.
        stages: the runner's ``--stages``.
        devices: CUDA device ids; each subprocess sees only its own (``CUDA_VISIBLE_DEVICES``). Empty: CPU.
        workers: experiments at a time when ``devices`` is empty.
        batch: MLflow experiment that groups the runs (``REID_TRACK_EXPERIMENT``); empty: each its own.
        track: log to MLflow.
    """
    slots: queue.Queue = queue.Queue()
    for slot in devices or [None] * max(1, workers):
        slots.put(slot)
    n_stages = len(parse_stages(stages))
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def one(exp: Experiment) -> None:
        slot = slots.get()
        try:
            env = {"REID_TRACK_EXPERIMENT": batch} if batch else {}
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            where = f"device {slot}" if slot is not None else "cpu"
            print(f"start {exp.name} ({where})", flush=True)
            t0 = time.perf_counter()
            try:
                rc = run_command(exp.command(stages, track), str(paths.exp_dir(exp.name) / "batch.log"), env)
                row = outcome(exp, rc, time.perf_counter() - t0, n_stages)
            except Exception as err:  # noqa: BLE001 - one experiment's trouble must not stop the queue
                row = {"exp": exp.name, "rc": -1, "seconds": round(time.perf_counter() - t0, 1),
                       "status": "failed", "notebook": "", "error": f"{type(err).__name__}: {err}"}
            print(f"{row['status']:<7} {exp.name} in {row['seconds']:.0f} s", flush=True)
            with lock:
                results[exp.name] = row
        finally:
            slots.put(slot)

    threads = [threading.Thread(target=one, args=(e,)) for e in experiments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[e.name] for e in experiments]


def submit_slurm(experiments: list[Experiment], stages: str, folder: Path, partition: str = "", gpus: int = 1,
                 time_min: int = 240, mem_gb: int = 32, cpus: int = 8, track: bool = True,
                 batch: str = "", executor: Any = None) -> list[dict[str, Any]]:
    """Submit each experiment as a Slurm job with submitit; returns one row per job (its id, not its result).

    Args:
        experiments: from :func:`plan`.
        stages: the runner's ``--stages``.
        folder: submitit's folder for job scripts and logs.
        partition: Slurm partition (``""``: the cluster's default).
        gpus: GPUs per job. time_min: time limit in minutes. mem_gb: memory per job. cpus: CPUs per task.
        track: log to MLflow. batch: MLflow experiment grouping the runs.
        executor: a submitit executor to use instead of ``submitit.AutoExecutor(folder)`` (tests).
    """
    import submitit

    ex = executor if executor is not None else submitit.AutoExecutor(folder=str(folder))
    extra = {"slurm_partition": partition} if partition else {}
    ex.update_parameters(timeout_min=time_min, mem_gb=mem_gb, gpus_per_node=gpus, cpus_per_task=cpus,
                         tasks_per_node=1, nodes=1, **extra)
    env = {"REID_TRACK_EXPERIMENT": batch} if batch else {}
    rows = []
    for exp in experiments:
        ex.update_parameters(name=exp.name)  # the Slurm job's name: squeue shows the experiment
        log = str(paths.exp_dir(exp.name) / "batch.log")
        job = ex.submit(run_command, exp.command(stages, track), log, env)
        rows.append({"exp": exp.name, "status": "submitted", "job_id": str(job.job_id), "log": log})
        print(f"submitted {exp.name}: job {job.job_id}", flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The summary: one line per experiment, then the failing notebooks and the scores."""
    for row in rows:
        note = row.get("notebook") or row.get("error") or row.get("job_id", "")
        if row["status"] == "failed" and row.get("notebook"):
            note = f"failed notebook: {row['notebook']} ({row.get('error', '')})"
        print(f"{row['status']:<9} {row['exp']:<40} {row.get('seconds', ''):>8}  {note}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ran", "skipped", "failed", "submitted")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for row in rows:
        if row.get("summary"):
            print(row["summary"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", action="append", default=[], help="parameters file (repeatable)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid axis (repeatable)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter shared by every experiment (repeatable)")
    parser.add_argument("--stages", default="01-04", help="the runner's --stages")
    parser.add_argument("--name", default="", help="batch name and experiment prefix (default: the file's name)")
    parser.add_argument("--devices", default="", help="CUDA devices, one experiment per device: 0,1,2,3")
    parser.add_argument("--workers", type=int, default=1, help="experiments at a time without --devices")
    parser.add_argument("--no-track", dest="track", action="store_false", help="do not log to MLflow")
    parser.add_argument("--dry-run", action="store_true", help="print the runner commands and stop")
    slurm = parser.add_argument_group("Slurm (submitit)")
    slurm.add_argument("--slurm", action="store_true", help="submit each experiment as a Slurm job")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per job")
    slurm.add_argument("--time", type=int, default=240, help="time limit per job, minutes")
    slurm.add_argument("--mem", type=int, default=32, help="memory per job, GB")
    slurm.add_argument("--cpus", type=int, default=8, help="CPUs per job")
    args = parser.parse_args(argv)
    try:
        experiments = plan(args.params, args.grid, args.param, args.name)
        parse_stages(args.stages)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = paths.check_exp_name(args.name or (Path(args.params[0]).stem if args.params else "batch"))
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.dry_run:
        for exp in experiments:
            print(" ".join(exp.command(args.stages, args.track)))
        return 0
    t0 = time.perf_counter()
    if args.slurm:
        rows = submit_slurm(experiments, args.stages, paths.working_dir() / "batches" / name / "slurm",
                            args.partition, args.gpus, args.time, args.mem, args.cpus, args.track, name)
    else:
        rows = run_local(experiments, args.stages, devices, args.workers, name, args.track)
    summary = {"batch": name, "stages": args.stages, "seconds": round(time.perf_counter() - t0, 1),
               "experiments": [asdict(e) for e in experiments], "results": rows}
    out = store.write_json(paths.working_dir() / "batches" / f"{name}.json", summary)
    print_table(rows)
    print(f"summary: {out}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
