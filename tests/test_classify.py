"""Stage 05 (common.stages.train_classifier, common.engine.classifier): config checks, label tables, the model, kill-and-resume with every stateful trick
on, checkpoint averaging end to end, post-hoc adjustment, flip TTA, distillation checks and the written arrays.

Training runs use a randomly initialised ``mobilenetv3_small_050`` at 32 px on the tiny generated demo
(21 train images, 8 classes, 2 folds): about a second per run on a CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from common.config import ClassifierConfig
from common.core import store
from common.data import artefacts
from common.data.competition import DataError
from common.engine import classifier as classify_train
from common.engine import fit as engine
from common.lib.losses import class_prior
from common.lib.models import ClassifierModel
from common.stages import train_classifier as classify


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


pytestmark = pytest.mark.usefixtures("isolated")


def tiny_cfg(comp, **overrides) -> ClassifierConfig:
    values = dict(data=str(comp.root), exp="c", backbone="mobilenetv3_small_050", pretrained="none",
                  image_size=32, epochs=2, batch_size=4, n_folds=2, folds="0", device="cpu",
                  warmup_epochs=0.5, amp=False, use_crops=False)
    return ClassifierConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad, match", [
    (dict(head="cosine"), "head='cosine'"),
    (dict(loss="bce"), "loss='bce'"),
    (dict(sampler="oversample"), "sampler="),
    (dict(optimizer="sgd"), "optimizer="),
    (dict(head="subcenter", arc_k=1), "arc_k >= 2"),
    (dict(avg_last=7, epochs=6), "avg_last=7"),
    (dict(avg_epochs="2,9", epochs=6), r"\[9\] not in 1..6"),
    (dict(avg_epochs="two"), "comma list"),
    (dict(distill_weight=1.5), "distill_weight"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(exp="a", distill_from="a"), "itself"),
    (dict(partial_fc=-1), "partial_fc=-1"),
    (dict(probe_init=True, head="arcface"), "probe_init=True needs head=linear"),
    (dict(probe_l2=0.0), "probe_l2=0.0"),
    (dict(partial_fc=100, loss="eql"), "partial_fc=100 cannot be combined with loss='eql'"),
    (dict(partial_fc=100, la_loss_tau=1.0, distill_from="t"), "la_loss_tau=1.0, distill_from='t'"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ClassifierConfig(**bad)


def test_avg_epoch_list_and_selected_epochs():
    cfg = ClassifierConfig(epochs=6, avg_epochs="5, 3", avg_last=2)
    assert cfg.avg_epoch_list() == [3, 5]
    assert classify_train.averaged_epochs(cfg) == [3, 5, 6]  # the list plus the last two, sorted, once each
    assert classify_train.averaged_epochs(ClassifierConfig(epochs=6)) == []


# ---------------------------------------------------------------------------------------------- labels
def test_label_table_other_column_and_errors(comp, tmp_path):
    table = classify.label_table(comp, "species")
    assert table["label"].tolist() == comp.train["species"].tolist()
    with pytest.raises(DataError, match=r"train.csv: no column 'colour'"):
        classify.label_table(comp, "colour")
    broken = dataclasses.replace(comp, train=comp.train.assign(grade=["a"] * 4 + [""] + ["b"] * 16))
    with pytest.raises(DataError, match=r"train.csv, row 5: empty 'grade'"):
        classify.label_table(broken, "grade")


def test_prepare_folds_writes_classes_with_counts(comp):
    cfg = tiny_cfg(comp)
    folds = classify.prepare_folds(cfg, comp)
    assert list(folds.columns) == ["image", "label", "fold"]
    info = store.read_json(classify.stage_dir("c") / "classes.json")
    counts = comp.train["individual_id"].value_counts()
    assert info["classes"] == sorted(counts.index)
    assert info["counts"] == [int(counts[c]) for c in info["classes"]]
    pd.testing.assert_frame_equal(artefacts.read_folds("c", "05"), folds)  # what torchrun's other ranks read


# ---------------------------------------------------------------------------------------------- model
def test_model_heads_shapes_and_arcface_logits():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    lin = ClassifierModel("mobilenetv3_small_050", 5, pretrained="none", head="linear").eval()
    assert lin(x).shape == (3, 5) and lin(x).dtype == torch.float32
    sub = ClassifierModel("mobilenetv3_small_050", 5, pretrained="none", head="subcenter",
                                   arc_s=10.0, arc_k=3).eval()
    assert sub.head.k == 3
    with torch.no_grad():
        f = sub.features(x)
        w = torch.nn.functional.normalize(sub.head.weight).view(5, 3, -1)
        cos = torch.einsum("nd,ckd->nck", torch.nn.functional.normalize(f), w).amax(2)
        np.testing.assert_allclose(sub(x).numpy(), (10.0 * cos).numpy(), rtol=1e-5, atol=1e-5)
    head_ids = {id(p) for p in sub.head_parameters()}
    assert head_ids.isdisjoint(id(p) for p in sub.backbone_parameters())
    assert len(head_ids) + len(list(sub.backbone_parameters())) == len(list(sub.parameters()))


def test_predict_logits_flip_tta_averages_the_mirror():
    class Columns(nn.Module):  # logits = the mean of each image column: mirroring reverses them
        def forward(self, x):
            return x.mean(dim=(1, 2))

    rng = np.random.default_rng(0)
    from PIL import Image

    files = []
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    for i in range(3):
        img = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
        files.append(str(folder / f"{i}.png"))
    plain = classify.predict_logits(Columns(), files, 4, [0.0] * 3, [1.0] * 3, tta_flip=False)
    tta = classify.predict_logits(Columns(), files, 4, [0.0] * 3, [1.0] * 3, tta_flip=True)
    np.testing.assert_allclose(tta, (plain + plain[:, ::-1]) / 2, rtol=1e-6)
    assert not np.allclose(plain, plain[:, ::-1])  # the images are not symmetric: the test can fail


# ---------------------------------------------------------------------------------------------- training
def count_evaluate(monkeypatch, fail_on: int | None = None) -> dict:
    original, calls = engine.evaluate, {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if fail_on is not None and calls["n"] == fail_on:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", wrapper)
    return calls


@pytest.mark.parametrize("tricks", [
    dict(epochs=3, dropout=0.2, ema_decay=0.9, ema_warmup=True, loss="eql", sampler="balanced", cutmix_alpha=1.0,
         mixup_alpha=0.4, mix_prob=0.7, avg_last=2, head="arcface", optimizer="radam"),
    dict(epochs=3, partial_fc=5, cutmix_alpha=1.0, mix_prob=0.7, head="subcenter", arc_k=2, label_smoothing=0.1),
], ids=["every-trick", "partial-fc"])
def test_kill_and_resume_matches_an_unbroken_run_with_every_stateful_trick(comp, monkeypatch, tricks):
    """EMA (and its warm-up count), Softmax-EQL's accumulated gradients, the balanced sampler, CutMix/Mixup draws, dropout, Partial FC's
    class draws and checkpoint averaging all carry state across epochs: a resumed run must end bit-identical."""
    ref = tiny_cfg(comp, exp="unbroken", **tricks)
    folds = classify.prepare_folds(ref, comp)
    classify.train_fold(ref, comp, folds, 0)

    cfg = dataclasses.replace(ref, exp="killed")
    classify.prepare_folds(cfg, comp)
    out = classify.fold_dir("killed", 0)
    count_evaluate(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        classify.train_fold(cfg, comp, folds, 0)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not (out / "model.pt").exists()

    torch.manual_seed(999)  # a new process starts from another RNG state
    calls = count_evaluate(monkeypatch)
    log = classify.train_fold(cfg, comp, folds, 0)
    assert calls["n"] == 2 and log["epoch"].tolist() == [1, 2, 3]
    want = torch.load(classify.fold_dir("unbroken", 0) / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"resumed weights differ: {differ[:5]}"


@pytest.mark.parametrize("head", ["linear", "subcenter"])
def test_partial_fc_scores_a_sample_of_the_classes_while_training(comp, monkeypatch, head):
    """With ``partial_fc=n`` each training batch's logits cover n classes, its own among them; validation and
    prediction score every class. ``partial_fc`` at or above the class count is the plain run, bit for bit."""
    widths, plain_forward = [], ClassifierModel.forward

    def spy(self, x, labels=None, return_aux=False, classes=None):
        out = plain_forward(self, x, labels, return_aux, classes)
        widths.append((self.training, out.shape[1]))
        if classes is not None and labels is not None:
            assert set(labels.tolist()) <= set(classes.tolist())
        return out

    monkeypatch.setattr(ClassifierModel, "forward", spy)
    base = dict(epochs=1, head=head, **({"arc_k": 2} if head == "subcenter" else {}))
    folds = classify.prepare_folds(tiny_cfg(comp, exp="pfc", partial_fc=3, **base), comp)
    n_classes = len(store.read_json(classify.stage_dir("pfc") / "classes.json")["classes"])
    assert n_classes > 4
    classify.train_fold(tiny_cfg(comp, exp="pfc", partial_fc=3, **base), comp, folds, 0)
    train_widths = {w for training, w in widths if training}
    assert train_widths and max(train_widths) <= 4 and min(train_widths) >= 3  # 3, or the batch's 4 classes
    assert {w for training, w in widths if not training} == {n_classes}
    models = {}
    for name, n in (("all", 0), ("over", n_classes)):
        classify.prepare_folds(tiny_cfg(comp, exp=name, partial_fc=n, **base), comp)
        classify.train_fold(tiny_cfg(comp, exp=name, partial_fc=n, **base), comp, folds, 0)
        models[name] = torch.load(classify.fold_dir(name, 0) / "model.pt", weights_only=True)
    pfc = torch.load(classify.fold_dir("pfc", 0) / "model.pt", weights_only=True)
    assert all(torch.equal(models["all"][k], models["over"][k]) for k in pfc)
    assert not all(torch.equal(models["all"][k], pfc[k]) for k in pfc)


def test_model_logits_of_sampled_classes_are_the_full_logits_columns():
    torch.manual_seed(0)
    x, classes = torch.randn(2, 3, 32, 32), torch.tensor([0, 2, 3])
    for head in ("linear", "subcenter"):
        model = ClassifierModel("mobilenetv3_small_050", 5, pretrained="none", head=head, arc_k=2).eval()
        with torch.no_grad():
            np.testing.assert_allclose(model(x, classes=classes).numpy(), model(x)[:, classes].numpy(),
                                       rtol=1e-5, atol=1e-5)


def test_checkpoint_averaging_is_the_mean_of_the_kept_epochs(comp):
    cfg = tiny_cfg(comp, epochs=3, avg_epochs="1,3")
    folds = classify.prepare_folds(cfg, comp)
    classify.train_fold(cfg, comp, folds, 0)
    out = classify.fold_dir("c", 0)
    assert sorted(p.name for p in out.glob("epoch*.pt")) == ["epoch1.pt", "epoch3.pt"]
    e1, e3 = (torch.load(out / f"epoch{e}.pt", weights_only=True) for e in (1, 3))
    final = torch.load(out / "model.pt", weights_only=True)
    for key, value in final.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (e1[key] + e3[key]) / 2)
    assert not torch.equal(e1["head.weight"], e3["head.weight"])  # training moved: the mean is not trivial
    assert store.read_json(out / "config.json")["final_weights"] == "average of epochs 1,3"


def test_run_classification_arrays_metrics_submission_and_posthoc(comp):
    cfg = tiny_cfg(comp, folds="all", epochs=1, la_posthoc_tau=1.0)
    metrics = classify.run_classification(cfg, comp)
    folds = pd.read_csv(classify.stage_dir("c") / "folds.csv", dtype=str)
    info = store.read_json(classify.stage_dir("c") / "classes.json")
    oof = store.load_arrays(classify.stage_dir("c") / "oof.npz")
    # every training image once, fold 0's validation images first, in folds.csv order
    expected = list(folds[folds["fold"] == "0"]["image"]) + list(folds[folds["fold"] == "1"]["image"])
    assert oof["image"].tolist() == expected
    np.testing.assert_allclose(oof["probs"].sum(1), 1.0, rtol=1e-5)
    labels = folds.set_index("image").loc[expected, "label"]
    assert oof["label"].tolist() == [info["classes"].index(c) for c in labels]
    test = store.load_arrays(classify.stage_dir("c") / "test.npz", expected_image=list(comp.test["image"]))
    np.testing.assert_allclose(test["probs"], (test["probs_fold0"] + test["probs_fold1"]) / 2, rtol=1e-6)

    # the saved logits are the model's minus tau * log prior (prior = that fold's training counts)
    model, meta = classify.load_classifier("c", 0)
    files = list(comp.train.set_index("image").loc[expected[: (folds["fold"] == "0").sum()], "path"])
    raw = classify.predict_logits(model, files, 32, meta["mean"], meta["std"], tta_flip=True)
    prior = class_prior(np.maximum(info["counts"], 1)).numpy()
    np.testing.assert_allclose(oof["logits"][: len(files)], raw - np.log(prior), rtol=1e-4, atol=1e-4)

    assert metrics["oof"]["n"] == len(expected)
    assert {"oof", "oof_no_posthoc", "test", "test_no_posthoc", "test_by_fold"} <= set(metrics)
    truth = comp.truth.set_index("image")["individual_id"]
    assert metrics["test"]["n"] + metrics["test_unscored"] == len(truth)
    assert metrics["test_unscored"] == int((~truth.isin(info["classes"])).sum())
    sub = pd.read_csv(classify.paths.submission_path("c-classifier"))
    assert sub["image"].tolist() == comp.test["image"].tolist()
    top = np.argsort(-test["probs"][0], kind="stable")[:5]
    assert sub["predictions"][0].split() == [info["classes"][i] for i in top]
    assert store.read_json(classify.paths.exp_dir("c") / "metrics.json")["classifier"]["oof_accuracy"] == \
        metrics["oof"]["accuracy"]
    table = classify.metrics_table(metrics)
    assert {"oof", "test", "test, fold 0 model"} <= set(table.index)


def test_amp_cpu_trains_and_predicts_under_bf16_autocast_on_the_cpu(comp, monkeypatch):
    """``amp_cpu``: the training forward runs under CPU bf16 autocast (the backbone's features are bf16; the
    logits are cast to float32), the weights stay float32, and the saved float32 test logits match a float32
    re-prediction of the saved model to bf16's precision (and differ from it: the bf16 path was taken). Without
    ``amp_cpu`` the forward stays float32."""
    seen = []
    original = ClassifierModel.features

    def recording(self, x):
        out = original(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(ClassifierModel, "features", recording)
    cfg = tiny_cfg(comp, epochs=1, amp=True, amp_cpu=True)
    classify.run_classification(cfg, comp)
    assert seen and set(seen) == {torch.bfloat16}
    model, meta = classify.load_classifier("c", 0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    test = store.load_arrays(classify.stage_dir("c") / "test.npz", expected_image=list(comp.test["image"]))
    assert test["logits"].dtype == np.float32 and np.isfinite(test["logits"]).all()
    files = list(comp.test["path"])
    fp32 = classify.predict_logits(model, files, 32, meta["mean"], meta["std"], tta_flip=cfg.tta_flip, amp=False)
    bf16 = classify.predict_logits(model, files, 32, meta["mean"], meta["std"], tta_flip=cfg.tta_flip, amp=True,
                                   amp_cpu=True)
    np.testing.assert_allclose(test["logits"], bf16, rtol=1e-6, atol=1e-6)  # stage 05 predicted under bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max())
    assert not np.array_equal(bf16, fp32)
    seen.clear()
    classify.run_classification(tiny_cfg(comp, exp="c32", epochs=1, amp=True), comp)
    assert seen and set(seen) == {torch.float32}


def test_distillation_needs_the_teachers_out_of_fold_predictions_before_training(comp, monkeypatch):
    original = classify_train.build_model
    monkeypatch.setattr(classify_train, "build_model", lambda *a, **k: pytest.fail("must fail before building"))
    cfg = tiny_cfg(comp, exp="student", distill_from="nobody")
    folds = classify.prepare_folds(cfg, comp)
    with pytest.raises(FileNotFoundError, match="nobody"):
        classify.train_fold(cfg, comp, folds, 0)
    with pytest.raises(ValueError, match="distill_mode=kd with CutMix/Mixup is not supported"):
        classify.train_fold(dataclasses.replace(cfg, distill_mode="kd", mixup_alpha=0.4), comp, folds, 0)
    monkeypatch.setattr(classify_train, "build_model", original)
    teacher = tiny_cfg(comp, exp="teacher", epochs=1, folds="0")  # fold 0 only: half the images predicted
    classify.run_classification(teacher, comp)
    folds = classify.prepare_folds(cfg, comp)
    with pytest.raises(DataError, match="folds=all"):
        classify.train_fold(dataclasses.replace(cfg, distill_from="teacher"), comp, folds, 0)


def test_self_distillation_targets_are_the_teachers_probs(comp):
    teacher = tiny_cfg(comp, exp="teacher", epochs=1, folds="all")
    classify.run_classification(teacher, comp)
    cfg = tiny_cfg(comp, exp="student", distill_from="teacher")
    fit = classify.prepare_folds(cfg, comp).query("fold != 0")
    classes = store.read_json(classify.stage_dir("student") / "classes.json")["classes"]
    soft = classify_train.teacher_targets(cfg, list(fit["image"]), classes)
    oof = store.load_arrays(classify.stage_dir("teacher") / "oof.npz")
    row = {img: i for i, img in enumerate(oof["image"])}
    np.testing.assert_array_equal(soft, oof["probs"][[row[i] for i in fit["image"]]])
    log = classify.train_fold(cfg, comp, classify.prepare_folds(cfg, comp), 0)
    assert np.isfinite(log["train_loss"]).all()


@pytest.mark.parametrize("name, features", [("mobilenetv3_small_100", 1024), ("ghostnet_100", 1280)])
def test_mobile_backbones_build_with_each_head(name, features):
    """The speed side of the track: MobileNetV3-small and GhostNet (timm names) with a linear or ArcFace head."""
    x = torch.zeros(2, 3, 64, 64)
    for head in ("linear", "arcface"):
        model = ClassifierModel(name, 7, pretrained="none", head=head).eval()
        assert model.num_features == features  # what the backbone returns after its conv_head, not num_features
        with torch.no_grad():
            assert model(x).shape == (2, 7)


def test_plot_class_recall_orders_by_training_images():
    from common.lib import plots

    classes = pd.DataFrame({"images": [5, 50, 1]}, index=pd.Index(["b", "a", "c"], name="class"))
    metrics = {"oof": {"per_class_recall": [0.9, 0.5, None], "balanced_accuracy": 0.7}}  # logit order a, b, c
    fig = plots.plot_class_recall(metrics, classes)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]  # most images first
    assert [round(p.get_height(), 2) for p in ax.patches] == [0.9, 0.5, 0.0]  # c has no rows: drawn as 0
    assert "oof recall" in ax.get_ylabel()


def test_full_fit_trains_on_every_image_and_answers_the_test_alone(comp, monkeypatch):
    """``full_fit``: after fold 0, one more model on every training image (``fold{n_folds}``). The out-of-fold
    arrays come from fold 0 alone, the test probabilities are the full model's alone, ``inference_only`` loads
    that model only, and soups leave it out (it has no held-out fold)."""
    from common.stages import soup

    cfg = tiny_cfg(comp, exp="ff", epochs=1, full_fit=True)
    metrics = classify.run_classification(cfg, comp)
    assert store.read_json(classify.fold_dir("ff", 2) / "config.json")["n_fit"] == len(comp.train)
    assert store.read_json(classify.fold_dir("ff", 0) / "config.json")["n_fit"] < len(comp.train)
    folds = pd.read_csv(classify.stage_dir("ff") / "folds.csv", dtype=str)
    oof = store.load_arrays(classify.stage_dir("ff") / "oof.npz")
    assert oof["image"].tolist() == list(folds[folds["fold"] == "0"]["image"])
    test = store.load_arrays(classify.stage_dir("ff") / "test.npz", expected_image=list(comp.test["image"]))
    assert {k for k in test if k.startswith("probs_fold")} == {"probs_fold2"}
    model, meta = classify.load_classifier("ff", 2)
    logits = classify.predict_logits(model, list(comp.test["path"]), 32, meta["mean"], meta["std"],
                                     tta_flip=cfg.tta_flip, amp=False)
    np.testing.assert_allclose(test["probs"], torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-5)
    assert metrics["folds"] == [0] and metrics["test_folds"] == [2] and set(metrics["test_by_fold"]) == {"2"}
    assert soup.soup_folds(["ff"]) == [0]

    loaded, original = [], classify.load_classifier
    monkeypatch.setattr(classify, "load_classifier", lambda exp, k, *a: loaded.append(k) or original(exp, k, *a))
    again = classify.run_classification(dataclasses.replace(cfg, inference_only=True, force=True), comp)
    assert loaded == [2] and again["test_folds"] == [2]
    redone = store.load_arrays(classify.stage_dir("ff") / "test.npz", expected_image=list(comp.test["image"]))
    np.testing.assert_allclose(redone["probs"], test["probs"], atol=1e-6)


def test_finished_stage_is_not_predicted_again(comp, monkeypatch):
    cfg = tiny_cfg(comp, epochs=1)
    first = classify.run_classification(cfg, comp)
    monkeypatch.setattr(classify, "predict_logits", lambda *a, **k: pytest.fail("must not predict again"))
    assert classify.run_classification(cfg, comp) == first
    with pytest.raises(pytest.fail.Exception, match="must not predict again"):
        classify.run_classification(dataclasses.replace(cfg, tta_flip=False), comp)  # other parameters: redo


def test_aux_head_learns_another_column_and_changes_training(comp):
    plain = tiny_cfg(comp, exp="noaux", epochs=1)
    aux = tiny_cfg(comp, exp="aux", epochs=1, aux_column="species", aux_weight=0.5)
    for cfg in (plain, aux):
        classify.run_classification(cfg, comp)
    meta = store.read_json(classify_train.fold_dir("aux", 0) / "config.json")
    assert meta["aux_classes"] == sorted(comp.train["species"].unique())
    model, _ = classify.load_classifier("aux", 0)
    assert model.aux_head is not None and model.aux_head.out_features == len(meta["aux_classes"])
    a = torch.load(classify_train.fold_dir("noaux", 0) / "model.pt", weights_only=True)
    b = torch.load(classify_train.fold_dir("aux", 0) / "model.pt", weights_only=True)
    # Same seed and data: the only difference is the auxiliary loss term, whose gradient reaches the backbone.
    key = next(k for k in a if k.startswith("backbone.") and a[k].is_floating_point())
    assert not torch.equal(a[key], b[key])
    with pytest.raises(ValueError, match="aux_column with CutMix"):
        classify_train.train_fold(tiny_cfg(comp, exp="auxmix", aux_column="species", cutmix_alpha=1.0), comp,
                                  classify.prepare_folds(tiny_cfg(comp, exp="auxmix"), comp), 0)
    with pytest.raises(DataError, match="no column 'nope'"):
        classify_train.train_fold(tiny_cfg(comp, exp="auxbad", aux_column="nope"), comp,
                                  classify.prepare_folds(tiny_cfg(comp, exp="auxbad"), comp), 0)


def test_probe_init_starts_the_head_from_a_logistic_regression_on_the_frozen_features(comp):
    from common.engine.predict import forward_images
    from common.lib.probe import fit_linear_probe

    probe = tiny_cfg(comp, exp="probe", epochs=0, probe_init=True, probe_l2=0.05, aux_column="species")
    classify.run_classification(probe, comp)
    out = classify_train.fold_dir("probe", 0)
    meta, record = store.read_json(out / "config.json"), store.read_json(out / "probe.json")
    assert record["images"] == meta["n_fit"] and record["l2"] == 0.05 and set(record) >= {"head", "aux_head"}
    model, _ = classify.load_classifier("probe", 0)
    # The head is the probe of the pretrained (here: seeded random) backbone's features of the fold's images.
    folds = pd.read_csv(classify.stage_dir("probe") / "folds.csv")
    fit = folds[folds["fold"] != 0]
    paths = comp.train.set_index("image").loc[fit["image"], "path"].tolist()
    feats = forward_images(model.features, paths, 32, meta["mean"], meta["std"], tta_flip=False)
    expected = fit_linear_probe(feats, np.array([meta["classes"].index(c) for c in fit["label"]]),
                                len(meta["classes"]), l2=0.05)
    np.testing.assert_allclose(model.head.weight.detach().numpy(), expected.weight, atol=1e-4)
    np.testing.assert_allclose(model.head.bias.detach().numpy(), expected.bias, atol=1e-4)
    assert record["head"]["train_accuracy"] == pytest.approx(expected.train_accuracy, abs=1e-4)

    # Without the probe, epochs=0 keeps the random head; fine-tuning from the probe starts at its weights.
    classify.run_classification(tiny_cfg(comp, exp="noprobe", epochs=0), comp)
    plain, _ = classify.load_classifier("noprobe", 0)
    assert torch.equal(plain.backbone.state_dict()["conv_stem.weight"], model.backbone.state_dict()["conv_stem.weight"])
    assert not torch.allclose(plain.head.weight, model.head.weight, atol=1e-2)
    classify.run_classification(tiny_cfg(comp, exp="lpft", epochs=1, lr=1e-9, probe_init=True, probe_l2=0.05,
                                          aux_column="species"), comp)
    tuned, _ = classify.load_classifier("lpft", 0)
    np.testing.assert_allclose(tuned.head.weight.detach().numpy(), expected.weight, atol=1e-4)
    assert not (classify_train.fold_dir("noprobe", 0) / "probe.json").exists()


def test_forward_images_feeds_channels_last_batches_with_the_same_outputs(tmp_path):
    """forward_images converts each batch to channels-last when asked (the CPU gains 1.3-1.7x: bench/RESULTS.md);
    the model's outputs stay the same up to rounding."""
    from PIL import Image

    from common.engine.predict import forward_images

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(files[-1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    seen = []

    def forward(x):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return net(x)

    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    last = forward_images(forward, files, 32, mean, std, batch_size=2, tta_flip=True, channels_last=True)
    assert seen and all(seen)  # both batches and their flips
    seen.clear()
    plain = forward_images(forward, files, 32, mean, std, batch_size=2, tta_flip=True, channels_last=False)
    assert seen and not any(seen)
    assert last.shape == (3, 8)
    np.testing.assert_allclose(last, plain, atol=1e-5)
    assert np.abs(plain).max() > 1e-3  # not a trivial all-zero output
