"""Alias kept so that ``python -m common.pipeline`` works: the code is :mod:`common.cli.pipeline`."""

import sys

from common.cli.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
