"""bench.cpu_bf16: the CPU flag reading, bf16 outputs close to float32 but not equal (the bf16 path ran), one
training step under bf16 autocast that learns with float32 weights, and a tiny end-to-end run whose report holds
one row per model and case, and the stage-05 epoch row: real runs of the engine, the bf16 one with amp_cpu on."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_bf16


def test_cpu_flags_lists_only_the_bf16_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu avx2 avx512f amx_bf16 sse\n")
    real_path = cpu_bf16.Path
    monkeypatch.setattr(cpu_bf16, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert cpu_bf16.cpu_flags() == ["amx_bf16"]
    cpuinfo.write_text("flags\t\t: fpu avx2\n")
    assert cpu_bf16.cpu_flags() == []


@pytest.mark.parametrize("kind", ["classifier", "embedder"])
def test_bf16_outputs_are_close_to_float32_and_not_equal(kind, one_torch_thread):
    diff = cpu_bf16.relative_difference(kind, "mobilenetv3_small_050", 5, 32)
    assert 0 < diff < 0.1


@pytest.mark.parametrize("kind", ["classifier", "embedder"])
def test_a_bf16_training_step_changes_float32_weights(kind, one_torch_thread):
    model, opt, train_forward, _ = cpu_bf16.build(kind, "mobilenetv3_small_050", 3)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cpu_bf16.train_step(model, opt, train_forward, True, x, y) > 0
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tiny_end_to_end_report(tmp_path, one_torch_thread):
    results = tmp_path / "RESULTS.md"
    out = cpu_bf16.main(["--backbone", "mobilenetv3_small_050", "--size", "32", "--batch", "2",
                         "--predict-batch", "2", "--classes", "3", "--threads", "1", "--rounds", "1",
                         "--seconds", "0", "--epoch-data", "none", "--record", "--results", str(results)])
    assert set(out["images_per_s"]) == {(k, c, p) for k in ("classifier", "embedder") for c in ("train", "predict")
                                        for p in ("float32", "bf16")}
    text = results.read_text()
    assert "## bf16 autocast on the CPU (`amp_cpu`)" in text and "--size 32" in text
    assert text.count("| training step (batch 2) |") == 2 and text.count("| prediction (batch 2) |") == 2
    assert "bf16 CPU flags:" in text
    assert "one training epoch" not in text and out["epoch_images_per_s"] is None


def _epoch_args(**over):
    base = dict(backbone="mobilenetv3_small_050", size=32, batch=4, epoch_images=16, epoch_folds=3)
    return type("Args", (), base | over)()


def test_epoch_runs_stage_05_with_amp_cpu_as_asked(tiny_demo_root, tmp_path, one_torch_thread):
    from common.core import store

    for bf16 in (False, True):
        ips = cpu_bf16.epoch_images_per_s(tiny_demo_root, bf16, 0, _epoch_args(), tmp_path)
        assert ips > 0
        exp = f"cpu-bf16-epoch-{'bf16' if bf16 else 'float32'}-0"
        fold = tmp_path / exp / "05_classifier" / "fold0"
        meta = store.read_json(fold / "config.json")
        assert meta["config"]["amp_cpu"] is bf16 and meta["config"]["max_images"] == 16
        log = (fold / "log.csv").read_text().splitlines()
        assert len(log) == 3  # header + two epochs; the first is not validated (training alone is timed)
        assert log[1].split(",")[3] in ("", "nan")


def test_epoch_data_choices(tmp_path, tiny_demo_root):
    assert cpu_bf16.epoch_data("none", tmp_path) is None
    assert cpu_bf16.epoch_data(str(tiny_demo_root), tmp_path) == tiny_demo_root
    with pytest.raises(SystemExit, match="no train.csv"):
        cpu_bf16.epoch_data(str(tmp_path), tmp_path)


def test_end_to_end_report_with_the_epoch_row(tmp_path, tiny_demo_root, one_torch_thread):
    results = tmp_path / "RESULTS.md"
    out = cpu_bf16.main(["--backbone", "mobilenetv3_small_050", "--models", "classifier", "--size", "32",
                         "--batch", "4", "--predict-batch", "2", "--classes", "3", "--threads", "1", "--rounds", "1",
                         "--seconds", "0", "--epoch-data", str(tiny_demo_root), "--epoch-images", "16",
                         "--epoch-folds", "3", "--record", "--results", str(results)])
    assert set(out["epoch_images_per_s"]) == {"float32", "bf16"}
    row = next(line for line in results.read_text().splitlines() if "one training epoch" in line)
    assert "16 images of `" in row and "fold 0 of 3 held out" in row and "(batch 4)" in row
    a, b, ratio = (float(c) for c in row.strip("|").split("|")[2:5])
    assert ratio == pytest.approx(b / a, abs=0.01)


def test_bad_arguments_exit():
    with pytest.raises(SystemExit, match="--size"):
        cpu_bf16.main(["--size", "16"])
    with pytest.raises(SystemExit, match="--epoch-folds"):
        cpu_bf16.main(["--epoch-folds", "1"])
