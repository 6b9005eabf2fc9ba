"""Shared package of the re-identification notebook suite, in layers that its folders show.

Lowest first; a module imports its own layer or the ones before it, never a later one
(``tests/test_layers.py`` checks every import, lazy ones included, and that there is no cycle):

* :mod:`common.core` - paths, the atomic file store, runtime (device, seeds, AMP, progress), fold checkpoints,
  pretrained weights, DDP primitives;
* :mod:`common.config` - one typed config per stage, from flat notebook parameters and YAML files;
* :mod:`common.lib` - heads, losses, metrics, retrieval and ANN indexes, ensembles, post-processing, models,
  CutMix/Mixup, samplers, weight averaging, box maths, plots;
* :mod:`common.data` - the competition tables and their checks, folds, datasets and transforms, the demo
  generator, detector datasets and crops, and the artefacts one stage leaves for the next;
* :mod:`common.engine` - the training loops (embedder, classifier), the detector wrapper, one prediction
  loop with flip TTA, torchrun launching, throughput;
* :mod:`common.stages` - one module per notebook, named after it;
* :mod:`common.cli` - the papermill runner, the torchrun entry point, the Kaggle bundle, export.

``docs/architecture.md`` is the map, with the data flow between stages.
"""

import os

# albumentations otherwise asks PyPI for a newer version at every import (about 2 s, or a hang offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
