"""What every benchmark's report shares: the machine line, the CPU model, the date, appending to RESULTS.md.

The benchmarks in ``bench/`` print a markdown section (title, command, date, machine, data, config, table) and,
when asked, append it to ``bench/RESULTS.md``. Other benchmarks append there too, so a section is only ever
appended, never rewritten.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else :func:`platform.processor`, else ``unknown``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def utc_stamp() -> str:
    """The current time as ``YYYY-MM-DD HH:MM UTC``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def torch_machine_line(device: str, load: float) -> str:
    """``nproc N, <cpu>, torch <version> on <device> (T threads), load average at start L (...)``.

    Args:
        device: the device type the benchmark ran on (``cpu``, ``cuda``).
        load: the 1-minute load average taken when the benchmark started.
    """
    import torch

    return (f"nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, torch {torch.__version__} on {device} "
            f"({torch.get_num_threads()} threads), load average at start {load:.2f} "
            "(shared machine: times are indicative)")


def append_section(results: str | os.PathLike, text: str) -> Path:
    """Append ``text`` (a markdown section) to ``results``, creating its folder; return the path.

    Args:
        results: usually ``bench/RESULTS.md``.
        text: the section, starting with an empty line and ending with a newline.
    """
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as fh:  # other benchmarks append here too: never rewrite
        fh.write(text)
    return results
