"""What every benchmark's command line shares: output paths, ``--record``, ``-p`` overrides, ``--seeds``.

Each benchmark in ``bench/`` is a module of the ``bench`` package, run from the repository root with
``python -m bench.<name>``. They build their parser with the helpers here so that the same option means the
same thing everywhere, and they write the command that reproduces a run with :func:`command_line`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (benchmarks run from there)."""
SHARED = ROOT.parent / "shared" / "datasets"
"""The shared datasets folder next to the repository."""
RESULTS = ROOT / "bench" / "RESULTS.md"
"""Where ``--record`` appends a section by default."""
PYTHON = "nice -n 10 .venv/bin/python"
"""How a recorded command runs Python (from the repository root)."""


def add_record_args(ap: argparse.ArgumentParser) -> None:
    """Add ``--record`` (append the section to ``--results``) and ``--results`` (default bench/RESULTS.md).

    Args:
        ap: the benchmark's parser.
    """
    ap.add_argument("--record", action="store_true", help="append the section to --results")
    ap.add_argument("--results", type=Path, default=RESULTS, help="default bench/RESULTS.md")


def add_param_arg(ap: argparse.ArgumentParser, help: str) -> None:
    """Add the repeatable ``-p/--param KEY=VALUE`` override, read with :func:`parse_overrides`.

    Args:
        ap: the benchmark's parser.
        help: what the keys may be.
    """
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_overrides(items: list[str], known: set[str] | list[str] | None, what: str, flag: str = "-p"
                    ) -> dict[str, object]:
    """``key=value`` strings -> ``{key: value}``, values read like the pipeline's ``-p`` (YAML scalars).

    Args:
        items: the ``-p`` values.
        known: the keys allowed; ``None``: any key the pipeline's ``-p`` takes, flat or ``<stage>.name``
            (checked by :func:`common.config.check_key`).
        what: names the allowed keys in the error (for example ``a ClassifierConfig field``).
        flag: the option the items came from, for the error (``-p``, ``--pair``).

    Raises:
        SystemExit: naming the flag and item, when it has no ``=`` or an unknown key.
    """
    from common.config import check_key, parse_cli_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or known is not None and key not in known:
            raise SystemExit(f"{flag} {item!r}: expected key=value with key {what}")
        if known is None:
            try:
                check_key(key, f"{flag} {item!r}")
            except ValueError as e:
                raise SystemExit(str(e)) from None
        out[key] = parse_cli_value(value)
    return out


def parse_seeds(text: str | None) -> list[int]:
    """``"42,1, 2"`` -> ``[42, 1, 2]``; an empty or missing string gives ``[]``.

    Args:
        text: comma-separated integers, as given to ``--seeds``.

    Raises:
        SystemExit: naming the item that is not an integer.
    """
    seeds = []
    for item in (text or "").split(","):
        if item.strip():
            try:
                seeds.append(int(item))
            except ValueError:
                raise SystemExit(f"--seeds {text!r}: {item!r} is not an integer") from None
    return seeds


def command_line(name: str, argv: list[str] | None = None, env: str = "HF_HUB_OFFLINE=1 ") -> str:
    """The command that reproduces this run: ``<env>nice -n 10 .venv/bin/python -m bench.<name> <args>``.

    Args:
        name: the benchmark's module name in ``bench`` (``embedder_reid``).
        argv: the arguments given to ``main``; ``None`` reads ``sys.argv[1:]``.
        env: environment assignments written before the command (with a trailing space, or empty).
    """
    args = sys.argv[1:] if argv is None else argv
    return f"{env}{PYTHON} -m bench.{name} {shlex.join(args)}".rstrip()


def finish(args: argparse.Namespace, text: str) -> None:
    """Print the section and, with ``--record``, append it to ``--results``.

    Args:
        args: the parsed arguments (with ``record`` and ``results`` from :func:`add_record_args`).
        text: the markdown section.
    """
    from bench._report import append_section

    print(text)
    if args.record:
        print(f"appended to {append_section(args.results, text)}")


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    """Set environment variable ``name`` to ``value`` for the ``with`` block, then restore (or remove) it.

    Args:
        name: the variable (for example ``REID_WORKING_DIR``, where the project's stages write).
        value: its value inside the block.
    """
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
