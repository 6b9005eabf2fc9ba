"""Alias so that ``python -m common.batch`` works: the code is :mod:`common.cli.batch`."""

import sys

from common.cli.batch import main

if __name__ == "__main__":
    sys.exit(main())
