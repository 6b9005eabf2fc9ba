"""Stage 00 (common.stages.pretrain_ssl): lightly's SimCLR / BYOL / MAE on the tiny demo, resume, skip,
``pretrained=<exp>`` in stage 05, and the nearest-neighbour table.

Runs use a randomly initialised ``mobilenetv3_small_050`` (or a tiny ViT for MAE) at 32 px on the tiny generated
demo (21 train + test images): seconds on a CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import isolate_dirs

from common.config import STAGE_CONFIGS, ClassifierConfig
from common.config.pretrain import PretrainConfig
from common.core import store
from common.core.weights import resolve_pretrained, ssl_backbone_file
from common.data.competition import load_competition
from common.data.demo import TINY_DEMO, make_demo
from common.lib.models import ClassifierModel, create_backbone
from common.stages import pretrain_ssl


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    root = make_demo(tmp_path_factory.mktemp("comp") / "demo_tiny", **TINY_DEMO)
    return load_competition(root, check_pixels=False)


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    isolate_dirs(tmp_path, monkeypatch)
    return tmp_path


def tiny(comp, **overrides) -> PretrainConfig:
    values = dict(data=str(comp.root), exp="ssl", backbone="mobilenetv3_small_050", ssl_pretrained="none",
                  ssl_image_size=32, ssl_epochs=2, ssl_batch_size=8, device="cpu", amp=False, n_examples=2)
    return PretrainConfig(**{**values, **overrides})


def test_stage_00_is_registered_and_checks_its_values():
    assert list(STAGE_CONFIGS)[0] == "00" and STAGE_CONFIGS["00"] is PretrainConfig
    with pytest.raises(ValueError, match="ssl_method='dino'"):
        PretrainConfig(ssl_method="dino")
    with pytest.raises(ValueError, match="ssl_mask_ratio"):
        PretrainConfig(ssl_mask_ratio=1.0)


def test_simclr_trains_writes_backbone_and_stage_05_starts_from_it(comp):
    cfg = tiny(comp)
    metrics = pretrain_ssl.run_pretrain(cfg, comp)
    n = len(comp.train) + len(comp.test)
    assert metrics["images"] == n and metrics["method"] == "simclr"
    log = pretrain_ssl.training_log("ssl")
    assert list(log["epoch"]) == [1, 2] and np.isfinite(log["loss"]).all()
    # NT-Xent of 2 x 8 views: the loss of uniform similarities is log(2 * 8 - 1) = 2.708; a trained or random
    # projection gives a finite positive loss near it.
    assert 0 < log["loss"].iloc[0] < 2 * np.log(15)
    folder = pretrain_ssl.stage_dir("ssl")
    assert store.stage_done(folder, cfg.fingerprint())
    # pretrained=<exp> resolves to the backbone file, and the weights are the pretrained ones, not random ones.
    assert ssl_backbone_file("ssl") == folder / "backbone.pt"
    assert resolve_pretrained("mobilenetv3_small_050", "ssl") == str(folder / "backbone.pt")
    saved = torch.load(folder / "backbone.pt", weights_only=True)
    model = ClassifierModel("mobilenetv3_small_050", 3, pretrained="ssl")
    for key, value in saved.items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    ClassifierConfig(pretrained="ssl")  # a valid stage-05 value
    # An unchanged rerun is skipped: it returns the stored metrics without touching the weights.
    stamp = (folder / "backbone.pt").stat().st_mtime_ns
    assert pretrain_ssl.run_pretrain(cfg, comp) == metrics
    assert (folder / "backbone.pt").stat().st_mtime_ns == stamp
    # Nearest-neighbour table: 2 queries x 4 neighbours, before and after, and a 1-NN accuracy in [0, 1].
    table = pretrain_ssl.neighbour_table("ssl", comp)
    assert len(table["before"]) == 2 and len(table["after"][0]) == 4
    assert table["queries"][0] not in table["after"][0]  # a query is not its own neighbour
    assert 0.0 <= table["knn_after"] <= 1.0


def test_kill_and_resume_matches_an_unbroken_run(comp, monkeypatch):
    ref = tiny(comp, exp="unbroken", ssl_method="byol")
    pretrain_ssl.run_pretrain(ref, comp)
    cfg = tiny(comp, exp="broken", ssl_method="byol")
    calls = {"n": 0}
    real = pretrain_ssl.checkpoint.save_state

    def save_then_die(out, epoch, objects):
        real(out, epoch, objects)
        calls["n"] += 1
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_ssl.checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_ssl.run_pretrain(cfg, comp)
    assert (pretrain_ssl.stage_dir("broken") / "last.pt").exists()
    assert not (pretrain_ssl.stage_dir("broken") / "backbone.pt").exists()
    pretrain_ssl.run_pretrain(cfg, comp)  # resumes at epoch 2
    assert calls["n"] == 2
    a = torch.load(pretrain_ssl.stage_dir("unbroken") / "backbone.pt", weights_only=True)
    b = torch.load(pretrain_ssl.stage_dir("broken") / "backbone.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    np.testing.assert_allclose(pretrain_ssl.training_log("unbroken")["loss"],
                               pretrain_ssl.training_log("broken")["loss"], rtol=1e-5)


def test_worker_processes_decode_and_two_runs_draw_the_same_views(comp, monkeypatch):
    workers = []
    real = torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        workers.append(kwargs.get("num_workers", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_ssl.torch.utils.data, "DataLoader", loader)
    monkeypatch.setattr(pretrain_ssl, "loader_workers", lambda n: 1 if n < 0 else n)  # as on a 2-core machine
    for exp in ("w1", "w2"):
        pretrain_ssl.run_pretrain(tiny(comp, exp=exp, ssl_epochs=1, num_workers=-1), comp)
    assert workers == [1, 1]  # -1: sized to the machine, not 0 (the main process)
    np.testing.assert_allclose(pretrain_ssl.training_log("w1")["loss"], pretrain_ssl.training_log("w2")["loss"],
                               rtol=1e-6)  # the worker's augmentations are seeded per epoch


def test_mae_on_a_tiny_vit_and_refuses_a_cnn(comp):
    with pytest.raises(ValueError, match="needs a ViT"):
        pretrain_ssl.SSLModel(tiny(comp, ssl_method="mae"), create_backbone("mobilenetv3_small_050", "none"))
    cfg = tiny(comp, exp="mae", ssl_method="mae", backbone="vit_tiny_patch16_224", ssl_image_size=224,
               ssl_epochs=1, ssl_batch_size=4, max_images=8, ssl_decoder_dim=64, ssl_decoder_depth=1)
    metrics = pretrain_ssl.run_pretrain(cfg, comp)
    # Pixels are normalised: a masked-patch MSE starts near the per-pixel variance (order 1), and is finite.
    assert metrics["images"] == 8 and 0 < metrics["first_loss"] < 10
    model = ClassifierModel("vit_tiny_patch16_224", 3, pretrained="mae")  # stage 05 on the MAE-trained ViT
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 3)


def test_mae_loss_runs_under_bf16_autocast(comp):
    # Under CUDA AMP the decoder hands back bf16 tokens while its mask token stays float32; lightly's scatter
    # needs one dtype (found on a GPU). CPU autocast in bf16 reproduces the mixed dtypes here.
    cfg = tiny(comp, ssl_method="mae", backbone="vit_tiny_patch16_224", ssl_image_size=224, ssl_decoder_dim=64,
               ssl_decoder_depth=1)
    torch.manual_seed(0)
    model = pretrain_ssl.SSLModel(cfg, create_backbone("vit_tiny_patch16_224", "none"))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = model.loss([torch.randn(2, 3, 224, 224)])
    assert torch.isfinite(loss) and loss.item() > 0


def test_spread_keeps_evenly_spaced_items():
    assert pretrain_ssl.spread(list("abcde"), 3) == ["a", "c", "e"]
    assert pretrain_ssl.spread(list("abcdefghij"), 4) == ["a", "d", "g", "j"]  # positions 0, 3, 6, 9
    assert pretrain_ssl.spread(list("abc"), 0) == ["a", "b", "c"] == pretrain_ssl.spread(list("abc"), 5)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_cnn_methods_train_channels_last_unless_turned_off(comp, monkeypatch, method):
    """The CNN methods feed channels-last views to channels-last weights (faster on the CPU and on CUDA); the
    layout changes rounding only, and is not part of the fingerprint (earlier runs stay valid)."""
    seen: list[tuple[bool, bool]] = []
    real = pretrain_ssl.SSLModel.loss

    def loss(self, views, momentum=0.99):
        conv = next(m for m in self.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        seen.append((all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in views),
                     conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()))
        return real(self, views, momentum)

    monkeypatch.setattr(pretrain_ssl.SSLModel, "loss", loss)
    on, off = tiny(comp, exp=f"{method}-last", ssl_method=method, ssl_epochs=1), \
        tiny(comp, exp=f"{method}-plain", ssl_method=method, ssl_epochs=1, channels_last=False)
    assert on.fingerprint() == dataclasses.replace(off, exp=on.exp).fingerprint()
    pretrain_ssl.run_pretrain(on, comp)
    assert seen and set(seen) == {(True, True)}
    seen.clear()
    pretrain_ssl.run_pretrain(off, comp)
    assert seen and set(seen) == {(False, False)}
    np.testing.assert_allclose(pretrain_ssl.training_log(f"{method}-last")["loss"],
                               pretrain_ssl.training_log(f"{method}-plain")["loss"], rtol=1e-4)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_amp_cpu_runs_the_networks_in_bf16_and_the_criterion_in_float32(comp, method):
    """``amp_cpu``: the backbone's feature maps are bf16 under the stage's context, the criterion's inputs and the
    loss float32, and the bf16 loss is the float32 loss up to bf16 rounding (same weights, same views)."""
    from common.core.runtime import amp_context

    torch.manual_seed(0)
    model = pretrain_ssl.SSLModel(tiny(comp, ssl_method=method, amp=True, amp_cpu=True),
                                  create_backbone("mobilenetv3_small_050", "none")).eval()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    seen = {"features": [], "criterion": []}
    model.backbone.register_forward_hook(lambda m, i, o: seen["features"].append(o.dtype))
    model.criterion.register_forward_pre_hook(lambda m, args: seen["criterion"].append(
        (args[0].dtype, args[1].dtype, torch.is_autocast_enabled("cpu"))))
    with torch.no_grad():
        reference = model.loss(views, momentum=1.0)  # float32 throughout
        with amp_context(torch.device("cpu"), True, True):
            loss = model.loss(views, momentum=1.0)
    assert seen["features"][0] == torch.float32 and seen["features"][-1] == torch.bfloat16
    assert seen["criterion"] and all(d == (torch.float32, torch.float32, False) for d in seen["criterion"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)
    # Without amp, amp_cpu does nothing: the stage's context is a no-op.
    with amp_context(torch.device("cpu"), False, True):
        assert model.loss(views, momentum=1.0).dtype == torch.float32
    assert seen["features"][-1] == torch.float32


def test_run_pretrain_opens_the_amp_cpu_context(comp, monkeypatch):
    calls = []
    real = pretrain_ssl.amp_context

    def recorder(device, enabled, cpu=False):
        calls.append((enabled, cpu))
        return real(device, enabled, cpu)

    monkeypatch.setattr(pretrain_ssl, "amp_context", recorder)
    metrics = pretrain_ssl.run_pretrain(tiny(comp, exp="bf16", ssl_epochs=1, amp=True, amp_cpu=True), comp)
    assert calls and set(calls) == {(True, True)}
    assert np.isfinite(metrics["last_loss"])
