"""Multi-process training (common.core.distributed): launch checks, data sharding, and a real 2-process gloo run on
CPU that must reproduce the one-process run of stages 02 and 05."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.core import distributed, runtime
from common.core.distributed import DistInfo, LaunchError, ShardSampler
from common.engine import launch
from common.stages import train_embedder

ROOT = Path(__file__).resolve().parents[1]
FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# ------------------------------------------------------------------------------------------- launch checks
def test_launch_info_single_process_without_torchrun_variables():
    assert distributed.launch_info({}) == DistInfo(0, 1, 0)
    assert distributed.launch_info({}).is_main and not distributed.launch_info({}).enabled


def test_launch_info_reads_torchrun_variables():
    info = distributed.launch_info(FULL)
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.enabled) == (1, 2, 1, False, True)


def test_half_set_launch_names_the_missing_variables():
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT missing"):
        distributed.launch_info({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("bad", [{"RANK": "2"}, {"LOCAL_RANK": "-1"}, {"WORLD_SIZE": "0"}, {"RANK": "x"}])
def test_inconsistent_launch_is_refused(bad):
    with pytest.raises(LaunchError):
        distributed.launch_info({**FULL, **bad})


def test_setup_checks_batch_split_and_sync_bn_before_joining(monkeypatch):
    for k, v in FULL.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LaunchError, match="batch_size=7 does not split over 2 processes"):
        distributed.setup(torch.device("cpu"), 7)
    with pytest.raises(LaunchError, match="sync_bn=True needs CUDA"):
        distributed.setup(torch.device("cpu"), 8, sync_bn=True)


def test_runner_refuses_to_run_under_torchrun(monkeypatch, capsys):
    from common.cli import pipeline

    for k, v in FULL.items():
        monkeypatch.setenv(k, v)
    assert pipeline.main(["--stages", "02"]) == 2
    assert "not started with torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sharding
def test_shard_sampler_splits_each_global_batch():
    order = [5, 3, 8, 1, 0, 2, 7, 4, 6]  # 9 items, global batch 4: two full batches, item 6 dropped
    assert list(ShardSampler(order, 4)) == [5, 3, 8, 1, 0, 2, 7, 4]
    r0, r1 = ShardSampler(order, 4, 0, 2), ShardSampler(order, 4, 1, 2)
    assert r0.per_process_batch == 2 and r0.n_batches == 2  # optimiser steps per epoch
    assert list(r0) == [5, 3, 0, 2]  # batch 1 = {5,3 | 8,1}, batch 2 = {0,2 | 7,4}
    assert list(r1) == [8, 1, 7, 4]


def test_shard_sampler_small_sets():
    assert list(ShardSampler([2, 0, 1], 4)) == [2, 0, 1]  # one process: a single short batch, as drop_last does
    assert ShardSampler([2, 0, 1], 4).n_batches == 1
    with pytest.raises(LaunchError, match="3 training images for a global batch of 4"):
        ShardSampler([2, 0, 1], 4, 0, 2)
    with pytest.raises(LaunchError, match="not a multiple"):
        ShardSampler(range(10), 5, 0, 2)


def test_epoch_order_is_a_seeded_permutation():
    a, b = distributed.epoch_order(10, 3), distributed.epoch_order(10, 3)
    assert a == b and sorted(a) == list(range(10)) and a != distributed.epoch_order(10, 4)


class WorkerSeed(torch.utils.data.Dataset):
    """Each item is the seed of the process that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return torch.initial_seed()


@pytest.mark.parametrize("workers", [0, 1])
def test_starting_an_epoch_loader_draws_nothing_from_the_global_rng(workers):
    info = DistInfo(rank=0, world_size=1, local_rank=0)
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    seeds = [int(s) for b in distributed.epoch_loader(WorkerSeed(), [3, 1, 0, 2], 2, info, workers, cpu, seed=9)
             for s in b]
    assert torch.equal(torch.get_rng_state(), before)  # training draws the same wherever the loader started
    if workers:  # the worker's seed is the loader generator's first draw (worker id 0), not the global RNG's
        first = int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(9)))
        assert seeds == [first] * 4
        again = [int(s) for b in distributed.epoch_loader(WorkerSeed(), [0, 1, 2, 3], 2, info, workers, cpu,
                                                          seed=10) for s in b]
        assert again != seeds


def test_image_augmentation_depends_on_epoch_and_index_only(tmp_path):
    from PIL import Image

    from common.data.competition import ImageDataset, build_transforms

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(files[-1])
    ds = ImageDataset(files, transform=build_transforms(32, True, (0.5,) * 3, (0.5,) * 3))
    ds.sample_seed = 7
    forward = [ds[i]["image"] for i in range(3)]
    backward = [ds[i]["image"] for i in reversed(range(3))][::-1]  # another load order, as another process
    for f, b in zip(forward, backward, strict=True):
        torch.testing.assert_close(f, b)
    ds.sample_seed = 8  # the next epoch draws another augmentation
    assert any(not torch.equal(f, ds[i]["image"]) for i, f in enumerate(forward))


def test_loader_workers_sized_to_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert runtime.loader_workers(3) == 3  # explicit values are kept
    assert runtime.loader_workers(-1) == 8  # 16 cores: capped at 8
    assert runtime.loader_workers(-1, world_size=4) == 3  # 16 / 4 - 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert runtime.loader_workers(-1, world_size=2) == 0


def test_norm_eval_freezes_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    runtime.set_train_mode(model, norm_eval=True)
    assert model[0].training and model[2].training and not model[1].training
    model(torch.randn(8, 4))
    torch.testing.assert_close(model[1].running_mean, torch.zeros(4))  # unchanged by the batch
    runtime.set_train_mode(model, norm_eval=False)
    assert model[1].training


# ----------------------------------------------------------------------------- the real 2-process gloo run
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Stage 02 and stage 05 trained once in this process and once by 2 torchrun processes (gloo, CPU)."""
    from common.config import ClassifierConfig, EmbedderConfig
    from common.data import competition as data_mod
    from common.stages import train_classifier as classify

    work = tmp_path_factory.mktemp("ddp")
    mp = pytest.MonkeyPatch()
    mp.setenv("REID_WORKING_DIR", str(work))
    mp.setenv("REID_PROGRESS", "off")
    comp = data_mod.open_competition("demo_tiny")
    common_args = dict(data="demo_tiny", image_size=64, epochs=2, batch_size=8, n_folds=2, folds="0",
                       norm_eval=True, use_crops=False, device="cpu")
    out = {}
    try:
        for n in (1, 2):
            cfg = EmbedderConfig(exp=f"emb{n}", nproc=n, oof_new_share=0, **common_args)
            log = train_embedder.run_training(cfg, comp, train_embedder.prepare_folds(cfg, comp))
            model = torch.load(work / f"emb{n}" / "02_embedder" / "fold0" / "model.pt", weights_only=True)
            ccfg = ClassifierConfig(exp=f"clf{n}", nproc=n, backbone="mobilenetv3_small_050", pretrained="none",
                                    sampler="balanced", **common_args)
            metrics = classify.run_classification(ccfg, comp)
            clf = torch.load(work / f"clf{n}" / "05_classifier" / "fold0" / "model.pt", weights_only=True)
            out[n] = {"log": log, "model": model, "metrics": metrics, "clf": clf,
                      "clf_log": pd.read_csv(work / f"clf{n}" / "05_classifier" / "fold0" / "log.csv")}
    finally:
        mp.undo()
    out["work"] = work
    return out


def _distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts (floating-point tensors)."""
    return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a if a[k].is_floating_point()) ** 0.5


def _initial_weights(work: Path, exp: str, stage: str, build) -> dict:
    """The fold's starting weights: the training code seeds with seed + fold right before building the model."""
    from common.core import store
    from common.core.runtime import seed_everything

    meta = store.read_json(work / exp / stage / "fold0" / "config.json")
    seed_everything(meta["config"]["seed"])
    return build(meta).state_dict()


def test_two_processes_train_the_embedder_like_one(ddp_runs):
    from common.engine import embedder as train

    one, two = ddp_runs[1], ddp_runs[2]
    for col in ("train_loss", "train_acc", "valid_loss", "valid_acc"):  # epoch 2's loss follows epoch 1's update
        np.testing.assert_allclose(two["log"][col], one["log"][col], rtol=1e-4, atol=1e-6, err_msg=col)
    moved = _distance(one["model"], _initial_weights(ddp_runs["work"], "emb1", "02_embedder", train.build_model))
    # Adam turns float-rounding differences of near-zero gradients into whole steps on a few weights, so the
    # weights are compared as a share of how far training moved them (0 would need bitwise sums). Measured: 1.5e-4
    # on an earlier machine, 1.6e-3 on an AMD EPYC (other vector kernels, other rounding); a real DDP fault (gradients
    # not averaged, the batch not split) moves weights by a large share of `moved`, far above 5e-3.
    assert moved > 1.0
    assert _distance(one["model"], two["model"]) < 5e-3 * moved
    assert set(one["model"]) == set(two["model"])  # plain module keys: no DDP "module." prefix


def test_two_processes_train_the_classifier_like_one(ddp_runs):
    one, two = ddp_runs[1], ddp_runs[2]
    for col in ("train_loss", "valid_loss", "valid_acc"):
        np.testing.assert_allclose(two["clf_log"][col], one["clf_log"][col], rtol=1e-4, atol=1e-6, err_msg=col)
    from common.engine import classifier as classify_train

    moved = _distance(one["clf"], _initial_weights(ddp_runs["work"], "clf1", "05_classifier",
                                                   classify_train.build_model))
    assert moved > 1.0 and _distance(one["clf"], two["clf"]) < 1e-3 * moved
    assert two["metrics"]["oof"]["accuracy"] == pytest.approx(one["metrics"]["oof"]["accuracy"])


def test_only_rank_zero_wrote_and_the_launch_config_is_kept(ddp_runs):
    fold = ddp_runs["work"] / "emb2" / "02_embedder" / "fold0"
    assert (fold / "model.pt").exists() and (fold / "_done.json").exists()
    assert not list(fold.glob("*.tmp-*"))  # no half-written files from a second writer
    assert (ddp_runs["work"] / "emb2" / "02_embedder" / "launch_02.json").exists()


def test_bad_launch_by_hand_fails_with_a_clear_error():
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "REID_PROGRESS": "off"}
    res = subprocess.run([sys.executable, "-m", "common.cli.torchrun", "--stage", "02", "--data", "demo_tiny"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "MASTER_ADDR, MASTER_PORT missing" in res.stderr


def test_torchrun_by_hand_with_an_unsplittable_batch_fails_before_training(tmp_path):
    env = {**os.environ, "REID_WORKING_DIR": str(tmp_path), "REID_PROGRESS": "off"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "common.cli.torchrun", "--stage", "02", "--data", "demo_tiny", "--exp", "bad",
                          "-p", "batch_size=7", "-p", "device=cpu", "-p", "image_size=64", "-p", "n_folds=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "batch_size=7 does not split over 2 processes" in res.stdout + res.stderr
    assert not (tmp_path / "bad" / "02_embedder" / "fold0" / "last.pt").exists()


# ------------------------------------------------------------------ two "nodes" on this machine (multi-node)
def test_torchrun_args_single_and_multi_node():
    assert launch.torchrun_args(2) == ["--standalone", "--nproc_per_node=2"]
    assert launch.torchrun_args(1, 2, 1, "10.0.0.1:29400", "x-02") == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=x-02",
        "--nproc_per_node=1"]
    with pytest.raises(LaunchError, match="rdzv_endpoint"):
        launch.torchrun_args(1, 2, 0, "")


def test_multi_node_parameters_are_checked():
    from common.config import EmbedderConfig

    with pytest.raises(ValueError, match="rdzv_endpoint"):
        EmbedderConfig(exp="x", nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        EmbedderConfig(exp="x", nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    fp = EmbedderConfig(exp="x", nnodes=2, node_rank=1, rdzv_endpoint="h:1").fingerprint()
    assert fp == EmbedderConfig(exp="x").fingerprint()  # where it trained does not change the result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_embedder_like_one_process(ddp_runs):
    """Node 0 through the runner's path (run_training -> launch), node 1 launched alongside it: 2 torchrun
    processes of 1 process each meet at a c10d rendezvous on localhost (gloo) and must match one process."""
    import threading

    from common.config import EmbedderConfig
    from common.data import competition as data_mod
    from common.engine import embedder as train

    work = ddp_runs["work"]
    mp = pytest.MonkeyPatch()
    mp.setenv("REID_WORKING_DIR", str(work))
    mp.setenv("REID_PROGRESS", "off")
    try:
        comp = data_mod.open_competition("demo_tiny")
        ep = f"127.0.0.1:{_free_port()}"
        args = dict(exp="emb_nodes", data="demo_tiny", image_size=64, epochs=2, batch_size=8, n_folds=2, folds="0",
                    norm_eval=True, use_crops=False, device="cpu", nnodes=2, rdzv_endpoint=ep, oof_new_share=0)
        node1_cfg = EmbedderConfig(node_rank=1, **args)
        errors: list[BaseException] = []

        def node1() -> None:
            try:
                launch.launch("02", node1_cfg.to_dict(), 1, work / "node1", nnodes=2, node_rank=1,
                                   rdzv_endpoint=ep)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        thread = threading.Thread(target=node1)
        thread.start()
        cfg = EmbedderConfig(node_rank=0, **args)
        log = train_embedder.run_training(cfg, comp, train_embedder.prepare_folds(cfg, comp))
        thread.join(timeout=300)
        assert not errors, errors
    finally:
        mp.undo()
    one = ddp_runs[1]
    for col in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        np.testing.assert_allclose(log[col], one["log"][col], rtol=1e-4, atol=1e-6, err_msg=col)
    model = torch.load(work / "emb_nodes" / "02_embedder" / "fold0" / "model.pt", weights_only=True)
    moved = _distance(one["model"], _initial_weights(work, "emb1", "02_embedder", train.build_model))
    assert _distance(one["model"], model) < 1e-3 * moved
    launched = (work / "emb_nodes" / "02_embedder" / "launch_02.json").read_text()
    assert '"nnodes": 2' in launched and '"node_rank": 0' in launched
