"""The open-set split of bench/reid_openset.py: whole individuals held out as new, one image of about half of
the others with three or more images as known test images, deterministic."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return importlib.import_module("bench.reid_openset")


def test_open_set_split():
    bench = _bench()
    # 20 individuals: i0..i9 with 4 images, i10..i19 with 2 images
    rows = [(f"i{k}", f"i{k}_{j}.jpg") for k in range(20) for j in range(4 if k < 10 else 2)]
    table = pd.DataFrame(rows, columns=["individual_id", "image"])
    split = bench.open_set_split(table, seed=0)
    assert split.equals(bench.open_set_split(table, seed=0))  # deterministic
    test_ids = table.loc[split == "test", "individual_id"]
    train_ids = set(table.loc[split == "train", "individual_id"])
    new = set(test_ids) - train_ids
    assert len(new) == 4  # 20% of 20 individuals, all their images in test
    for ind in new:
        assert (split[table["individual_id"] == ind] == "test").all()
    known_test = test_ids[test_ids.isin(train_ids)]
    assert known_test.is_unique  # one image each
    counts = table["individual_id"].value_counts()
    assert (counts[known_test] >= 3).all()
    eligible = [i for i in counts.index if counts[i] >= 3 and i not in new]
    assert len(known_test) == len(eligible) // 2


def test_open_set_split_with_a_known_share():
    bench = _bench()
    # 40 individuals with 10 images each, 5 singletons
    rows = [(f"i{k}", f"i{k}_{j}.jpg") for k in range(40) for j in range(10)]
    rows += [(f"s{k}", f"s{k}.jpg") for k in range(5)]
    table = pd.DataFrame(rows, columns=["individual_id", "image"])
    split = bench.open_set_split(table, seed=1, known_share=0.25)
    assert split.equals(bench.open_set_split(table, seed=1, known_share=0.25))
    train_ids = set(table.loc[split == "train", "individual_id"])
    test = table[split == "test"]
    new = set(test["individual_id"]) - train_ids
    assert len(new) == 9  # round(0.2 * 45)
    known = test[test["individual_id"].isin(train_ids)]
    assert not known["individual_id"].str.startswith("s").any()  # a singleton stays in train (or is new)
    eligible = table[~table["individual_id"].isin(new) & table["individual_id"].str.startswith("i")]
    assert 0.18 < len(known) / len(eligible) < 0.32  # about a quarter of their images
    kept = table[split == "train"]["individual_id"].value_counts()
    assert (kept.reindex(sorted(set(eligible["individual_id"]))) >= 1).all()  # each keeps a gallery image


def test_paired_differences_match_seeds_and_skip_missing_values():
    bench = _bench()
    imagenet = [{"seed": 0, "map5": 0.60, "map5_known": 0.30}, {"seed": 1, "map5": 0.70, "map5_known": None}]
    ssl = [{"seed": 1, "map5": 0.65, "map5_known": 0.2}, {"seed": 0, "map5": 0.62, "map5_known": 0.35},
           {"seed": 2, "map5": 0.9, "map5_known": 0.9}]  # seed 2 has no ImageNet run: left out
    assert bench.paired(imagenet, ssl, "map5") == pytest.approx([-0.05, 0.02])
    assert bench.paired(imagenet, ssl, "map5_known") == pytest.approx([0.05])  # seed 1's ImageNet value is missing


def test_ssl_params_pretrain_at_the_run_size_from_imagenet():
    bench = _bench()
    args = argparse.Namespace(dataset="nyala", tag="full", ssl="simclr", ssl_epochs=6)
    pre = bench.ssl_params(args, {"image_size": 160, "epochs": 10}, Path("/tmp/comp"))
    assert pre["exp"] == "bench-openset-nyala-full-ssl-simclr6"
    assert (pre["ssl_method"], pre["ssl_epochs"], pre["ssl_image_size"], pre["ssl_pretrained"]) == ("simclr", 6, 160, "auto")
    assert pre["data"] == "/tmp/comp" and pre["epochs"] == 10  # the run's own parameters are kept


def test_pair_prefix_and_overrides():
    bench = _bench()
    assert bench.pair_prefix(["crop=auto"]) == "crop-auto-"
    assert bench.pair_prefix(["image_size=256", "detector_model=a/b"]) == "image_size-256-detector_model-a-b-"
    assert bench.pair_prefix(["crop=none"], 100) == "crop-none-seed-100-"
    assert bench.overrides(["crop=auto", "image_size=256", "full_fit=true"]) == {
        "crop": "auto", "image_size": 256, "full_fit": True}
    assert bench.overrides(["05.backbone=resnet18"]) == {"05.backbone": "resnet18"}  # per stage, as the pipeline
    with pytest.raises(SystemExit, match="--pair 'crop': expected key=value"):
        bench.overrides(["crop"], "--pair")
    # a typo fails before any training, naming the flag, the item and the parameter
    with pytest.raises(SystemExit, match="--pair 'cam_treshold=0.5'.*unknown parameter 'cam_treshold'"):
        bench.overrides(["crop=auto", "cam_treshold=0.5"], "--pair")
    with pytest.raises(SystemExit, match="-p '09.epochs=1'.*unknown stage '09'"):
        bench.overrides(["09.epochs=1"])


def _fake_pair_pipeline(tmp_path, monkeypatch, bench, score: dict) -> list:
    """A 10-individual table and a fake ``pipeline.run`` scoring each arm by ``score[<exp minus tag and seed>]``
    plus seed / 100; returns the list of (stages, params) calls it records."""
    from conftest import isolate_dirs

    from common.cli import pipeline
    from common.core import paths

    isolate_dirs(tmp_path, monkeypatch)
    rows = []
    for k in range(10):  # 10 individuals x 3 images: 2 new, half of the other 8 with one known test image
        (tmp_path / "src" / f"i{k}").mkdir(parents=True)
        for j in range(3):
            f = tmp_path / "src" / f"i{k}" / f"{j}.jpg"
            f.write_bytes(b"not decoded here")
            rows.append((str(f), f"i{k}__{j}.jpg", f"i{k}"))
    monkeypatch.setattr(bench, "list_images", lambda dataset: pd.DataFrame(rows, columns=["source", "image",
                                                                                          "individual_id"]))
    calls = []

    def run(stages, params, log_output=True, **kwargs):
        calls.append((tuple(stages), params))
        arm = params["exp"].removeprefix("bench-openset-nyala-t-").rstrip("0123456789")
        metrics = {"map5": score[arm] + params["seed"] % 100 / 100, "map5_known": 0.3, "map5_new": 0.9,
                   "threshold": 0.5}
        if stages[0] == "01" and params["crop"] == "auto":  # what stage 01 writes for CAM crops
            folder = paths.stage_dir(params["exp"], "01")
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"crop_method": "CAM", "train_crop_area_median": 0.8}))
        if stages == ["06"]:
            folder = paths.stage_dir(params["exp"], "06")
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"retrieval": metrics}))
        return metrics

    monkeypatch.setattr(pipeline, "run", run)
    return calls


def test_pair_runs_a_second_arm_and_stage_06_over_both(tmp_path, monkeypatch, capsys):
    """``--pair crop=auto``: every seed again with the pair's overrides (its own experiment names), then stage 06
    with ``embed_members`` = both arms of that seed; the table has both arms, the ensemble and the paired rows."""
    bench = _bench()
    calls = _fake_pair_pipeline(tmp_path, monkeypatch, bench,
                                {"s": 0.60, "crop-auto-s": 0.62, "ens-crop-auto-s": 0.66})
    bench.main(["--dataset", "nyala", "--seeds", "0,1", "--tag", "t", "--no-baseline", "-p", "crop=none",
                "--pair", "crop=auto"])
    trained = [(p["exp"], p["crop"], p["seed"]) for s, p in calls if s == ("01", "02", "03", "04")]
    assert trained == [("bench-openset-nyala-t-s0", "none", 0), ("bench-openset-nyala-t-s1", "none", 1),
                       ("bench-openset-nyala-t-crop-auto-s0", "auto", 0),
                       ("bench-openset-nyala-t-crop-auto-s1", "auto", 1)]
    ensembles = [(p["exp"], p["embed_members"], p["seed"]) for s, p in calls if s == ("06",)]
    assert all(p["members"] == "" and p["blend_ratio"] == 0 for s, p in calls if s == ("06",))  # retrieval only
    assert ensembles == [
        ("bench-openset-nyala-t-ens-crop-auto-s0", "bench-openset-nyala-t-s0,bench-openset-nyala-t-crop-auto-s0", 0),
        ("bench-openset-nyala-t-ens-crop-auto-s1", "bench-openset-nyala-t-s1,bench-openset-nyala-t-crop-auto-s1", 1)]
    out = capsys.readouterr().out
    assert "crops: CAM (median train crop keeps 80% of the frame)" in out
    assert "| pipeline (crop=none) (2 seed(s): mean ± sd) | 0.605 ± 0.007 |" in out
    assert "| pipeline with crop=auto (2 seed(s): mean ± sd) | 0.625 ± 0.007 |" in out
    assert "| crop=auto minus the first arm, paired by seed | 0.020 ± 0.000 |" in out
    assert "| stage 06: both arms' embeddings concatenated (one search) (2 seed(s): mean ± sd) | 0.665 ± 0.007 |" in out
    assert "| the ensemble minus the first arm, paired by seed | 0.060 ± 0.000 |" in out


def test_pair_seed_offset_trains_the_second_arm_with_another_seed(tmp_path, monkeypatch, capsys):
    """``--pair crop=none --pair-seed-offset 100``: the control arm trains with seed + 100 under its own names, is
    still paired with (and ensembled with) the first arm's seed, and its rows say so."""
    bench = _bench()
    calls = _fake_pair_pipeline(tmp_path, monkeypatch, bench,
                                {"s": 0.60, "crop-none-seed-100-s": 0.61, "ens-crop-none-seed-100-s": 0.64})
    bench.main(["--dataset", "nyala", "--seeds", "0,1", "--tag", "t", "--no-baseline", "-p", "crop=none",
                "--pair", "crop=none", "--pair-seed-offset", "100"])
    trained = [(p["exp"], p["crop"], p["seed"], p.get("fold_seed")) for s, p in calls if s == ("01", "02", "03", "04")]
    assert trained == [("bench-openset-nyala-t-s0", "none", 0, None), ("bench-openset-nyala-t-s1", "none", 1, None),
                       ("bench-openset-nyala-t-crop-none-seed-100-s0", "none", 100, 0),  # the first arm's split
                       ("bench-openset-nyala-t-crop-none-seed-100-s1", "none", 101, 1)]
    ensembles = [(p["embed_members"], p["seed"]) for s, p in calls if s == ("06",)]
    assert ensembles == [("bench-openset-nyala-t-s0,bench-openset-nyala-t-crop-none-seed-100-s0", 0),
                         ("bench-openset-nyala-t-s1,bench-openset-nyala-t-crop-none-seed-100-s1", 1)]
    out = capsys.readouterr().out
    assert "| pipeline with crop=none (seed +100) (2 seed(s): mean ± sd) | 0.615 ± 0.007 |" in out
    assert "| crop=none (seed +100) minus the first arm, paired by seed | 0.010 ± 0.000 |" in out
    assert "| the ensemble minus the first arm, paired by seed | 0.040 ± 0.000 |" in out
    assert "crop=none (seed +100) seed 1: OOF MAP@5" in out


def test_a_pair_seed_offset_without_a_pair_fails_before_any_work(monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "list_images", lambda dataset: pytest.fail("the dataset was read"))
    with pytest.raises(SystemExit, match="--pair-seed-offset: needs --pair"):
        bench.main(["--dataset", "nyala", "--pair-seed-offset", "100"])


def test_a_malformed_pair_fails_before_any_work(monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "list_images", lambda dataset: pytest.fail("read the dataset before the check"))
    with pytest.raises(SystemExit, match="--pair 'crop': expected key=value"):
        bench.main(["--dataset", "nyala", "--pair", "crop"])
    with pytest.raises(SystemExit, match="unknown parameter 'cam_treshold'"):
        bench.main(["--dataset", "nyala", "--pair", "cam_treshold=0.5"])
    with pytest.raises(SystemExit, match="-p 'imagesize=256'.*unknown parameter 'imagesize'"):
        bench.main(["--dataset", "nyala", "-p", "imagesize=256"])


def test_the_untrained_baseline_is_reused_until_the_split_or_size_changes(tmp_path):
    bench = _bench()
    (tmp_path / "train.csv").write_text("image,individual_id\na.jpg,x\n")
    (tmp_path / "test.csv").write_text("image,individual_id\nb.jpg,x\n")
    calls = []

    def compute(comp_dir, image_size, thresholds):
        calls.append(image_size)
        return {"map5": 0.5 + len(calls) / 100, "threshold": float(thresholds[-1])}

    th = np.array([0.5, 0.7])
    first = bench.cached_baseline(tmp_path, 160, th, compute)
    assert first == {"map5": 0.51, "threshold": 0.7} and calls == [160]
    assert bench.cached_baseline(tmp_path, 160, th, compute) == first and calls == [160]  # reused
    assert bench.cached_baseline(tmp_path, 256, th, compute)["map5"] == 0.52  # another size
    assert bench.cached_baseline(tmp_path, 160, np.array([0.5, 0.9]), compute)["map5"] == 0.53  # other thresholds
    (tmp_path / "test.csv").write_text("image,individual_id\nc.jpg,y\n")
    assert bench.cached_baseline(tmp_path, 160, np.array([0.5, 0.9]), compute)["map5"] == 0.54  # another split
    assert calls == [160, 256, 160, 160]


def test_child_argv_runs_one_seed_without_baseline_record_or_jobs():
    bench = _bench()
    argv = ["--dataset", "nyala", "--seeds", "0,1,2", "--jobs", "3", "--record", "-p", "crop=none",
            "--pair", "crop=auto", "--no-baseline"]
    assert bench.child_argv(argv, 1) == ["--dataset", "nyala", "-p", "crop=none", "--pair", "crop=auto",
                                         "--seeds", "1", "--no-baseline"]
    assert bench.child_argv(["--dataset=lion", "--seeds=0,1", "--jobs=2", "--tag", "x"], 0) == [
        "--dataset=lion", "--tag", "x", "--seeds", "0", "--no-baseline"]


def test_run_children_keeps_to_jobs_at_once_and_names_a_failed_seed(tmp_path):
    """Three 0.5 s children, two at a time, each with the thread count in its environment; a failing child is
    reported with its seed, status and log once the others have finished."""
    import sys

    bench = _bench()
    code = ("import os, sys, time; t0 = time.time(); time.sleep(0.5); "
            "print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], t0, time.time()); "
            "sys.exit(int(sys.argv[1]))")
    cmds = {s: [sys.executable, "-c", code, "0"] for s in (0, 1, 2)}
    minutes = bench.run_children(cmds, 2, 1, tmp_path / "logs")
    assert sorted(minutes) == [0, 1, 2] and all(0 < m < 1 for m in minutes.values())
    spans = []
    for s in (0, 1, 2):
        omp, mkl, t0, t1 = (tmp_path / "logs" / f"seed{s}.log").read_text().split()
        assert (omp, mkl) == ("1", "1")
        spans.append((float(t0), float(t1)))
    at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert at_once == 2  # two ran together, never three

    cmds[1] = [sys.executable, "-c", code, "3"]
    with pytest.raises(SystemExit, match=r"seed 1 exited with status 3; see .*seed1\.log"):
        bench.run_children(cmds, 3, 1, tmp_path / "logs2")
    assert (tmp_path / "logs2" / "seed2.log").read_text()  # the others still ran to the end


def test_jobs_trains_each_seed_in_a_child_then_reuses_the_runs(tmp_path, monkeypatch, capsys):
    from conftest import isolate_dirs

    from common.cli import pipeline

    bench = _bench()
    isolate_dirs(tmp_path, monkeypatch)
    rows = [(str(tmp_path / "x.jpg"), f"i{k}__{j}.jpg", f"i{k}") for k in range(10) for j in range(3)]
    (tmp_path / "x.jpg").write_bytes(b"not decoded here")
    monkeypatch.setattr(bench, "list_images", lambda dataset: pd.DataFrame(rows, columns=["source", "image",
                                                                                          "individual_id"]))
    spawned = {}

    def run_children(cmds, jobs, threads, log_dir):
        spawned.update(cmds=cmds, jobs=jobs, threads=threads)
        return {s: 1.5 + s for s in cmds}

    monkeypatch.setattr(bench, "run_children", run_children)
    monkeypatch.setattr(pipeline, "run", lambda stages, params, log_output=True, **kw: {
        "map5": 0.6 + params["seed"] / 100, "map5_known": 0.3, "map5_new": 0.9, "threshold": 0.5})
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 4)
    bench.main(["--dataset", "nyala", "--seeds", "0,1,2", "--tag", "t", "--no-baseline", "--jobs", "4"])
    assert spawned["jobs"] == 3 and spawned["threads"] == 1  # no more jobs than seeds; 4 cores // 3
    assert spawned["cmds"][1][1:] == [
        "-m", "bench.reid_openset", "--dataset", "nyala", "--tag", "t", "--seeds", "1", "--no-baseline"]
    out = capsys.readouterr().out
    assert "trained as 3 child processes at once, 1 torch thread(s) each (`--jobs`): seed 0 1.5 min" in out
    assert "| pipeline (3 seed(s): mean ± sd) | 0.610 ± 0.010 |" in out
    with pytest.raises(SystemExit, match="--jobs 0: must be at least 1"):
        bench.main(["--dataset", "nyala", "--jobs", "0"])
