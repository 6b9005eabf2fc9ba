"""Alias so that ``python -m common.sweep`` works: the code is :mod:`common.cli.sweep`."""

import sys

from common.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
