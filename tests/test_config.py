"""common.config: defaults, from_params, YAML files, type coercion, fold lists, validation."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import (
    STAGE_CONFIGS,
    CropConfig,
    EmbedderConfig,
    ExtractConfig,
    FoldConfig,
    RetrievalConfig,
    StageConfig,
    known_params,
    load_params,
    parse_cli_value,
)


def write_yaml(path, text: str):
    path.write_text(text)
    return path


# -- defaults and construction -------------------------------------------------------------------------------
def test_defaults():
    cfg = StageConfig()
    got = (cfg.data, cfg.exp, cfg.seed, cfg.device, cfg.num_workers, cfg.force)
    assert got == ("demo", "demo", 42, "auto", 0, False)
    emb = EmbedderConfig()
    assert (emb.n_folds, emb.folds, emb.epochs, emb.lr, emb.amp) == (5, "0", 6, 1e-3, True)
    assert EmbedderConfig.defaults() == emb.to_dict()
    assert RetrievalConfig().fold_merge == "mean"
    assert [cls.stage for cls in STAGE_CONFIGS.values()] == sorted(STAGE_CONFIGS)  # 01, 02, ... in order
    assert list(STAGE_CONFIGS)[:6] == ["00", "01", "02", "03", "04", "05"]


def test_fingerprint_ignores_force_and_workers():
    a = ExtractConfig(force=True, num_workers=4)
    b = ExtractConfig()
    assert a.fingerprint() == b.fingerprint()
    assert "force" not in a.fingerprint() and "num_workers" not in a.fingerprint()
    assert ExtractConfig(batch_size=8).fingerprint() != b.fingerprint()


def test_frozen():
    cfg = EmbedderConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert dataclasses.replace(cfg, epochs=3).epochs == 3
    assert cfg.epochs == 6  # the original is untouched


def test_from_params_picks_only_fields():
    namespace = {
        "epochs": 2,  # an EmbedderConfig field
        "knn_k": 7,  # a field of stage 04 only: ignored here
        "In": ["notebook history"],  # notebook globals that are not parameters: ignored
        "params_file": "",  # empty: no file
    }
    cfg = EmbedderConfig.from_params(namespace)
    assert cfg.epochs == 2
    assert not hasattr(cfg, "knn_k")
    assert cfg.lr == EmbedderConfig().lr


def test_from_params_file_overrides_namespace(tmp_path):
    f = write_yaml(tmp_path / "p.yaml", "epochs: 4\nknn_k: 9\nlr: 1.0e-2\n")
    ns = {"epochs": 2, "batch_size": 8}
    cfg = EmbedderConfig.from_params({**ns, "params_file": str(f)})  # file named in the namespace
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (4, 8, 0.01)  # file > cell; cell value kept otherwise
    cfg2 = EmbedderConfig.from_params(ns, params_file=str(f))  # file given as argument
    assert cfg2 == cfg
    ret = RetrievalConfig.from_params(ns, params_file=str(f))  # the same file feeds another stage
    assert ret.knn_k == 9


def test_load_params_unknown_key_names_it(tmp_path):
    f = write_yaml(tmp_path / "p.yaml", "epochs: 4\nepoch: 3\n")  # typo
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\]") as err:
        load_params(f)
    assert str(f) in str(err.value)
    with pytest.raises(ValueError, match="epoch"):
        EmbedderConfig.from_params({}, params_file=str(f))


@pytest.mark.parametrize("text", ["epochs: [1, 2]\n", "lr: {a: 1}\n"])
def test_load_params_rejects_nested(tmp_path, text):
    f = write_yaml(tmp_path / "p.yaml", text)
    with pytest.raises(ValueError, match="flat scalars"):
        load_params(f)


def test_load_params_not_a_mapping_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="flat mapping"):
        load_params(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_params(write_yaml(tmp_path / "empty.yaml", "")) == {}
    with pytest.raises(FileNotFoundError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_load_params_relative_to_project_root(tmp_path, monkeypatch):
    (tmp_path / "params").mkdir()
    write_yaml(tmp_path / "params" / "x.yaml", "seed: 7\n")
    monkeypatch.setenv("REID_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path / "params")  # "params/x.yaml" does not exist from here
    assert load_params("params/x.yaml") == {"seed": 7}


def test_known_params():
    names = known_params()
    assert {"params_file", "data", "detector_epochs", "epochs", "tta_flip", "knn_k", "folds"} <= names
    assert "stage" not in names  # a ClassVar, not a parameter


# -- coercion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, given, expected",
    [
        ("epochs", "3", 3),  # int field from a string (papermill/CLI)
        ("epochs", " -3 ", -3),  # sign and spaces
        ("epochs", 3.0, 3),  # integral float
        ("lr", 1, 1.0),  # int -> float
        ("lr", "1e-3", 1e-3),  # PyYAML reads 1e-3 as a string
        ("amp", "true", True),
        ("amp", "No", False),
        ("amp", "1", True),
        ("amp", 0, False),
        ("backbone", 18, "18"),  # number -> str field
        ("folds", 0, "0"),  # YAML `folds: 0`
    ],
)
def test_coercion(field, given, expected):
    value = getattr(EmbedderConfig(**{field: given}), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "field, given",
    [
        ("epochs", "three"),
        ("epochs", "--3"),  # used to escape as a ValueError from int() without the parameter's name
        ("epochs", "²"),  # str.isdigit() is True for it, int() is not
        ("epochs", 2.5),  # not integral
        ("epochs", True),  # bool is not an int here
        ("lr", "fast"),
        ("lr", False),
        ("amp", "maybe"),
        ("amp", 2),
        ("backbone", None),
        ("backbone", True),
    ],
)
def test_coercion_errors_name_the_parameter(field, given):
    with pytest.raises(TypeError, match=f"parameter {field}="):
        EmbedderConfig(**{field: given})


def test_parse_cli_value():
    assert parse_cli_value("3") == 3 and type(parse_cli_value("3")) is int
    assert parse_cli_value("0.5") == 0.5
    assert parse_cli_value("true") is True
    assert parse_cli_value("abc") == "abc"
    assert parse_cli_value("0,2") == "0,2"
    assert parse_cli_value("") == ""


# -- folds ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "folds, n_folds, expected",
    [
        ("all", 5, [0, 1, 2, 3, 4]),
        ("ALL", 3, [0, 1, 2]),
        ("0", 5, [0]),
        ("0,2", 5, [0, 2]),
        (" 2 , 0 ,2", 5, [0, 2]),  # spaces, order and duplicates do not matter
        ("1,", 2, [1]),  # trailing comma
    ],
)
def test_fold_list(folds, n_folds, expected):
    assert FoldConfig(folds=folds, n_folds=n_folds).fold_list() == expected


@pytest.mark.parametrize("folds", ["5", "-1", "", "a", "0;1", "0.5"])
def test_fold_list_bad(folds):
    with pytest.raises(ValueError, match="folds="):
        FoldConfig(folds=folds, n_folds=5)


def test_n_folds_at_least_two():
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        EmbedderConfig(n_folds=1)
    assert EmbedderConfig(n_folds=2, folds="all").fold_list() == [0, 1]


def test_retrieval_fold_merge():
    assert RetrievalConfig(fold_merge="concat").fold_merge == "concat"
    with pytest.raises(ValueError, match="fold_merge='max'"):
        RetrievalConfig(fold_merge="max")


def test_crop_config_fields():
    cfg = CropConfig(crop="false", box_conf="0.5")
    assert cfg.crop is False and cfg.box_conf == 0.5


def test_embedder_augmentation_fields_are_checked():
    assert EmbedderConfig(rrc_scale_min=0.4, hflip=False).rrc_scale_min == 0.4
    with pytest.raises(ValueError, match="rrc_scale_min=0.0"):
        EmbedderConfig(rrc_scale_min=0.0)


def test_ensemble_members_self_means_this_experiment():
    from common.config import EnsembleConfig

    cfg = EnsembleConfig(exp="run3", members="self, run1", embed_members="self")
    assert cfg.member_list() == ["run3", "run1"]
    assert cfg.member_list("embed_members") == ["run3"]
    assert cfg.member_list("soup_members") == ["run3", "run1"]  # empty: falls back to members
    with pytest.raises(ValueError, match="named twice"):
        EnsembleConfig(exp="run3", members="self,run3").member_list()


def test_training_speed_knobs_do_not_change_the_fingerprint():
    from common.config import ClassifierConfig, EmbedderConfig

    for cls in (EmbedderConfig, ClassifierConfig):
        base = cls().fingerprint()
        assert cls(nproc=2, channels_last=False, compile=True).fingerprint() == base  # speed only
        assert cls(norm_eval=True).fingerprint() != base  # changes what is learned
        assert cls(sync_bn=True).fingerprint() != base
    with pytest.raises(ValueError, match="nproc=0"):
        EmbedderConfig(nproc=0)
