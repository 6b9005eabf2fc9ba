"""Infrastructure: where files live, how they are written, the device, checkpoints, weights, DDP primitives.

Imports nothing else of ``common``: every other layer may use it.
"""
