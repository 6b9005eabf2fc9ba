"""Stage 02 (common.engine.embedder on common.engine.fit): folds, the learning-rate schedule, kill-and-resume, skipping and forcing finished
folds, the untrained baseline, dynamic margins and the load_embedder round trip.

Every test trains a randomly initialised ``mobilenetv3_small_050`` at 32 px on the tiny generated demo
(21 train images, 2 folds), so a training run takes about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import EmbedderConfig
from common.config.checks import check
from common.core import paths, store
from common.core.runtime import seed_everything, warmup_cosine
from common.data import artefacts
from common.data.competition import DataError
from common.data.fingerprint import stage_fingerprint
from common.engine import embedder as train
from common.engine import fit as engine
from common.lib.heads import dynamic_margins
from common.stages import train_embedder


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


pytestmark = pytest.mark.usefixtures("isolated")


def tiny_cfg(comp, **overrides) -> EmbedderConfig:
    values = dict(data=str(comp.root), exp="t", backbone="mobilenetv3_small_050", pretrained="none",
                  image_size=32, embedding_dim=16, epochs=2, batch_size=4, n_folds=2, folds="0",
                  device="cpu", warmup_epochs=0.5, amp=False, use_crops=True,
                  oof_new_share=0.0)  # every individual trained on; tests/test_openset.py covers the open-set split
    return EmbedderConfig(**{**values, **overrides})


def _owner(name: str):
    """The module whose ``name`` the training code calls: the shared loop's ``evaluate``, else the embedder's."""
    return engine if name == "evaluate" else train


def count_calls(monkeypatch, name: str, fail_on: int | None = None) -> dict:
    """Wrap ``<module>.<name>`` (:func:`_owner`): count its calls; raise KeyboardInterrupt on call number ``fail_on``."""
    original = getattr(_owner(name), name)
    calls = {"n": 0, "models": []}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if name == "evaluate":
            calls["models"].append(args[0])
        if fail_on is not None and calls["n"] == fail_on:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(_owner(name), name, wrapper)
    return calls


def forbid(monkeypatch, name: str) -> None:
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(_owner(name), name, boom)


# ---------------------------------------------------------------------------------------------- folds
def test_prepare_folds_writes_a_valid_table(comp):
    cfg = tiny_cfg(comp, n_folds=3)
    table = train_embedder.prepare_folds(cfg, comp)
    assert list(table.columns) == ["image", "individual_id", "species", "fold", "new_fold"]
    assert (table["new_fold"] == -1).all()  # oof_new_share=0: nobody is left out
    assert table["image"].tolist() == comp.train["image"].tolist()  # every image, in train.csv order
    assert sorted(table["fold"].unique()) == [0, 1, 2]
    sizes = table["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1  # round-robin dealing: 21 images -> 7/7/7
    written = artefacts.read_folds(cfg.exp)
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    assert (paths.stage_dir(cfg.exp, "02") / "folds.csv").exists()


def test_prepare_folds_rejects_empty_folds_before_training(comp, monkeypatch):
    forbid(monkeypatch, "train_fold")
    cfg = tiny_cfg(comp, n_folds=len(comp.train) + 1, folds="0")
    n = len(comp.train)
    with pytest.raises(DataError, match=f"{n} training images cannot fill {n + 1} folds"):
        train_embedder.prepare_folds(cfg, comp)
    assert not (paths.stage_dir(cfg.exp, "02") / "folds.csv").exists()


def test_prepare_folds_max_images_caps(comp):
    table = train_embedder.prepare_folds(tiny_cfg(comp, max_images=6, n_folds=3), comp)
    assert len(table) == 6
    assert set(table["image"]) <= set(comp.train["image"])
    order = comp.train["image"].tolist()
    assert [order.index(i) for i in table["image"]] == sorted(order.index(i) for i in table["image"])
    assert sorted(table["fold"].value_counts().tolist()) == [2, 2, 2]
    # 2 images cannot fill 3 folds: the cap is applied before the check
    with pytest.raises(DataError, match="2 training images cannot fill 3 folds"):
        train_embedder.prepare_folds(tiny_cfg(comp, max_images=2, n_folds=3), comp)


def test_fold_seed_keeps_one_split_across_training_seeds(comp):
    """Models of other seeds share a split when they share ``fold_seed`` (stage 06 needs one split to ensemble
    them out of fold); at its default -1 the split follows ``seed``, as before the parameter existed."""
    def split(**kw):
        cfg = tiny_cfg(comp, n_folds=3, oof_new_share=0.3, max_images=15, **kw)
        return train_embedder.prepare_folds(cfg, comp)[["image", "fold", "new_fold"]].reset_index(drop=True)

    by_seed = {s: split(seed=s) for s in range(4)}
    assert any(not by_seed[0].equals(by_seed[s]) for s in (1, 2, 3))  # the split does follow the seed
    for s in (1, 2, 3):  # fold_seed 0 reproduces seed 0's images, folds and new individuals, whatever the seed
        pd.testing.assert_frame_equal(split(seed=s, fold_seed=0), by_seed[0])
    pd.testing.assert_frame_equal(split(seed=2, fold_seed=-1), by_seed[2])
    assert tiny_cfg(comp, seed=5).split_seed() == 5 and tiny_cfg(comp, seed=5, fold_seed=3).split_seed() == 3
    with pytest.raises(ValueError, match="fold_seed=-2: must be >= -1"):
        tiny_cfg(comp, fold_seed=-2)


def test_read_folds_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match=r"02_embedder.folds\.csv not found"):
        artefacts.read_folds("nothing")


# ---------------------------------------------------------------------------------------------- schedule
def test_lr_lambda_warmup_then_cosine():
    fn = warmup_cosine(total_steps=10, warmup_steps=2)
    assert fn(0) == pytest.approx(0.5)  # (0 + 1) / 2: warmup starts at 1/warmup, not 0
    assert fn(1) == pytest.approx(1.0)  # (1 + 1) / 2
    assert fn(2) == pytest.approx(1.0)  # cosine starts: progress 0 -> 1
    assert fn(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # progress 2/8 -> 0.8536
    assert fn(6) == pytest.approx(0.5)  # progress 4/8: cosine midpoint
    assert fn(10) == pytest.approx(0.0, abs=1e-12)  # the end
    assert fn(13) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    no_warmup = warmup_cosine(total_steps=4, warmup_steps=0)
    assert [no_warmup(s) for s in range(5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                               0.5 * (1 - math.cos(math.pi / 4)), 0.0])
    assert warmup_cosine(0, 0)(0) == 1.0  # epochs=0: no division by zero


def test_logged_lr_follows_the_schedule(comp):
    cfg = tiny_cfg(comp)
    folds = train_embedder.prepare_folds(cfg, comp)
    log = train.train_fold(cfg, comp, folds, 0)
    n_fit = int((folds["fold"] != 0).sum())
    steps = n_fit // cfg.batch_size  # drop_last=True
    fn = warmup_cosine(2 * steps, int(0.5 * steps))
    assert log["epoch"].tolist() == [1, 2]
    assert log["lr"].tolist() == pytest.approx([cfg.lr * fn(steps), cfg.lr * fn(2 * steps)])
    assert log["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    assert list(log.columns) == train.LOG_COLUMNS
    assert np.isfinite(log["train_loss"]).all()


def test_validate_every_skips_epochs_but_not_the_last_and_keeps_the_weights(comp, monkeypatch):
    ref_cfg = tiny_cfg(comp, exp="every1", epochs=3, dropout=0.2)
    folds = train_embedder.prepare_folds(ref_cfg, comp)
    ref_log = train.train_fold(ref_cfg, comp, folds, 0)
    calls = count_calls(monkeypatch, "evaluate")
    cfg = dataclasses.replace(ref_cfg, exp="every2", validate_every=2)
    log = train.train_fold(cfg, comp, folds, 0)
    assert calls["n"] == 2  # epochs 2 and 3 (the last), not 1
    assert log["valid_loss"].isna().tolist() == [True, False, False]
    np.testing.assert_allclose(log["valid_loss"].iloc[1:], ref_log["valid_loss"].iloc[1:], rtol=1e-5)
    ref = torch.load(train.fold_dir("every1", 0) / "model.pt", weights_only=True)
    got = torch.load(train.fold_dir("every2", 0) / "model.pt", weights_only=True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])
    assert cfg.fingerprint() == ref_cfg.fingerprint() | {"exp": "every2"}  # a speed knob: reuse ignores it
    with pytest.raises(ValueError, match="validate_every"):
        check(dataclasses.replace(cfg, validate_every=0))


# ---------------------------------------------------------------------------------------------- resume
def test_kill_and_resume_matches_an_unbroken_run(comp, monkeypatch):
    # dropout > 0 draws from the global torch RNG: the resumed run must draw what the unbroken run drew
    ref_cfg = tiny_cfg(comp, exp="unbroken", dropout=0.2)
    folds = train_embedder.prepare_folds(ref_cfg, comp)
    train.train_fold(ref_cfg, comp, folds, 0)

    cfg = dataclasses.replace(ref_cfg, exp="killed")
    out = train.fold_dir(cfg.exp, 0)
    count_calls(monkeypatch, "evaluate", fail_on=2)  # dies at the end of epoch 2, before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.train_fold(cfg, comp, folds, 0)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not (out / "_done.json").exists()
    assert not (out / "model.pt").exists()
    first_log = pd.read_csv(out / "log.csv")
    assert first_log["epoch"].tolist() == [1]

    # a checkpoint from other parameters is refused, not silently mixed in
    with pytest.raises(RuntimeError, match="checkpoint from other parameters"):
        train.train_fold(dataclasses.replace(cfg, lr=5e-4), comp, folds, 0)

    torch.manual_seed(12345)  # a new process starts from some other RNG state
    calls = count_calls(monkeypatch, "evaluate")
    log = train.train_fold(cfg, comp, folds, 0)
    assert calls["n"] == 1  # only epoch 2 ran
    assert log["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(log.iloc[[0]], first_log[train.LOG_COLUMNS])  # epoch 1's row is kept
    assert store.stage_done(out)

    ref = torch.load(train.fold_dir("unbroken", 0) / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"resumed weights differ from the unbroken run's: {differ[:5]}"
    ref_log = pd.read_csv(train.fold_dir("unbroken", 0) / "log.csv")
    np.testing.assert_allclose(log["train_loss"], ref_log["train_loss"], rtol=1e-6)


def test_finished_fold_is_skipped_and_other_params_need_force(comp, monkeypatch):
    cfg = tiny_cfg(comp, epochs=1)
    folds = train_embedder.prepare_folds(cfg, comp)
    first = train.train_fold(cfg, comp, folds, 0)
    model_file = train.fold_dir(cfg.exp, 0) / "model.pt"
    before = model_file.stat().st_mtime_ns

    with monkeypatch.context() as m:
        forbid(m, "build_model")
        forbid(m, "evaluate")
        again = train.train_fold(cfg, comp, folds, 0)  # same parameters: skipped
        pd.testing.assert_frame_equal(again, first)
        # num_workers and force are not model parameters: still skipped
        train.train_fold(dataclasses.replace(cfg, num_workers=1), comp, folds, 0)
        with pytest.raises(RuntimeError, match=r"other parameters or data \(changed: lr\); use force=True"):
            train.train_fold(dataclasses.replace(cfg, lr=5e-4), comp, folds, 0)
    assert model_file.stat().st_mtime_ns == before

    calls = count_calls(monkeypatch, "evaluate")
    train.train_fold(dataclasses.replace(cfg, lr=5e-4, force=True), comp, folds, 0)
    assert calls["n"] == 1  # retrained
    meta = store.read_json(train.fold_dir(cfg.exp, 0) / "config.json")
    assert meta["config"]["lr"] == 5e-4
    # and the retrained fold now counts as finished for the new parameters
    forbid(monkeypatch, "build_model")
    train.train_fold(dataclasses.replace(cfg, lr=5e-4), comp, folds, 0)


# ---------------------------------------------------------------------------------------------- baseline
def test_zero_epochs_writes_the_initial_model(comp):
    cfg = tiny_cfg(comp, epochs=0)
    folds = train_embedder.prepare_folds(cfg, comp)
    log = train.train_fold(cfg, comp, folds, 0)
    out = train.fold_dir(cfg.exp, 0)
    assert list(log.columns) == train.LOG_COLUMNS and log.empty
    assert (out / "log.csv").read_text().strip() == ",".join(train.LOG_COLUMNS)
    assert store.stage_done(out)
    # the saved weights are the seeded initialisation
    meta = store.read_json(out / "config.json")
    seed_everything(cfg.seed + 0)
    expected = train.build_model(meta).state_dict()
    got = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert meta["used_crops"] is False  # stage 01 never ran: full images
    assert meta["n_fit"] + meta["n_valid"] == len(comp.train)


def test_run_training_all_folds_and_summary(comp):
    cfg = tiny_cfg(comp, epochs=0, folds="all")
    folds = train_embedder.prepare_folds(cfg, comp)
    logs = train_embedder.run_training(cfg, comp, folds)
    assert logs.empty and "fold" in logs.columns
    assert store.stage_done(paths.stage_dir(cfg.exp, "02"), stage_fingerprint(cfg))
    summary = train_embedder.fold_summary(cfg.exp, [0, 1])
    assert summary.index.tolist() == [0, 1]
    sizes = folds["fold"].value_counts()
    assert summary["train images"].tolist() == [int(sizes[1]), int(sizes[0])]
    assert summary["valid images"].tolist() == [int(sizes[0]), int(sizes[1])]
    assert summary["epochs"].tolist() == [0, 0]


def test_dynamic_margin_buffer_comes_from_class_counts(comp):
    cfg = tiny_cfg(comp, epochs=0, dynamic_margin=True, margin_a=0.4, margin_p=-0.5, margin_b=0.1)
    folds = train_embedder.prepare_folds(cfg, comp)
    train.train_fold(cfg, comp, folds, 0)
    model, meta = train.load_embedder(cfg.exp, 0)
    fit = folds[folds["fold"] != 0]
    counts = fit["individual_id"].value_counts().sort_index()  # classes are the sorted fit individuals
    assert meta["classes"] == counts.index.tolist()
    assert meta["class_counts"] == counts.tolist()
    expected = dynamic_margins(counts.to_numpy(), 0.4, -0.5, 0.1)
    torch.testing.assert_close(model.arcface.margin, expected)
    # by hand: m = 0.4 / sqrt(n) + 0.1
    torch.testing.assert_close(model.arcface.margin,
                               torch.tensor([0.4 / math.sqrt(n) + 0.1 for n in counts], dtype=torch.float32))
    assert model.arcface.per_class


# ---------------------------------------------------------------------------------------------- loading
def test_load_embedder_round_trip(comp, monkeypatch):
    cfg = tiny_cfg(comp, epochs=1)
    folds = train_embedder.prepare_folds(cfg, comp)
    with pytest.raises(FileNotFoundError, match="has not finished training"):
        train.load_embedder(cfg.exp, 0)
    calls = count_calls(monkeypatch, "evaluate")  # evaluate receives the trained model after its last epoch
    train.train_fold(cfg, comp, folds, 0)
    trained = calls["models"][-1].eval()
    loaded, meta = train.load_embedder(cfg.exp, 0)
    assert not loaded.training
    assert meta["fold"] == 0 and len(meta["classes"]) == loaded.arcface.weight.shape[0]
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = trained.embed(x), loaded.embed(x)
        fresh = train.build_model(meta, pretrained="none").eval().embed(x)
    # The weights round-trip exactly; training held them channels-last (faster on the CPU too), the loaded model
    # holds them contiguous, so the two layouts' convolutions may round differently.
    loaded_state = loaded.state_dict()
    assert all(torch.equal(v, loaded_state[k]) for k, v in trained.state_dict().items())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, fresh)  # the comparison can fail: an untrained model embeds differently


def test_image_paths_full_images_and_missing_crops(comp):
    table = comp.train.head(3)
    assert artefacts.image_paths(table, "t", "train", use_crops=False) == table["path"].tolist()
    with pytest.raises(DataError, match=r"crop missing \(3 in all\)"):
        artefacts.image_paths(table, "t", "train", use_crops=True)
    assert not artefacts.crops_available("t")
