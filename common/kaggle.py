"""Alias kept so that ``python -m common.kaggle`` works: the code is :mod:`common.cli.kaggle`."""

import sys

from common.cli.kaggle import main

if __name__ == "__main__":
    sys.exit(main())
