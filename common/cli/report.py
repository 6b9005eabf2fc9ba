"""Compare the experiments of ``working/``: changed parameters, key metrics, time; a table and an HTML page.

Usage::

    python -m common.report                       # prints the table, writes working/report.html
    python -m common.report --match sweep --out /tmp/sweep.html

An experiment is a folder of ``working/`` with a ``params.json`` (the runner writes it after each stage that
succeeds) or a failed notebook record (``<notebook>.failed.ipynb``, whose parameters stand in). Its row holds the
parameters that differ from the stage defaults (:data:`common.config.STAGE_CONFIGS`), the scores of its
``metrics.json``, its status (``ok``, ``failed`` when an executed notebook holds an exception, ``pruned`` by a
sweep) and its time (papermill's durations of the executed notebooks). The HTML page is self-contained (no
external JS or CSS): click a column header to sort, and each experiment's training curves (its ``log.csv``
files) are drawn as inline SVG. In a notebook, :func:`report_table` returns the same table as a DataFrame.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from common.config import STAGE_CONFIGS
from common.core import paths, store, tracking

KEY_METRICS = ("oof_map5", "map5", "map5_known", "map5_new", "classifier.oof_accuracy",
               "classifier.oof_balanced_accuracy", "classifier.test_accuracy", "ensemble.oof_accuracy",
               "ensemble.retrieval_map5")
CURVE_STAGES = ("02", "05")
CURVE_COLUMNS = ("valid_acc", "train_loss")
IGNORED = ("exp", "force", "num_workers", "device")  # not results-changing, or named by the row itself


def stage_defaults() -> dict[str, set[str]]:
    """Every parameter's default value(s) across the stage configs, as lower-case strings."""
    out: dict[str, set[str]] = {}
    for cls in STAGE_CONFIGS.values():
        for key, value in cls.defaults().items():
            out.setdefault(key, set()).add(str(value).lower())
    return out


def changed_params(params: dict[str, Any], defaults: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """The parameters whose value is not a stage default (``"0"`` and ``0`` compare equal, as the configs coerce)."""
    defaults = defaults if defaults is not None else stage_defaults()
    return {k: v for k, v in sorted(params.items())
            if k not in IGNORED and str(v).lower() not in defaults.get(k, set())}


def records(exp_path: Path) -> list[dict[str, Any]]:
    """Papermill metadata of each executed notebook of an experiment (stage, seconds, exception, end time)."""
    out = []
    for record in sorted(exp_path.glob("[0-9][0-9]_*.ipynb")):
        try:
            meta = json.loads(record.read_text())["metadata"].get("papermill", {})
        except (OSError, ValueError, KeyError):
            continue
        out.append({"stage": record.name[:2], "notebook": record.name, "seconds": meta.get("duration"),
                    "exception": bool(meta.get("exception")), "end_time": meta.get("end_time")})
    return out


def run_params(exp_path: Path) -> dict[str, Any]:
    """The experiment's merged parameters: ``params.json``, else (a run whose first stage failed writes none) the
    parameters papermill injected into its failed notebook record."""
    if (exp_path / "params.json").is_file():
        return store.read_json(exp_path / "params.json")
    for record in sorted(exp_path.glob("*.failed.ipynb")):
        try:
            return dict(json.loads(record.read_text())["metadata"]["papermill"]["parameters"])
        except (OSError, ValueError, KeyError):
            continue
    return {}


def experiment_row(exp_path: Path, defaults: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """One experiment's row of the table."""
    params = run_params(exp_path)
    recs = records(exp_path)
    metrics_file = exp_path / "metrics.json"
    flat = tracking.flatten(store.read_json(metrics_file)) if metrics_file.exists() else {}
    failed = [r["notebook"] for r in recs if r["exception"]]
    status = "pruned" if (exp_path / tracking.PRUNED_MARKER).exists() else "failed" if failed else "ok"
    seconds = [r["seconds"] for r in recs if isinstance(r["seconds"], int | float)]
    changed = changed_params(params, defaults)
    row: dict[str, Any] = {
        "experiment": exp_path.name,
        "stages": ",".join(r["stage"] for r in recs),
        "status": f"failed ({failed[0]})" if status == "failed" else status,
        "changed": ", ".join(f"{k}={v}" for k, v in changed.items()),
    }
    row.update({k: flat[k] for k in KEY_METRICS if k in flat})
    row["minutes"] = round(sum(seconds) / 60, 2) if seconds else float("nan")
    ends = [r["end_time"] for r in recs if r["end_time"]]
    row["finished"] = max(ends)[:19].replace("T", " ") if ends else ""
    return row


def experiment_dirs(working: Path | None = None, match: str = "") -> list[Path]:
    """Folders of ``working/`` that hold a ``params.json``, whose name contains ``match``."""
    root = Path(working) if working else paths.working_dir()
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and match in p.name and ((p / "params.json").is_file() or any(p.glob("*.failed.ipynb"))))


def report_table(working: Path | None = None, match: str = "") -> pd.DataFrame:
    """The comparison table, one row per experiment (index: its name), metrics in a fixed column order.

    Args:
        working: the working folder (default :func:`common.core.paths.working_dir`).
        match: keep experiments whose name contains this text.
    """
    defaults = stage_defaults()
    rows = [experiment_row(p, defaults) for p in experiment_dirs(working, match)]
    columns = ["experiment", "stages", "status", "changed", *KEY_METRICS, "minutes", "finished"]
    df = pd.DataFrame(rows, columns=[c for c in columns if any(c in r for r in rows)] or columns)
    return df.set_index("experiment")


# -- HTML --------------------------------------------------------------------------------------------------
def svg_curves(logs: dict[str, pd.DataFrame], column: str, width: int = 320, height: int = 160) -> str:
    """An inline SVG line chart of ``column`` against ``epoch``, one line per log (e.g. per fold)."""
    series = {k: v[["epoch", column]].dropna() for k, v in logs.items() if column in v and "epoch" in v}
    series = {k: v for k, v in series.items() if len(v)}
    if not series:
        return ""
    xs = pd.concat([s["epoch"] for s in series.values()])
    ys = pd.concat([s[column] for s in series.values()]).astype(float)
    ys = ys[ys.map(math.isfinite)]
    if ys.empty:
        return ""
    x0, x1, y0, y1 = xs.min(), max(xs.max(), xs.min() + 1), ys.min(), ys.max()
    y1 = y1 if y1 > y0 else y0 + 1e-9
    pad, colours = 30, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")

    def xy(e: float, v: float) -> str:
        return (f"{pad + (e - x0) / (x1 - x0) * (width - 2 * pad):.1f},"
                f"{height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad):.1f}")

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curve">',
             f'<text x="{pad}" y="14" font-size="12">{html.escape(column)}</text>',
             f'<text x="2" y="{pad + 4}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{height - pad}" font-size="10">{y0:.3g}</text>',
             f'<text x="{width - pad}" y="{height - 8}" font-size="10">epoch {x1:g}</text>',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" '
             'stroke="#ccc"/>']
    for i, (name, s) in enumerate(series.items()):
        pts = " ".join(xy(e, v) for e, v in zip(s["epoch"], s[column].astype(float), strict=True)
                       if math.isfinite(v))
        c = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}">'
                     f"<title>{html.escape(name)}</title></polyline>")
        parts.append(f'<text x="{width - pad + 2}" y="{pad + 12 * (i + 1)}" font-size="9" fill="{c}">'
                     f"{html.escape(name)}</text>")
    return "".join(parts) + "</svg>"


SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].textContent, y = b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""
CSS = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
       "th,td{border:1px solid #ddd;padding:3px 6px}th{cursor:pointer;background:#f4f4f4}"
       "td.num{text-align:right}.curve{margin:2px 8px 2px 0}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return '<td class="num"></td>' if math.isnan(value) else f'<td class="num">{value:.4f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def render_html(df: pd.DataFrame, working: Path | None = None) -> str:
    """The self-contained HTML page: the sortable table, then each experiment's curves."""
    root = Path(working) if working else paths.working_dir()
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [df.index.name, *df.columns])
    body = "".join("<tr>" + _cell(name) + "".join(_cell(v) for v in row) + "</tr>"
                   for name, row in zip(df.index, df.itertuples(index=False), strict=True))
    sections = []
    for name in df.index:
        charts = []
        for stage in CURVE_STAGES:
            folder = root / name / paths.STAGES[stage]
            logs = {str(f.parent.relative_to(folder)): pd.read_csv(f) for f in sorted(folder.rglob("log.csv"))} \
                if folder.exists() else {}
            charts += [svg_curves(logs, col) for col in CURVE_COLUMNS if logs]
        charts = [c for c in charts if c]
        if charts:
            sections.append(f'<h3 id="{html.escape(name)}">{html.escape(name)}</h3><div>{"".join(charts)}</div>')
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Experiments</title>"
            f"<style>{CSS}</style></head><body><h1>Experiments in {html.escape(str(root))}</h1>"
            f"<p>{len(df)} experiments; click a header to sort.</p>"
            f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<h2>Training curves</h2>{''.join(sections) or '<p>no log.csv files</p>'}"
            f"<script>{SORT_JS}</script></body></html>")


def write_report(out: Path | None = None, working: Path | None = None, match: str = "") -> Path:
    """Write the HTML page (default ``working/report.html``); returns its path."""
    df = report_table(working, match)
    out = Path(out) if out else (Path(working) if working else paths.working_dir()) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(out) as tmp:
        Path(tmp).write_text(render_html(df, working))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.cli.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--working", default="", help="working folder (default: the project's working/)")
    parser.add_argument("--match", default="", help="only experiments whose name contains this text")
    parser.add_argument("--out", default="", help="HTML file (default working/report.html)")
    args = parser.parse_args(argv)
    working = Path(args.working) if args.working else None
    df = report_table(working, args.match)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(df.to_string() if len(df) else "no experiments (folders with params.json) found")
    out = write_report(Path(args.out) if args.out else None, working, args.match)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
