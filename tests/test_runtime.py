"""common.core.runtime: device choice, seeding, progress bars."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from common.core import runtime

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device("auto").type == expected
    assert runtime.resolve_device().type == expected
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_resolve_device_cuda_without_cuda(name):
    with pytest.raises(RuntimeError, match=f"device='{name}' but CUDA is not available"):
        runtime.resolve_device(name)


@no_cuda
def test_amp_is_off_on_cpu():
    cpu = torch.device("cpu")
    assert not runtime.needs_grad_scaler(cpu, True)
    with runtime.amp_context(cpu, True):
        assert not torch.is_autocast_enabled()
        assert not torch.is_autocast_cpu_enabled()


def test_amp_cpu_runs_bf16_autocast_on_the_cpu_only_when_asked():
    """``cpu=True`` (the configs' ``amp_cpu``): a matmul under the context gives bf16 on the CPU; with ``enabled``
    off, or without ``cpu``, it stays float32; the weights themselves stay float32."""
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with runtime.amp_context(cpu, True, cpu=True):
        assert torch.is_autocast_cpu_enabled()
        assert layer(x).dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32
    for enabled, on_cpu in ((False, True), (True, False)):
        with runtime.amp_context(cpu, enabled, cpu=on_cpu):
            assert layer(x).dtype == torch.float32
    assert not runtime.needs_grad_scaler(cpu, True)  # bf16 needs no loss scaling


def draw() -> tuple:
    return random.random(), np.random.rand(), torch.rand(2).tolist()


def test_seed_everything_reproducible():
    runtime.seed_everything(123)
    first = draw()
    runtime.seed_everything(123)
    assert draw() == first
    runtime.seed_everything(124)
    assert draw() != first


def test_progress_text(monkeypatch):
    monkeypatch.setenv("REID_PROGRESS", "text")
    monkeypatch.setenv("REID_PROGRESS_INTERVAL", "3")
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")  # a stream that could take Unicode bars
    bar = runtime.progress(range(3), total=3, file=out)
    assert list(bar) == [0, 1, 2]
    assert bar.mininterval == 3.0 and bar.ascii is True
    out.flush()
    text = raw.getvalue().decode()
    assert "3/3" in text and text.isascii()  # plain ASCII, no block characters


def test_progress_off(monkeypatch):
    monkeypatch.setenv("REID_PROGRESS", "off")
    out = io.StringIO()
    bar = runtime.progress(range(3), file=out)
    assert list(bar) == [0, 1, 2]
    assert bar.disable and out.getvalue() == ""


def test_progress_default(monkeypatch):
    monkeypatch.delenv("REID_PROGRESS", raising=False)
    out = io.StringIO()
    bar = runtime.progress(range(2), file=out)
    assert list(bar) == [0, 1]
    assert bar.mininterval == 0.1  # tqdm's own default: the env interval only applies to text mode


def test_to_memory_format_channels_last_on_cpu_when_asked():
    cpu = torch.device("cpu")
    x = torch.randn(2, 3, 8, 8)
    assert runtime.to_memory_format(x, cpu, True).is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous(memory_format=torch.channels_last)  # a new tensor, the input is kept
    off = runtime.to_memory_format(x, cpu, False)
    assert off is x
    flat = torch.randn(2, 3, 8)  # not 4-d: unchanged
    assert runtime.to_memory_format(flat, cpu, True) is flat
    conv = torch.nn.Conv2d(3, 4, 3)
    runtime.to_memory_format(conv, cpu, True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    meta = torch.device("meta")  # other device types are left alone
    assert runtime.to_memory_format(x, meta, True) is x
