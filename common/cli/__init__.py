"""Command-line entry points: the runner, the torchrun entry, the Kaggle bundle, export."""
