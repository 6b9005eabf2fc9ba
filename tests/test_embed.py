"""Stage 03 (common.stages.extract_embeddings): ``extract`` against hand-computed embeddings of hand-drawn images (with and
without flip TTA), and ``run_extraction``'s files, row order, reuse and recomputation."""

from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from common.config import EmbedderConfig, EnsembleConfig, ExtractConfig, RetrievalConfig
from common.core import paths, store
from common.data import artefacts
from common.data.competition import build_transforms, read_rgb
from common.engine import embedder as train
from common.stages import ensemble_postprocess as ensemble_stage
from common.stages import extract_embeddings as embed
from common.stages import retrieve_submit as submit
from common.stages import train_embedder


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


pytestmark = pytest.mark.usefixtures("isolated")


# ---------------------------------------------------------------------------------------------- extract
class HalvesProbe(torch.nn.Module):
    """``embed(x)`` = [per-channel mean of the image, per-channel mean of the left half minus the right half].

    The first three values do not change under a horizontal flip, the last three change sign, so flip TTA
    (embedding + embedding of the flip) must cancel them exactly. Returns float64 to check the cast.
    """

    embedding_dim = 6

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[3] // 2
        left, right = x[..., :half].mean(dim=(2, 3)), x[..., half:].mean(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), left - right], dim=1).double()


def halves_png(path, left_rgb, right_rgb, size=8):
    """An RGB image, ``size`` x ``size``, whose left and right halves are flat colours; written as PNG."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = left_rgb
    img[:, size // 2:] = right_rgb
    assert cv2.imwrite(str(path), img[..., ::-1])  # cv2 writes BGR
    return str(path)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_extract_matches_hand_computed_embeddings(tmp_path):
    # mean 0 and std 1 with max_pixel_value 255: the model sees pixel / 255; 8x8 images at image_size 8
    a = halves_png(tmp_path / "a.png", (255, 0, 51), (0, 255, 51))  # left (1, 0, .2), right (0, 1, .2)
    b = halves_png(tmp_path / "b.png", (102, 102, 102), (102, 102, 102))  # flat 0.4
    c = halves_png(tmp_path / "c.png", (0, 0, 255), (255, 255, 255))  # left (0, 0, 1), right (1, 1, 1)
    files = [c, a, b, a]  # row order = input order, duplicates allowed, batches of 3 then 1
    args = dict(image_size=8, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], batch_size=3, device="cpu")

    no_tta = embed.extract(HalvesProbe(), files, tta_flip=False, **args)
    expected = np.stack([
        unit([0.5, 0.5, 1.0, -1, -1, 0]),  # c: mean (.5, .5, 1), left - right (-1, -1, 0)
        unit([0.5, 0.5, 0.2, 1, -1, 0]),  # a: mean (.5, .5, .2), left - right (1, -1, 0); norm sqrt(2.54)
        unit([0.4, 0.4, 0.4, 0, 0, 0]),  # b: flat, no left/right difference
        unit([0.5, 0.5, 0.2, 1, -1, 0]),  # a again
    ])
    assert no_tta.dtype == np.float32 and no_tta.shape == (4, 6)
    np.testing.assert_allclose(no_tta, expected, atol=1e-6)
    np.testing.assert_allclose(no_tta[1], np.array([0.5, 0.5, 0.2, 1, -1, 0]) / math.sqrt(2.54), atol=1e-6)

    tta = embed.extract(HalvesProbe(), files, tta_flip=True, **args)
    expected_tta = np.stack([
        unit([1.0, 1.0, 2.0, 0, 0, 0]),  # c: 2 * mean, the left/right part cancels
        unit([1.0, 1.0, 0.4, 0, 0, 0]),  # a
        unit([0.8, 0.8, 0.8, 0, 0, 0]),  # b: unchanged direction
        unit([1.0, 1.0, 0.4, 0, 0, 0]),  # a
    ])
    assert tta.dtype == np.float32
    np.testing.assert_allclose(tta, expected_tta, atol=1e-6)
    np.testing.assert_allclose(tta[:, 3:], 0.0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(tta, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(no_tta, axis=1), 1.0, atol=1e-6)


def test_extract_no_images():
    out = embed.extract(HalvesProbe(), [], image_size=8, mean=[0, 0, 0], std=[1, 1, 1])
    assert out.shape == (0, 6) and out.dtype == np.float32


# ---------------------------------------------------------------------------------------------- stage 03
@pytest.fixture
def trained(comp):
    """A finished stage-02 fold 0 (the untrained baseline: epochs=0) of experiment ``e``."""
    cfg = EmbedderConfig(data=str(comp.root), exp="e", backbone="mobilenetv3_small_050", pretrained="none",
                         image_size=32, embedding_dim=16, epochs=0, n_folds=2, folds="0", device="cpu")
    train.train_fold(cfg, comp, train_embedder.prepare_folds(cfg, comp), 0)
    return cfg


def counting_extract(monkeypatch) -> dict:
    original, calls = embed.extract, {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(embed, "extract", wrapper)
    return calls


def test_run_extraction_files_order_and_values(comp, trained):
    cfg = ExtractConfig(data=str(comp.root), exp="e", n_folds=2, folds="0", batch_size=8, tta_flip=False,
                        device="cpu")
    table = embed.run_extraction(cfg, comp)
    assert table[["fold", "split", "rows", "dim", "reused"]].values.tolist() == [
        [0, "train", len(comp.train), 16, False],
        [0, "test", len(comp.test), 16, False],
    ]
    assert table["file"].tolist() == ["e/03_embeddings/fold0/train.npz", "e/03_embeddings/fold0/test.npz"]
    for split, images in (("train", comp.train["image"]), ("test", comp.test["image"])):
        raw = store.load_arrays(artefacts.embeddings_dir("e", 0) / f"{split}.npz")
        assert raw["image"].tolist() == images.tolist()  # train.csv order / sample-submission order
        assert raw["embeddings"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(raw["embeddings"], axis=1), 1.0, atol=1e-5)

    # independent reference: read, resize, normalise, embed, L2-normalise, image by image
    model, meta = train.load_embedder("e", 0)
    transform = build_transforms(32, False, meta["mean"], meta["std"])
    got = artefacts.load_fold_embeddings("e", 0, "test", comp.test["image"])
    with torch.no_grad():
        for row, path in enumerate(comp.test["path"]):
            x = torch.from_numpy(transform(image=read_rgb(path))["image"].transpose(2, 0, 1).copy())[None]
            ref = torch.nn.functional.normalize(model.embed(x.float()), dim=1)[0].numpy()
            np.testing.assert_allclose(got[row], ref, atol=1e-5, err_msg=f"test row {row}")
    assert store.stage_done(artefacts.embeddings_dir("e", 0))


def test_run_extraction_reuses_and_recomputes(comp, trained, monkeypatch):
    cfg = ExtractConfig(data=str(comp.root), exp="e", n_folds=2, folds="0", batch_size=16, tta_flip=True,
                        device="cpu")
    embed.run_extraction(cfg, comp)
    first = artefacts.load_fold_embeddings("e", 0, "train", comp.train["image"])
    calls = counting_extract(monkeypatch)

    table = embed.run_extraction(cfg, comp)  # unchanged: reused
    assert calls["n"] == 0 and table["reused"].all()
    embed.run_extraction(dataclasses.replace(cfg, batch_size=5, num_workers=1), comp)  # same model, same TTA
    assert calls["n"] == 0

    embed.run_extraction(dataclasses.replace(cfg, tta_flip=False), comp)  # TTA changed
    assert calls["n"] == 2
    no_tta = artefacts.load_fold_embeddings("e", 0, "train", comp.train["image"])
    assert not np.allclose(no_tta, first, atol=1e-4)

    embed.run_extraction(cfg, comp)  # back to TTA: recomputed, equal to the first run
    assert calls["n"] == 4
    np.testing.assert_allclose(artefacts.load_fold_embeddings("e", 0, "train", comp.train["image"]), first,
                               atol=1e-6)

    # the model file changes (e.g. the fold was retrained): recomputed, with the new weights
    weights = train.fold_dir("e", 0) / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["neck.3.bias"] = state["neck.3.bias"] + 1.0  # the last BatchNorm's bias shifts every embedding
    stamp = weights.stat().st_mtime_ns
    torch.save(state, weights)
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    table = embed.run_extraction(cfg, comp)
    assert calls["n"] == 6 and not table["reused"].any()
    assert not np.allclose(artefacts.load_fold_embeddings("e", 0, "train", comp.train["image"]), first, atol=1e-4)

    embed.run_extraction(dataclasses.replace(cfg, force=True), comp)  # force
    assert calls["n"] == 8


def test_load_fold_embeddings_checks_row_order(comp, trained):
    cfg = ExtractConfig(data=str(comp.root), exp="e", n_folds=2, folds="0", device="cpu", tta_flip=False)
    embed.run_extraction(cfg, comp)
    images = comp.train["image"].tolist()
    wrong = images[::-1]
    with pytest.raises(ValueError, match=rf"train\.npz: row 0 is image '{images[0]}' but '{wrong[0]}'"):
        artefacts.load_fold_embeddings("e", 0, "train", wrong)
    with pytest.raises(ValueError, match="rows but"):
        artefacts.load_fold_embeddings("e", 0, "train", images[:-1])
    with pytest.raises(FileNotFoundError, match="fold1.test.npz does not exist"):
        artefacts.load_fold_embeddings("e", 1, "test", comp.test["image"])


def test_run_extraction_needs_a_finished_fold(comp):
    cfg = ExtractConfig(data=str(comp.root), exp="none", n_folds=2, folds="0", device="cpu")
    with pytest.raises(FileNotFoundError, match="fold 0 has not finished training"):
        embed.run_extraction(cfg, comp)


def test_full_fit_model_answers_the_test_and_the_folds_tune_the_threshold(comp):
    common = dict(data=str(comp.root), exp="full", n_folds=2, folds="0", full_fit=True, device="cpu")
    cfg = EmbedderConfig(**common, backbone="mobilenetv3_small_050", pretrained="none", image_size=32,
                         embedding_dim=16, epochs=1, batch_size=8, oof_new_share=0.3)
    folds = train_embedder.prepare_folds(cfg, comp)
    logs = train_embedder.run_training(cfg, comp, folds)
    assert sorted(logs["fold"].unique()) == [0, 2]
    meta = store.read_json(train.fold_dir("full", 2) / "config.json")
    assert meta["n_fit"] == len(comp.train)  # every image, the individuals new in fold 0 included
    assert store.read_json(train.fold_dir("full", 0) / "config.json")["n_fit"] < len(folds[folds["fold"] == 1])
    table = embed.run_extraction(ExtractConfig(**common, tta_flip=False), comp)
    assert sorted(set(zip(table["fold"], table["split"], strict=True))) == [
        (0, "test"), (0, "train"), (2, "test"), (2, "train")]
    rcfg = RetrievalConfig(**common, knn_k=10)
    result = submit.run_retrieval(rcfg, comp)
    assert result.metrics["folds"] == [0] and result.metrics["test_folds"] == [2]
    # the test's scores are the full model's alone; the out-of-fold queries are fold 0's
    expected = submit.test_scores(rcfg, comp, [2])
    pd.testing.assert_frame_equal(result.test_scores.reset_index(drop=True), expected.reset_index(drop=True))
    assert set(result.oof_scores["image"]) <= set(folds.loc[folds["fold"] == 0, "image"])
    with pytest.raises(Exception, match="fold3"):  # full_fit asked of a run whose full model is missing
        submit.test_folds(RetrievalConfig(**{**common, "n_folds": 3}), [0])
    # stage 06's retrieval side with this one member: the full model answers, fold 0 tunes; stage 04's numbers
    res = ensemble_stage.run_ensemble(EnsembleConfig(data=str(comp.root), exp="full-ens", members="",
                                                     embed_members="full", knn_k=10, device="cpu"), comp)
    assert res["retrieval"]["folds"] == [0] and res["retrieval"]["test_folds"] == [2]
    assert res["retrieval"]["threshold"] == result.metrics["threshold"]
    pd.testing.assert_frame_equal(pd.read_csv(paths.submission_path(res["submission"])),
                                  pd.read_csv(paths.submission_path("full")))
