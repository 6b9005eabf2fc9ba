"""Benchmarks of the project on real and synthetic data, run from the repository root as modules.

``python -m bench.<name> --help`` lists a benchmark's options; ``--record`` appends its markdown section to
``bench/RESULTS.md``. Shared parts: :mod:`bench.common_args` (options, the recorded command) and
:mod:`bench._report` (machine line, date, appending).
"""
