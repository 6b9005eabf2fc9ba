"""Typed configuration: one dataclass per stage, built from flat notebook parameters and YAML files.

How a run is configured, lowest priority first:

1. the field defaults (the debug/demo run: tiny, fast, CPU-friendly);
2. a YAML parameters file (``params/<name>.yaml``): each key a parameter of some stage, flat (``backbone``)
   or for one stage only (``05.backbone``, over the flat value);
3. values given on the runner's command line (``-p key=value``, ``-p 05.key=value``).

The runner merges 2 and 3, picks each stage's values and injects them into the notebook's ``parameters``
cell; the cell after it calls ``<Stage>Config.from_params(globals())``. A user working in Jupyter can instead
set ``params_file`` in the parameters cell: its values then override the cell's own.

Every field is a flat scalar (str, int, float, bool) declared once, with its help, with
:func:`~common.config.base.param`; fields shared by several stages live in :mod:`common.config.fields`,
the stage configs in :mod:`common.config.stages`, and the notebooks' parameters cells are generated from
them (``python -m common.cli.notebooks``). Values derived from parameters are computed in ``__post_init__``
or in functions, never in a parameters cell. Configs are frozen: build a new one with
:func:`dataclasses.replace`, never mutate a shared default.

Modules: ``base`` (``param``, ``StageConfig``), ``fields`` (shared groups), ``stages`` (the six configs),
``params`` (parameters files, per-stage keys, command-line values).
"""

from common.config.base import StageConfig, param
from common.config.fields import FoldConfig, SweepFields, TrainConfig
from common.config.params import (
    NOTEBOOK_ONLY_PARAMS,
    check_key,
    for_stage,
    known_params,
    load_params,
    parse_cli_value,
    split_key,
)
from common.config.pretrain import PretrainConfig
from common.config.stages import (
    STAGE_CONFIGS,
    ClassifierConfig,
    CropConfig,
    EmbedderConfig,
    EnsembleConfig,
    ExtractConfig,
    RetrievalConfig,
)

__all__ = [
    "NOTEBOOK_ONLY_PARAMS", "STAGE_CONFIGS", "ClassifierConfig", "CropConfig", "EmbedderConfig", "EnsembleConfig",
    "ExtractConfig", "FoldConfig", "PretrainConfig", "RetrievalConfig", "StageConfig", "SweepFields", "TrainConfig", "check_key",
    "for_stage", "known_params", "load_params", "param", "parse_cli_value", "split_key",
]
