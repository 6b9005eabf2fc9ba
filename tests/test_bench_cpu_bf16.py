"""bench.cpu_bf16: the CPU flag reading, bf16 outputs close to float32 but not equal (the bf16 path ran), one
training step under bf16 autocast that learns with float32 weights, and a tiny end-to-end run whose report holds
one row per model and case."""

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
                         "--seconds", "0", "--record", "--results", str(results)])
    assert set(out["images_per_s"]) == {(k, c, p) for k in ("classifier", "embedder") for c in ("train", "predict")
                                        for p in ("float32", "bf16")}
    text = results.read_text()
    assert "## bf16 autocast on the CPU (`amp_cpu`)" in text and "--size 32" in text
    assert text.count("| training step (batch 2) |") == 2 and text.count("| prediction (batch 2) |") == 2
    assert "bf16 CPU flags:" in text


def test_bad_arguments_exit():
    with pytest.raises(SystemExit, match="--size"):
        cpu_bf16.main(["--size", "16"])
