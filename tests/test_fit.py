"""The shared training loop (common.engine.fit) with a fake task: a two-layer model on synthetic vectors.

Checks the order in which :func:`fit` calls the hooks, that a run killed after an epoch resumes to the same
weights, log and task state as an unbroken one, that the final-weights hook decides ``model.pt``, and the shared
optimiser; no images, no timm, well under a second per run.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from common.config import EmbedderConfig
from common.engine import fit as engine

N_FIT, N_VALID, DIM, CLASSES = 12, 4, 8, 3


class TinyModel(nn.Module):
    """Linear -> dropout -> linear; dropout makes the per-epoch reseeding matter for resuming."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(DIM, CLASSES)

    def backbone_parameters(self):
        return self.body.parameters()

    def head_parameters(self):
        return self.head.parameters()

    def forward(self, x, labels=None):
        return self.head(self.drop(torch.relu(self.body(x))))


class Vectors(torch.utils.data.Dataset):
    """Fixed random vectors; the label is the argmax of the first three coordinates (learnable)."""

    sample_seed = None

    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
        self.labels = self.x[:, :CLASSES].argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.labels[i]}


class Steps:
    """Task state saved in ``last.pt``: optimiser steps taken so far."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state) -> None:
        self.n = int(state["n"])


class FakeTask(engine.Task):
    """Records every hook call; keeps epoch 1's weights as ``epoch1.pt`` and, with ``keep_first``, makes them final."""

    stage = "02"
    model_fields = ("lr", "epochs", "seed", "batch_size")

    def __init__(self, cfg, keep_first: bool = False) -> None:
        super().__init__(cfg)
        self.keep_first = keep_first
        self.calls: list[str] = []
        self.steps = Steps()

    def data_identity(self, comp):
        return {}  # synthetic tensors: no competition files to fingerprint

    def describe(self, comp, fit):
        self.calls.append("describe")
        return {"classes": ["a", "b", "c"], "class_counts": [4, 4, 4]}

    def build_model(self, meta):
        self.calls.append("build_model")
        return TinyModel()

    def initialise(self, model, meta, device):
        self.calls.append("initialise")

    def setup(self, model, device):
        self.calls.append("setup")
        return {"steps": self.steps}

    def datasets(self, fit, valid, meta):
        self.calls.append("datasets")
        assert len(fit) == N_FIT and len(valid) == N_VALID and meta["n_fit"] == N_FIT
        return Vectors(N_FIT, 1), Vectors(N_VALID, 2)

    def epoch_order(self, epoch, n):
        self.calls.append(f"epoch_order {epoch}")
        return super().epoch_order(epoch, n)

    def start_epoch(self, epoch):
        self.calls.append(f"start_epoch {epoch}")

    def loss(self, train_model, x, y, batch):
        self.calls.append("loss")
        logits = train_model(x)
        return F.cross_entropy(logits, y), logits, y

    def after_step(self, model):
        self.calls.append("after_step")
        self.steps.n += 1

    def eval_model(self, model):
        self.calls.append("eval_model")
        return model

    def validate(self, model, loader, device):
        self.calls.append("validate")
        logits = torch.cat([model(b["image"]) for b in loader])
        y = torch.cat([b["label"] for b in loader])
        return {"valid_loss": F.cross_entropy(logits, y).item(), "valid_acc": (logits.argmax(1) == y).float().mean().item()}

    def epoch_weights(self, epoch, model):
        self.calls.append(f"epoch_weights {epoch}")
        return model.state_dict() if epoch == 1 else None

    def final_weights(self, out, model):
        self.calls.append("final_weights")
        if self.keep_first:
            return torch.load(out / "epoch1.pt", weights_only=True)
        return super().final_weights(out, model)


@pytest.fixture
def data(isolated):
    """A competition stand-in (only ``train``'s image and path are read) and its fold table."""
    images = [f"img{i:02d}" for i in range(N_FIT + N_VALID)]
    comp = SimpleNamespace(train=pd.DataFrame({"image": images, "path": [f"/nowhere/{i}.jpg" for i in images]}))
    folds = pd.DataFrame({"image": images, "fold": [0] * N_VALID + [1] * N_FIT})
    return comp, folds


def fake_cfg(**overrides) -> EmbedderConfig:
    values = dict(data="unused", exp="fake", backbone="mobilenetv3_small_050", pretrained="none", epochs=2,
                  batch_size=4, n_folds=2, folds="0", device="cpu", warmup_epochs=0.5, amp=False, use_crops=False)
    return EmbedderConfig(**{**values, **overrides})


def states_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (empty: bit-identical)."""
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_hooks_are_called_in_order(data):
    comp, folds = data
    task = FakeTask(fake_cfg())
    log = engine.fit(task, comp, folds, 0)
    steps = N_FIT // 4
    # The next epoch's order is drawn (and its loader started) before this one validates; the first one's
    # before the model is built.
    epoch = lambda e, later: [f"start_epoch {e}", *["loss", "after_step"] * steps,  # noqa: E731
                              *later, "eval_model", "validate", f"epoch_weights {e}"]
    assert task.calls == ["describe", "datasets", "epoch_order 1", "build_model", "initialise", "setup",
                          *epoch(1, ["epoch_order 2"]), *epoch(2, []), "final_weights"]
    assert list(log.columns) == FakeTask.log_columns() == [
        "epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds", "images_per_s"]
    assert log["epoch"].tolist() == [1, 2] and task.steps.n == 2 * steps
    assert log["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at zero after the last step

    again = FakeTask(fake_cfg())
    pd.testing.assert_frame_equal(engine.fit(again, comp, folds, 0), pd.read_csv(task.fold_dir(0) / "log.csv"))
    assert again.calls == []  # finished with the same parameters: skipped before any hook


def test_resume_after_a_kill_matches_an_unbroken_run(data, monkeypatch):
    comp, folds = data
    engine.fit(FakeTask(fake_cfg(exp="unbroken", epochs=3)), comp, folds, 0)

    cfg = fake_cfg(exp="killed", epochs=3)
    original, n = engine.evaluate, {"calls": 0}

    def dies_in_epoch_2(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(FakeTask(cfg), comp, folds, 0)
    out = engine.fold_dir("killed", "02", 0)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1 and not (out / "model.pt").exists()
    with pytest.raises(RuntimeError, match="checkpoint from other parameters"):
        engine.fit(FakeTask(dataclasses.replace(cfg, lr=1e-2)), comp, folds, 0)

    monkeypatch.setattr(engine, "evaluate", original)
    torch.manual_seed(12345)  # a new process starts from another RNG state
    resumed = FakeTask(cfg)
    log = engine.fit(resumed, comp, folds, 0)
    assert "epoch_order 1" not in resumed.calls and resumed.calls.count("validate") == 2
    assert "initialise" not in resumed.calls  # the weights come from last.pt
    assert resumed.steps.n == 3 * (N_FIT // 4)  # the task's own state came back from last.pt
    assert log["epoch"].tolist() == [1, 2, 3]
    ref_dir = engine.fold_dir("unbroken", "02", 0)
    assert not states_equal(torch.load(ref_dir / "model.pt", weights_only=True),
                            torch.load(out / "model.pt", weights_only=True))
    ref_log = pd.read_csv(ref_dir / "log.csv")
    cols = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr"]
    pd.testing.assert_frame_equal(log[cols], ref_log[cols])


class Marked(Vectors):
    """Vectors whose loading leaves a file ``<sample_seed>-<index>`` in ``folder`` (seen across processes)."""

    def __init__(self, n: int, seed: int, folder) -> None:
        super().__init__(n, seed)
        self.folder = folder

    def __getitem__(self, i):
        (self.folder / f"{self.sample_seed}-{i}").touch()
        return super().__getitem__(i)


def wait_for(folder, prefix: str, seconds: float = 30.0) -> bool:
    """Whether a file named ``prefix*`` appears in ``folder`` within ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if any(folder.glob(prefix + "*")):
            return True
        time.sleep(0.01)
    return False


def test_loader_workers_load_while_the_model_is_built_and_while_an_epoch_validates(data, tmp_path):
    comp, folds = data
    marks = tmp_path / "marks"
    marks.mkdir()
    seen: dict[str, bool] = {}

    class Prefetched(FakeTask):
        def datasets(self, fit, valid, meta):
            return Marked(N_FIT, 1, marks), Vectors(N_VALID, 2)

        def build_model(self, meta):  # the first epoch's images load before the model exists
            seen["epoch 1 before the model"] = wait_for(marks, f"{self.cfg.seed * 1000 + 1}-")
            return super().build_model(meta)

        def validate(self, model, loader, device):  # epoch 2's load while epoch 1 validates
            if "epoch 2 during validation" not in seen:
                seen["epoch 2 during validation"] = wait_for(marks, f"{self.cfg.seed * 1000 + 2}-")
            return super().validate(model, loader, device)

    log = engine.fit(Prefetched(fake_cfg(exp="prefetch", num_workers=1)), comp, folds, 0)
    assert seen == {"epoch 1 before the model": True, "epoch 2 during validation": True}
    assert log["epoch"].tolist() == [1, 2]
    # With workers or without, the same training: where the loader starts draws nothing from the global RNG.
    engine.fit(FakeTask(fake_cfg(exp="inline", num_workers=0)), comp, folds, 0)
    assert not states_equal(torch.load(engine.fold_dir("prefetch", "02", 0) / "model.pt", weights_only=True),
                            torch.load(engine.fold_dir("inline", "02", 0) / "model.pt", weights_only=True))


def test_final_weights_hook_decides_model_pt(data):
    comp, folds = data
    task = FakeTask(fake_cfg(exp="first", epochs=3), keep_first=True)
    engine.fit(task, comp, folds, 0)
    out = task.fold_dir(0)
    final = torch.load(out / "model.pt", weights_only=True)
    assert sorted(p.name for p in out.glob("epoch*.pt")) == ["epoch1.pt"]
    assert not states_equal(final, torch.load(out / "epoch1.pt", weights_only=True))
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    assert states_equal(final, last)  # training went on after epoch 1, yet model.pt holds epoch 1's weights

    plain = FakeTask(fake_cfg(exp="last", epochs=3))  # the default hook: the last epoch's weights
    engine.fit(plain, comp, folds, 0)
    assert not states_equal(torch.load(plain.fold_dir(0) / "model.pt", weights_only=True),
                            torch.load(plain.fold_dir(0) / "last.pt", weights_only=True)["model"])


def test_build_optimizer_groups_and_choice():
    model, cfg = TinyModel(), fake_cfg(lr=1e-3, head_lr_mult=10.0, weight_decay=0.05)
    opt = engine.build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(1e-2)]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # body weight+bias, head weight+bias
    assert opt.param_groups[1]["params"][0] is model.head.weight
    radam = engine.build_optimizer(model, cfg, "radam")
    assert isinstance(radam, torch.optim.RAdam) and radam.defaults["decoupled_weight_decay"]
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        engine.build_optimizer(model, cfg, "sgd")


def test_evaluate_of_an_empty_set_is_nan_without_calling_the_task():
    task = FakeTask(fake_cfg())
    got = engine.evaluate(TinyModel(), Vectors(0, 0), task, torch.device("cpu"))
    assert list(got) == ["valid_loss", "valid_acc"] and all(v != v for v in got.values())
    assert task.calls == []


class LayoutProbe(nn.Module):
    """Logits = each channel's mean (3 channels, 3 classes); records whether each batch came channels-last."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        logits = x.mean((2, 3))
        return {"logits": logits} if self.as_dict else logits


class Images(torch.utils.data.Dataset):
    """Four 3x4x4 images whose channel ``label`` is 1 (the last one's channel 0: one wrong answer of four)."""

    labels = [0, 1, 2, 1]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        x = torch.zeros(3, 4, 4)
        x[0 if i == 3 else self.labels[i]] = 1.0
        return {"image": x, "label": self.labels[i]}


@pytest.mark.parametrize("channels_last", [True, False])
def test_both_tasks_validate_in_the_training_layout(channels_last):
    """Validation feeds the batches in the layout the model trained in (channels-last unless turned off): the
    embedder's and the classifier's ``validate`` alike, with the same metrics either way."""
    from common.config import ClassifierConfig
    from common.engine.classifier import ClassifierTask
    from common.engine.embedder import EmbedderTask

    loader = torch.utils.data.DataLoader(Images(), batch_size=2)
    cpu = torch.device("cpu")
    want_loss = F.cross_entropy(torch.eye(3)[[0, 1, 2, 0]], torch.tensor(Images.labels)).item()

    embedder = LayoutProbe(as_dict=True)
    got = EmbedderTask(fake_cfg(channels_last=channels_last)).validate(embedder, loader, cpu)
    assert embedder.seen == [channels_last, channels_last]
    assert got == {"valid_loss": pytest.approx(want_loss), "valid_acc": 0.75}

    task = ClassifierTask(ClassifierConfig(data="unused", exp="fake", device="cpu", channels_last=channels_last))
    task.n_classes = 3
    classifier = LayoutProbe(as_dict=False)
    got = task.validate(classifier, loader, cpu)
    assert classifier.seen == [channels_last, channels_last]
    assert got["valid_acc"] == 0.75 and got["valid_loss"] == pytest.approx(want_loss)
    assert got["valid_balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)  # class 1: one of its two right


@pytest.mark.parametrize(("amp", "amp_cpu"), [(True, False), (False, False), (True, True)])
def test_both_tasks_validate_under_the_amp_setting(amp, amp_cpu, monkeypatch):
    """Validation runs each batch's forward inside ``amp_context(device, cfg.amp, cfg.amp_cpu)``, as training and
    prediction do (the classifier's once ran it in float32 whatever ``amp`` said)."""
    import contextlib

    from common.config import ClassifierConfig
    from common.engine import classifier, embedder

    entered = []

    @contextlib.contextmanager
    def recorder(device, enabled, cpu=False):
        entered.append((enabled, cpu))
        yield

    monkeypatch.setattr(classifier, "amp_context", recorder)
    monkeypatch.setattr(embedder, "amp_context", recorder)
    loader = torch.utils.data.DataLoader(Images(), batch_size=2)
    cpu = torch.device("cpu")

    embedder.EmbedderTask(fake_cfg(amp=amp, amp_cpu=amp_cpu)).validate(LayoutProbe(as_dict=True), loader, cpu)
    assert entered == [(amp, amp_cpu)] * 2
    entered.clear()
    task = classifier.ClassifierTask(ClassifierConfig(data="unused", exp="fake", device="cpu", amp=amp,
                                                      amp_cpu=amp_cpu))
    task.n_classes = 3
    got = task.validate(LayoutProbe(as_dict=False), loader, cpu)
    assert entered == [(amp, amp_cpu)] * 2 and got["valid_acc"] == 0.75
