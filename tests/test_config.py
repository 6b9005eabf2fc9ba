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
        ("num_workers", " -1 ", -1),  # sign and spaces
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
    with pytest.raises(ValueError, match="n_folds=1: must be >= 2"):
        EmbedderConfig(n_folds=1)
    assert EmbedderConfig(n_folds=2, folds="all").fold_list() == [0, 1]


def test_retrieval_fold_merge():
    assert RetrievalConfig(fold_merge="concat").fold_merge == "concat"
    with pytest.raises(ValueError, match="fold_merge='max'"):
        RetrievalConfig(fold_merge="max")


def test_crop_config_fields():
    cfg = CropConfig(crop="false", box_conf="0.5")
    assert cfg.crop == "none" and cfg.box_conf == 0.5
    assert CropConfig().crop == "auto"
    assert CropConfig(crop=True).crop == "auto" and CropConfig(crop=False).crop == "none"
    assert CropConfig(crop="CAM").crop == "cam" and CropConfig(crop="detector").crop == "detector"
    with pytest.raises(ValueError, match="crop='yes please'"):
        CropConfig(crop="yes please")
    with pytest.raises(ValueError, match="cam_threshold=1.5"):
        CropConfig(cam_threshold=1.5)


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


# -- fields declared once, tagged where declared ----------------------------------------------------------------
# The tuples the engine listed by hand before the fields were tagged (common/engine/*.py, commit 79b5cbe).
OLD_EMBEDDER_MODEL_FIELDS = (
    "backbone", "pretrained", "image_size", "embedding_dim", "epochs", "batch_size", "lr", "head_lr_mult",
    "weight_decay", "warmup_epochs", "gem_p", "dropout", "arc_s", "arc_m", "arc_easy_margin", "arc_k",
    "dynamic_margin", "margin_a", "margin_p", "margin_b", "species_weight", "label_smoothing", "rrc_scale_min",
    "hflip", "use_crops", "max_images", "seed", "n_folds", "sync_bn", "norm_eval",
)
OLD_CLASSIFIER_MODEL_FIELDS = (
    "label_column", "backbone", "pretrained", "image_size", "epochs", "batch_size", "optimizer", "lr",
    "head_lr_mult", "weight_decay", "warmup_epochs", "dropout", "head", "arc_s", "arc_m", "arc_k",
    "dynamic_margin", "margin_a", "margin_p", "margin_b", "loss", "label_smoothing", "focal_gamma", "eql_tau",
    "la_loss_tau", "sampler", "mixup_alpha", "cutmix_alpha", "mix_prob", "rrc_scale_min", "hflip", "ema_decay",
    "avg_last", "avg_epochs", "distill_from", "distill_mode", "distill_weight", "distill_temperature",
    "use_crops", "max_images", "seed", "n_folds", "sync_bn", "norm_eval",
)


def test_model_fields_are_the_old_hand_written_lists():
    from common.config import ClassifierConfig
    from common.engine import classifier, embedder

    margin_form = ("margin_form", "margin_min", "margin_max")  # added after the hand-written lists (issue 12)
    OLD_EMBEDDER = (*OLD_EMBEDDER_MODEL_FIELDS, *margin_form, "oof_new_share", "freeze_blocks",  # both: issue 12
                    "fold_seed")  # one split across seeds (issue 12's control ensemble)
    OLD_CLASSIFIER = (*OLD_CLASSIFIER_MODEL_FIELDS, *margin_form, "aux_column", "aux_weight", "freeze_blocks",
                      "partial_fc", "probe_init", "probe_l2", "ema_warmup",  # issue 14; LP-FT, EMA warm-up: issue 15
                      "fold_seed")
    for cls, old in ((EmbedderConfig, OLD_EMBEDDER), (ClassifierConfig, OLD_CLASSIFIER)):
        got = cls.model_fields()
        assert len(got) == len(set(got)) and set(got) == set(old), (cls.__name__, set(got) ^ set(old))
    assert set(embedder._MODEL_FIELDS) == set(OLD_EMBEDDER)
    assert set(classifier._MODEL_FIELDS) == set(OLD_CLASSIFIER)
    assert "amp" not in EmbedderConfig.model_fields() and "tta_flip" not in ClassifierConfig.model_fields()


def test_shared_training_fields_are_declared_once():
    from common.config import ClassifierConfig, EnsembleConfig, SweepFields, TrainConfig

    shared = set(TrainConfig.field_names()) - set(FoldConfig.field_names())
    # the 23 fields stages 02 and 05 had each, 3 margin-form ones, 10 process/speed/multi-node ones (validate_every
    # and amp_cpu among them), freeze_blocks
    assert len(shared) == 37
    for cls in (EmbedderConfig, ClassifierConfig, RetrievalConfig, EnsembleConfig):
        own = set(vars(cls)["__annotations__"]) - {"stage"}
        redeclared = own & (set(TrainConfig.field_names()) | set(SweepFields.__dataclass_fields__))
        if cls is EmbedderConfig:  # the one shared name: stage 02 leaves that share out of training, 04 out of the gallery
            redeclared -= {"oof_new_share"}
        assert not redeclared, f"{cls.__name__} declares {redeclared} again"
    assert EmbedderConfig.defaults()["backbone"] == ClassifierConfig.defaults()["backbone"]
    assert EmbedderConfig.field_docs()["lr"] == ClassifierConfig.field_docs()["lr"]
    assert set(SweepFields.__dataclass_fields__) <= set(RetrievalConfig.field_names()) & set(
        EnsembleConfig.field_names())


def test_every_field_has_a_help_line():
    for stage, cls in STAGE_CONFIGS.items():
        for name, doc in cls.field_docs().items():
            assert doc and "\n" not in doc and "  " not in doc, (stage, name, doc)
            assert f"\n        {name}: {doc}\n" in cls.__doc__, (stage, name)  # help(cls) lists it


@pytest.mark.parametrize("stage, field, bad, choices", [
    ("04", "fold_merge", "max", ("mean", "concat")),
    ("05", "optimizer", "sgd", ("adamw", "radam")),
    ("05", "head", "mlp", ("linear", "arcface", "subcenter")),
    ("06", "soup", "best", ("none", "uniform", "greedy")),
    ("06", "blend_on", "logit", ("prob", "cosine")),
])
def test_choices_declared_with_the_field_are_checked(stage, field, bad, choices):
    cls = STAGE_CONFIGS[stage]
    assert dataclasses.fields(cls)[cls.field_names().index(field)].metadata["choices"] == choices
    with pytest.raises(ValueError, match=f"{field}='{bad}': use one of {list(choices)}".replace("[", r"\[")):
        cls(**{field: bad})


# -- per-stage parameters ----------------------------------------------------------------------------------------
def test_split_key_and_for_stage():
    from common.config import for_stage, split_key

    assert split_key("05.backbone") == ("05", "backbone") and split_key("lr") == (None, "lr")
    params = {"backbone": "a", "05.backbone": "b", "02.lr": 0.5, "knn_k": 3, "04.knn_k": 4}
    assert for_stage("02", params) == {"backbone": "a", "lr": 0.5}
    assert for_stage("05", params) == {"backbone": "b"}
    assert for_stage("04", params) == {"knn_k": 4}
    assert for_stage("06", params) == {"knn_k": 3}
    assert for_stage("01", params) == {}


def test_load_params_per_stage_keys(tmp_path):
    f = write_yaml(tmp_path / "p.yaml", "backbone: resnet18\n02.backbone: resnet34\n05.lr: 0.1\n")
    assert load_params(f) == {"backbone": "resnet18", "02.backbone": "resnet34", "05.lr": 0.1}
    ns = {"params_file": str(f)}
    from common.config import ClassifierConfig

    assert (EmbedderConfig.from_params(ns).backbone, EmbedderConfig.from_params(ns).lr) == ("resnet34", 1e-3)
    assert (ClassifierConfig.from_params(ns).backbone, ClassifierConfig.from_params(ns).lr) == ("resnet18", 0.1)


@pytest.mark.parametrize("text, match", [
    ("07.backbone: x\n", "'07.backbone' names unknown stage '07'"),
    ("2.backbone: x\n", "unknown stage '2'"),
    ("04.backbone: x\n", "stage 04 has no parameter 'backbone'"),
    ("02.epoch: 3\n", "stage 02 has no parameter 'epoch'"),
    ("02.exp: x\n", "exp is one for the whole run"),
    ("02.params_file: x\n", "stage 02 has no parameter 'params_file'"),
])
def test_load_params_rejects_bad_per_stage_keys(tmp_path, text, match):
    f = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match=match) as err:
        load_params(f)
    assert str(f) in str(err.value)  # names the file
