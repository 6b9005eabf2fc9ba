"""Every parameter checked when its config is built: ranges and cross-field rules (common.config.checks)."""

from __future__ import annotations

import pytest

from common.config import STAGE_CONFIGS, ClassifierConfig, CropConfig, EmbedderConfig, RetrievalConfig, checks


@pytest.mark.parametrize(("cls", "values", "message"), [
    (EmbedderConfig, {"epochs": -1}, "epochs=-1: must be >= 0"),
    (EmbedderConfig, {"lr": -1}, "lr=-1.0: must be > 0"),
    (EmbedderConfig, {"lr": float("nan")}, "lr=nan: must be > 0"),
    (EmbedderConfig, {"image_size": 0}, "image_size=0: must be >= 32"),
    (EmbedderConfig, {"batch_size": 0}, "batch_size=0: must be >= 1"),
    (EmbedderConfig, {"dropout": 1.0}, r"dropout=1.0: must be in \[0, 1\)"),
    (EmbedderConfig, {"n_folds": 1}, "n_folds=1: must be >= 2"),
    (EmbedderConfig, {"folds": "0,5", "n_folds": 5}, r"folds='0,5': each fold must be in 0..4"),
    (CropConfig, {"detector_epochs": 0}, "detector_epochs=0: must be >= 1"),
    (CropConfig, {"detector_val_fraction": 1.0}, r"detector_val_fraction=1.0: must be in \(0, 1\)"),
    (CropConfig, {"box_conf": 1.5}, r"box_conf=1.5: must be in \[0, 1\]"),
    (CropConfig, {"seed": -3}, "seed=-3: must be >= 0"),
    (RetrievalConfig, {"knn_k": 0}, "knn_k=0: must be >= 1"),
    (RetrievalConfig, {"threshold_step": 0}, "threshold_step=0.0: must be > 0"),
    (RetrievalConfig, {"threshold_min": 0.6, "threshold_max": 0.4},
     "threshold_min=0.6, threshold_max=0.4: need threshold_min < threshold_max"),
    (RetrievalConfig, {"threshold_min": 0.5, "threshold_max": 0.5}, "need threshold_min < threshold_max"),
    (RetrievalConfig, {"threshold_min": 0.0, "threshold_max": 0.1, "threshold_step": 0.5},
     "need threshold_step <= threshold_max - threshold_min"),
    (RetrievalConfig, {"oof_new_share": 1.0}, r"oof_new_share=1.0: must be in \[0, 1\)"),
    (ClassifierConfig, {"mix_prob": -0.1}, r"mix_prob=-0.1: must be in \[0, 1\]"),
    (ClassifierConfig, {"distill_temperature": 0}, "distill_temperature=0.0: must be > 0"),
])
def test_bad_values_are_refused_naming_parameter_value_and_range(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls(**values)


def test_defaults_and_shipped_parameter_files_pass():
    import yaml

    from common.core.paths import project_root

    for cls in STAGE_CONFIGS.values():
        cls()
    for path in sorted((project_root() / "params").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        for cls in STAGE_CONFIGS.values():
            cls(**{k: v for k, v in values.items() if k in cls.field_names()})


def test_every_rule_names_a_real_parameter():
    fields = {f for cls in STAGE_CONFIGS.values() for f in cls.field_names()}
    assert set(checks.RULES) <= fields
    assert {n for names, _, _ in checks.CROSS for n in names} <= fields


def test_range_text_and_bounds():
    assert str(checks.Range(0, 1, hi_open=True)) == "in [0, 1)" and str(checks.POSITIVE) == "> 0"
    assert checks.Range(0, 1, lo_open=True).ok(1.0) and not checks.Range(0, 1, lo_open=True).ok(0.0)
    assert not checks.POSITIVE.ok(float("inf")) and checks.Range(None, 1).ok(-5)
    assert str(checks.Range(None, 1)) == "<= 1"


def test_epochs_zero_stays_allowed_for_the_untrained_baseline():
    assert EmbedderConfig(epochs=0).epochs == 0
