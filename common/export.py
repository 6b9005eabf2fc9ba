"""Alias kept so that ``python -m common.export`` works: the code is :mod:`common.cli.export`."""

import sys

from common.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
