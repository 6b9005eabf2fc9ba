"""Alias so that ``python -m common.report`` works: the code is :mod:`common.cli.report`."""

import sys

from common.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
