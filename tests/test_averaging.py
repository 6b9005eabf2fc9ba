"""Tests for common.lib.averaging: state-dict means by hand, checkpoint files, epoch selection, ModelEma."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.lib.averaging import (
    UPDATES_KEY,
    ModelEma,
    average_checkpoints,
    average_state_dicts,
    model_weights,
    select_checkpoints,
)


def state(w: list[float], b: float, steps: int) -> dict[str, torch.Tensor]:
    """A tiny state dict: float32 weight, float16 bias, int64 counter (like ``num_batches_tracked``)."""
    return {
        "w": torch.tensor(w, dtype=torch.float32),
        "b": torch.tensor([b], dtype=torch.float16),
        "n": torch.tensor(steps, dtype=torch.int64),
    }


S1, S2, S3 = state([1.0, 2.0], 0.5, 10), state([3.0, 6.0], 1.5, 20), state([0.1, 0.2], 1.0, 30)


# -------------------------------------------------------------------------------------- average_state_dicts
def test_average_state_dicts_uniform_mean():
    got = average_state_dicts([S1, S2, S3])
    # w: ([1, 2] + [3, 6] + [0.1, 0.2]) / 3 in float64, cast to float32 (0.1 and 0.2 are float32 values here)
    expected_w = (torch.stack([S1["w"], S2["w"], S3["w"]]).double().sum(0) / 3).float()
    assert got["w"].dtype == torch.float32
    assert torch.equal(got["w"], expected_w)
    np.testing.assert_allclose(got["w"].numpy(), [4.1 / 3, 8.2 / 3], rtol=1e-6)
    assert got["b"].dtype == torch.float16 and got["b"].item() == 1.0  # (0.5 + 1.5 + 1.0) / 3
    assert got["n"].item() == 30  # integer buffer: from the last state, not averaged (20)


def test_average_state_dicts_weighted():
    got = average_state_dicts([S1, S2], weights=[1.0, 3.0])
    np.testing.assert_array_equal(got["w"].numpy(), [2.5, 5.0])  # (1 * [1, 2] + 3 * [3, 6]) / 4
    assert got["b"].item() == 1.25  # (1 * 0.5 + 3 * 1.5) / 4
    assert got["n"].item() == 20
    # weights are normalised: [2, 6] is the same as [1, 3]
    assert torch.equal(average_state_dicts([S1, S2], weights=[2, 6])["w"], got["w"])
    # weight 0 drops a state
    assert torch.equal(average_state_dicts([S1, S2], weights=[0, 1])["w"], S2["w"])


def test_average_state_dicts_does_not_modify_inputs():
    a, b = state([1.0, 2.0], 0.5, 1), state([3.0, 4.0], 0.5, 2)
    out = average_state_dicts([a, b])
    out["w"] += 100
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [3.0, 4.0]


def test_average_state_dicts_mismatch_names_the_key():
    extra = {**S2, "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"state 1.*'extra\.weight'"):
        average_state_dicts([S1, extra])
    missing = {k: v for k, v in S2.items() if k != "b"}
    with pytest.raises(ValueError, match=r"state 1.*'b'.*missing"):
        average_state_dicts([S1, missing])
    reshaped = {**S2, "w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'w'.*shape \(3,\).*\(2,\)"):
        average_state_dicts([S1, reshaped])
    with pytest.raises(ValueError, match="weights"):
        average_state_dicts([S1, S2], weights=[1.0])
    with pytest.raises(ValueError, match="no states"):
        average_state_dicts([])


# -------------------------------------------------------------------------------------- average_checkpoints
def test_average_checkpoints_plain_and_wrapped(tmp_path):
    plain = tmp_path / "epoch1.pt"
    wrapped = tmp_path / "epoch2.pt"
    torch.save(S1, plain)  # a bare state dict
    torch.save({"model": S2, "optimizer": {"lr": 0.1}, "epoch": 2}, wrapped)  # a training checkpoint
    got = average_checkpoints([plain, str(wrapped)])
    np.testing.assert_array_equal(got["w"].numpy(), [2.0, 4.0])  # ([1, 2] + [3, 6]) / 2
    assert got["b"].item() == 1.0  # (0.5 + 1.5) / 2
    assert got["n"].item() == 20  # from the last file
    assert set(got) == {"w", "b", "n"}  # optimizer and epoch are not model weights


def test_average_checkpoints_errors_name_the_file(tmp_path):
    good = tmp_path / "a.pt"
    torch.save(S1, good)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        average_checkpoints([good, tmp_path / "nope.pt"])
    other = tmp_path / "other.pt"
    torch.save({**S2, "w": torch.zeros(5)}, other)
    with pytest.raises(ValueError, match=r"other\.pt.*'w'"):
        average_checkpoints([good, other])
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(ValueError, match=r"junk\.pt"):
        average_checkpoints([junk])


# -------------------------------------------------------------------------------------- select_checkpoints
def test_select_checkpoints():
    available = [1, 2, 3, 4, 5, 6]
    assert select_checkpoints(available, last_n=3, epochs="5,3") == [3, 4, 5, 6]  # {3, 5} | {4, 5, 6}, sorted
    assert select_checkpoints(available, last_n=2, epochs="3,5") == [3, 5, 6]  # {3, 5} | {5, 6}: a union
    assert select_checkpoints(available, epochs=" 5, 3 ,5") == [3, 5]
    assert select_checkpoints(available, last_n=3) == [4, 5, 6]
    assert select_checkpoints([6, 2, 4], last_n=2) == [4, 6]  # "last" means highest, whatever the order given
    assert select_checkpoints(available, epochs=[2]) == [2]
    assert select_checkpoints(available) == []  # nothing asked for


def test_select_checkpoints_errors():
    with pytest.raises(ValueError, match=r"epoch\(s\) \[7\]"):
        select_checkpoints([1, 2, 3], epochs="2,7")
    with pytest.raises(ValueError, match="'x'"):
        select_checkpoints([1, 2, 3], epochs="2,x")
    with pytest.raises(ValueError, match="last_n=4"):
        select_checkpoints([1, 2, 3], last_n=4)


# ------------------------------------------------------------------------------------------------- ModelEma
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def test_model_ema_one_update_exact():
    model = small_model()
    # dyadic values: d * old + (1 - d) * new is exact in float32, whatever the order of the operations
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    decay = 0.75
    ema = ModelEma(model, decay=decay)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.fill_(5.0)
        model[0].bias.add_(1.0)
    model.train()
    model(torch.randn(8, 2))  # moves BatchNorm's running_mean/var and num_batches_tracked (0 -> 1)
    new = model.state_dict()
    ema.update(model)
    got = ema.state_dict()
    assert torch.equal(got["0.weight"], torch.full((3, 2), 2.0))  # 0.75 * 1 + 0.25 * 5 = 2
    for key in ("0.bias", "1.weight", "1.running_mean", "1.running_var"):  # parameters and float buffers
        torch.testing.assert_close(got[key], decay * old[key] + (1 - decay) * new[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(got["1.running_mean"], old["1.running_mean"])  # the buffer really moved
    assert got["1.num_batches_tracked"].item() == 1  # integer buffer: copied, not averaged (0.25 would be 0)


def test_model_ema_module_is_frozen_eval_copy():
    model = small_model()
    model.train()
    model(torch.randn(4, 2)).sum().backward()  # the trained model has gradients
    ema = ModelEma(model, decay=0.9)
    assert ema.module is not model
    assert not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    model.train()
    ema.update(model)
    assert not ema.module.training  # update never switches it back to train mode
    assert model[0].weight.requires_grad  # the trained model is untouched


def test_model_ema_state_dict_round_trip_and_mismatch():
    model = small_model()
    ema = ModelEma(model, decay=0.5)
    fresh = small_model()
    with torch.no_grad():
        fresh[0].weight.fill_(7.0)
    ema.load_state_dict(fresh.state_dict())
    assert torch.equal(ema.module[0].weight, torch.full((3, 2), 7.0))
    model.load_state_dict(model_weights(ema.state_dict()))  # no prefix: loads into a plain model
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        ema.update(nn.Sequential(nn.Linear(2, 3)))


def test_model_ema_is_timms_update_plus_a_key_check_and_plain_keys():
    from timm.utils import ModelEmaV3

    model = small_model()
    ours, theirs = ModelEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 2)).square().sum().backward()
        opt.step()
        ours.update(model)
        theirs.update(model)
    for key, value in model_weights(ours.state_dict()).items():  # bit for bit the same average
        assert torch.equal(value, theirs.state_dict()[f"module.{key}"]), key
    # What the class adds, and why it is kept: timm's keys carry a "module." prefix (checkpoints of earlier runs
    # hold plain keys), and timm pairs the two state dicts by position, so a model without the BatchNorm
    # updates silently where ours names the missing key.
    assert all(k.startswith("module.") for k in theirs.state_dict())
    theirs.update(nn.Sequential(nn.Linear(2, 3)))
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        ours.update(nn.Sequential(nn.Linear(2, 3)))


def test_model_ema_warmup_decays_by_hand_and_survive_a_resume():
    model = nn.Linear(1, 1, bias=False)
    values = [4.0, 8.0, 16.0, 2.0]
    ema = ModelEma(model, decay=0.5, warmup=True)
    expected = None
    for t, v in enumerate(values[:3], start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        d = min(0.5, 1 - t ** -0.75) if t > 1 else 0.0  # 0, 0.405, 0.5 (capped: 1 - 3^-0.75 = 0.561)
        expected = v if expected is None else d * expected + (1 - d) * v
        assert ema.current_decay() == pytest.approx(d)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5 * (0.4054 * 4 + 0.5946 * 8) + 0.5 * 16, rel=1e-3)  # by hand: 11.19
    state = ema.state_dict()
    assert int(state[UPDATES_KEY]) == 3
    resumed = ModelEma(nn.Linear(1, 1, bias=False), decay=0.5, warmup=True)
    resumed.load_state_dict(state)
    assert resumed.updates == 3 and resumed.module.weight.item() == pytest.approx(expected, rel=1e-6)
    old = ModelEma(nn.Linear(1, 1, bias=False), decay=0.5, warmup=True)
    old.load_state_dict(model_weights(state))  # a checkpoint from before the count was kept: warm-up finished
    with torch.no_grad():
        model.weight.fill_(values[3])
    old.update(model)
    assert old.module.weight.item() == pytest.approx(0.5 * expected + 0.5 * 2.0, rel=1e-6)


def test_model_ema_without_warmup_keeps_the_starting_weights_share():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    plain, warm = ModelEma(model, decay=0.995), ModelEma(model, decay=0.995, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the model moves away from its start and stays there
    for _ in range(200):
        plain.update(model)
        warm.update(model)
    assert plain.module.weight.item() == pytest.approx(1 - 0.995 ** 200, rel=1e-4)  # 0.633: 37 % is the start
    assert warm.module.weight.item() == pytest.approx(1.0)  # the first update copied the model
