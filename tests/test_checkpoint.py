"""common.core.checkpoint: the skip / refuse / save / resume rules shared by stages 02 and 05, on a tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from common.core import checkpoint, store


def test_finished_log_skips_refuses_and_forces(tmp_path):
    out = tmp_path / "fold0"
    assert checkpoint.finished_log(out, {"lr": 1.0}, force=False) is None  # nothing yet: train
    store.write_csv(out / "log.csv", pd.DataFrame({"epoch": [1], "train_loss": [0.5]}))
    store.mark_done(out, {"lr": 1.0})
    assert checkpoint.finished_log(out, {"lr": 1.0}, force=False)["train_loss"].tolist() == [0.5]
    with pytest.raises(RuntimeError, match="other parameters"):
        checkpoint.finished_log(out, {"lr": 2.0}, force=False)
    # a model field added to the code after the fold finished: at its default the fold is reused, else refused
    defaults = {"lr": 0.1, "freeze_blocks": 0}
    assert checkpoint.finished_log(out, {"lr": 1.0, "freeze_blocks": 0}, False, defaults)["train_loss"].tolist() == [0.5]
    with pytest.raises(RuntimeError, match=r"changed: freeze_blocks\)"):
        checkpoint.finished_log(out, {"lr": 1.0, "freeze_blocks": 2}, False, defaults)
    # a fold finished by a newer version, with a model field this version lacks: refused, and the field named
    newer = tmp_path / "newer"
    store.write_csv(newer / "log.csv", pd.DataFrame({"epoch": [1], "train_loss": [0.5]}))
    store.mark_done(newer, {"lr": 1.0, "probe_init": False})
    with pytest.raises(RuntimeError, match=r"changed: probe_init, which this version does not know"):
        checkpoint.finished_log(newer, {"lr": 1.0}, force=False)
    assert checkpoint.finished_log(out, {"lr": 2.0}, force=True) is None
    assert not out.exists()  # force deleted the old fold


def test_check_resumable_compares_the_given_fields(tmp_path):
    out = tmp_path / "fold0"
    checkpoint.check_resumable(out, {"lr": 1.0})  # no last.pt: nothing to compare
    store.write_json(out / "config.json", {"config": {"lr": 1.0, "num_workers": 4}})
    torch.save({"epoch": 1}, out / "last.pt")
    checkpoint.check_resumable(out, {"lr": 1.0})  # num_workers is not a model field: ignored
    with pytest.raises(RuntimeError, match="last.pt: checkpoint from other parameters"):
        checkpoint.check_resumable(out, {"lr": 3.0})
    checkpoint.check_resumable(out, {"lr": 1.0, "freeze_blocks": 0}, {"freeze_blocks": 0})  # added at its default
    with pytest.raises(RuntimeError, match="freeze_blocks"):
        checkpoint.check_resumable(out, {"lr": 1.0, "freeze_blocks": 0})
    # started by a newer version, whose config.json lists a model field this version lacks: refused, named
    store.write_json(out / "config.json", {"config": {"lr": 1.0, "probe_init": True, "num_workers": 4},
                                           "model_fields": ["lr", "probe_init"]})
    with pytest.raises(RuntimeError, match=r"changed: probe_init, which this version does not know"):
        checkpoint.check_resumable(out, {"lr": 1.0})
    checkpoint.check_resumable(out, {"lr": 1.0, "probe_init": True})  # the version that knows it resumes


def test_save_then_resume_restores_every_object_and_trims_the_log(tmp_path):
    out = tmp_path / "fold0"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    checkpoint.save_state(out, 2, {"model": model, "optimizer": opt, "ema": None})
    # the log already has epoch 3 (killed after writing it, before its checkpoint): that row is dropped
    store.write_csv(out / "log.csv", pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0]}))

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    epoch, rows = checkpoint.resume(out, {"model": fresh, "optimizer": fresh_opt, "ema": None})
    assert epoch == 2 and [r["epoch"] for r in rows] == [1, 2]
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    with pytest.raises(RuntimeError, match="no 'criterion' state"):
        checkpoint.resume(out, {"criterion": torch.nn.Linear(3, 2)})
    assert checkpoint.resume(tmp_path / "empty", {"model": fresh}) == (0, [])
    assert checkpoint.saved_epoch(out) == 2 and checkpoint.saved_epoch(tmp_path / "empty") == 0
