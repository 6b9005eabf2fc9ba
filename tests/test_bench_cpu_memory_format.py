"""bench.cpu_memory_format: the timing helper, the layouts computing the same function, one training step that
learns, and a tiny end-to-end run whose report holds one row per case and size."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_memory_format as cmf


def test_images_per_s_counts_calls_and_images():
    calls = []
    rate = cmf.images_per_s(lambda: calls.append(1), 5, 0.0)
    assert len(calls) == 3  # one warm-up, then at least two timed calls
    assert rate > 0


def test_both_layouts_compute_the_same_embeddings(one_torch_thread):
    assert cmf.same_outputs("mobilenetv3_small_050", 4, 32) < 1e-4


def test_a_training_step_changes_the_weights_and_keeps_the_layout(one_torch_thread):
    model, opt = cmf.build("mobilenetv3_small_050", 3, torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = cmf.train_step(model, opt, x, y)
    assert loss > 0
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("arcface.") for k in changed)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_tiny_end_to_end_report(tmp_path, one_torch_thread):
    results = tmp_path / "RESULTS.md"
    out = cmf.main(["--backbone", "mobilenetv3_small_050", "--sizes", "32", "48", "--batch", "2",
                    "--extract-batch", "2", "--classes", "3", "--threads", "1", "--rounds", "1", "--seconds", "0",
                    "--record", "--results", str(results)])
    assert set(out["images_per_s"]) == {(c, s, n) for c in ("train", "extract") for s in (32, 48)
                                        for n in ("contiguous", "channels_last")}
    assert out["max_diff"] < 1e-4
    text = results.read_text()
    assert "## Channels-last on the CPU" in text and "--sizes 32 48" in text
    assert text.count("| training step (batch 2) |") == 2 and text.count("| extraction (batch 2) |") == 2


def test_bad_arguments_exit():
    with pytest.raises(SystemExit, match="--sizes"):
        cmf.main(["--sizes", "16"])
