"""The library: heads, losses, metrics, retrieval, ANN indexes, ensembles, post-processing, models, plots.

Functions and modules on arrays and tensors; may import :mod:`common.core` and :mod:`common.config`.
"""
