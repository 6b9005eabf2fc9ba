"""bench/grocery_data.py: the deterministic same-coarse label noise, and the grocery competition layout on the real
shared set (skipped when ../shared/datasets/grocery is absent).

Known answers: the official lists hold 2,640 train and 296 val images of 81 fine classes in 43 coarse classes;
the first train line is Golden-Delicious (fine 0, coarse Apple).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.competition import load_competition

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

from bench.grocery_data import convert, noisy_labels  # noqa: E402


def test_noisy_labels_flip_the_share_within_the_coarse_class_deterministically():
    fine = ["a1", "a1", "a2", "a2", "a3", "b1", "b1", "b1", "c1", "c2"]
    coarse = ["A", "A", "A", "A", "A", "B", "B", "B", "C", "C"]
    out = noisy_labels(fine, coarse, 0.3, seed=0)
    changed = np.flatnonzero(out != np.array(fine, dtype=object))
    assert len(changed) == 3  # round(0.3 * 10)
    for i in changed:
        assert out[i][0] == fine[i][0]  # same coarse class (the first letter here)
        assert coarse[i] != "B"  # B has one fine class: its images cannot flip
    np.testing.assert_array_equal(out, noisy_labels(fine, coarse, 0.3, seed=0))  # deterministic
    assert (noisy_labels(fine, coarse, 0.0) == np.array(fine, dtype=object)).all()
    with pytest.raises(ValueError, match="only 7 images"):
        noisy_labels(fine, coarse, 0.8)  # 8 flips asked, 7 eligible


@pytest.mark.shared
def test_grocery_layout_on_the_real_set(tmp_path):
    if not (SHARED / "grocery" / "train.txt").is_file():
        pytest.skip("../shared/datasets/grocery not present")
    root = convert(tmp_path, SHARED, noise=0.2)
    comp = load_competition(root, check_pixels=False)
    assert len(comp.train) == 2640 and len(comp.test) == 296
    train = pd.read_csv(root / "train.csv")
    assert train["clean_label"].nunique() == 81 and train["coarse"].nunique() == 43
    assert train.loc[0, ["clean_label", "coarse"]].tolist() == ["Golden-Delicious", "Apple"]
    flipped = train["individual_id"] != train["clean_label"]
    assert flipped.sum() == 528  # round(0.2 * 2640)
    pairs = train.loc[flipped]
    coarse_of = dict(zip(train["clean_label"], train["coarse"], strict=False))
    assert (pairs["individual_id"].map(coarse_of) == pairs["coarse"]).all()  # never leaves its coarse class
    test = pd.read_csv(root / "test.csv")
    assert Counter(test["individual_id"]).total() == 296 and set(test["individual_id"]) <= set(train["clean_label"])


def test_probe_rows_fit_each_probe_at_its_size_and_ensemble_them(comp, isolated, one_torch_thread, monkeypatch):
    import argparse

    from bench import grocery
    from common.core import store
    from common.engine.classifier import fold_dir

    base = {**grocery.BASE, "backbone": "mobilenetv3_small_050", "pretrained": "none", "n_folds": 2,
            "batch_size": 4, "use_crops": False, "amp": False}
    args = argparse.Namespace(probes=["mobilenetv3_small_050:32", "mobilenetv3_small_050:48"])
    rows, members = grocery.probe_rows(args, base, comp.root, comp)
    assert members == [r["runs"][0]["exp"] for r in rows[:2]]
    assert [r["key"] for r in rows] == ["probe-mobilenetv3_small_050-32", "probe-mobilenetv3_small_050-48",
                                        "probe-ensemble"]
    exps = [r["runs"][0]["exp"] for r in rows[:2]]
    for exp, size in zip(exps, (32, 48), strict=True):
        meta = store.read_json(fold_dir(exp, 0) / "config.json")
        assert meta["config"]["image_size"] == size and meta["config"]["epochs"] == 0
        assert (fold_dir(exp, 0) / "probe.json").is_file()  # the head is the probe
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert store.read_json(isolated / "working" / "bench-grocery-probe-ensemble" / "06_ensemble" / "metrics.json")

    # a second call reuses the unchanged stage 06 (the runner's rule: same parameters, data and members)
    from common.stages import ensemble_postprocess

    def refuse(*a, **k):
        raise AssertionError("stage 06 recomputed although nothing changed")

    monkeypatch.setattr(ensemble_postprocess, "run_ensemble", refuse)
    again, _ = grocery.probe_rows(args, base, comp.root, comp)
    assert again[-1]["accuracy"] == rows[-1]["accuracy"]
    from common.config import EnsembleConfig

    changed = EnsembleConfig(data=str(comp.root), exp="bench-grocery-probe-ensemble", members=",".join(exps),
                             weight_factor=5.0, device="cpu")  # another weight: stage 06 must run again
    with pytest.raises(AssertionError, match="recomputed"):
        grocery.ensemble(changed, comp)


def test_ensemble_rows_train_lites_at_their_own_size_and_ensemble_every_model(comp, isolated, one_torch_thread):
    import argparse

    from bench import grocery
    from common.core import store
    from common.engine.classifier import fold_dir

    base = {**grocery.BASE, "backbone": "mobilenetv3_small_050", "pretrained": "none", "n_folds": 2, "epochs": 1,
            "freeze_blocks": 0, "image_size": 32, "batch_size": 4, "use_crops": False, "amp": False,
            "seed": 3}  # not BASE's 42: the labels must name the seed the models trained with, and each stage-06
    # row of seed 3 has its own experiment (<name>-s3), so that another seed's call cannot overwrite it
    plain = grocery.make_config("plain", base, comp.root, {})
    grocery.train(plain, comp)
    probe_args = argparse.Namespace(probes=["mobilenetv3_small_050:40"])
    _, probes = grocery.probe_rows(probe_args, base, comp.root, comp)
    args = argparse.Namespace(lites=["mobilenetv3_small_050:48", "mobilenetv3_small_075"])
    rows, every_exp = grocery.ensemble_rows(args, base, comp.root, comp, {"plain": [plain.exp]}, probes)
    assert [r["key"] for r in rows] == ["plain-mobilenetv3_small_050-48", "plain-mobilenetv3_small_075-32",
                                        "ensemble", "ensemble-all"]
    lite_exps = [r["runs"][0]["exp"] for r in rows[:2]]
    sizes = [store.read_json(fold_dir(e, 0) / "config.json")["config"]["image_size"] for e in lite_exps]
    assert sizes == [48, 32]  # its own size when given, else the base's
    seed = base["seed"]  # every model trains with the base's seed, and the rows say so
    assert store.read_json(fold_dir(lite_exps[0], 0) / "config.json")["config"]["seed"] == seed
    assert rows[0]["label"].endswith(f"(seed {seed})") and f"probes, seed {seed})" in rows[-1]["label"]
    ens = store.read_json(isolated / "working" / "bench-grocery-ensemble-s3" / "06_ensemble" / "metrics.json")
    every = store.read_json(isolated / "working" / "bench-grocery-ensemble-all-s3" / "06_ensemble" / "metrics.json")
    assert sorted(ens["weights"]) == sorted([plain.exp, *lite_exps])
    assert sorted(every["weights"]) == sorted([plain.exp, *lite_exps, *probes])  # no member twice
    assert rows[-1]["label"].startswith("stage 06: all 4 models") and sorted(every_exp) == sorted(every["weights"])

    # one pseudo-label round from that widest ensemble; the retrained row is scored on the same test images
    # (round 2 retrains its own list: --pseudo-rows ema mobilenetv3_small_050:40 --pseudo-rows ema plain)
    pseudo_args = argparse.Namespace(pseudo=0.01, pseudo_rows=[["ema", "mobilenetv3_small_050:40"], ["ema", "plain"]],
                                     pseudo_rounds=2)
    row, other, students, *round2 = grocery.pseudo_rows(pseudo_args, base, comp.root, comp, every_exp)
    assert [r["key"] for r in (row, other, students)] == ["pseudo-ema", "pseudo-plain-l_050-40", "pseudo-ensemble"]
    assert [r["key"] for r in round2] == ["pseudo2-ema", "pseudo2-plain", "pseudo2-ensemble", "pseudo-all-ensemble"]
    # round 2: labels from round 1's two students, on round 1's folder; its folder holds round 2's rows only
    round1 = [r["runs"][0]["exp"] for r in (row, other)]
    out2 = isolated / "working" / "bench-grocery-pseudo2-s3" / "06_ensemble"
    assert sorted(store.read_json(out2 / "metrics.json")["weights"]) == sorted(round1)
    # the last row ensembles the four students of both rounds (on round 2's folder)
    all_students = store.read_json(isolated / "working" / "bench-grocery-pseudo-all-ensemble-s3" / "06_ensemble"
                                   / "metrics.json")
    assert sorted(all_students["weights"]) == sorted(round1 + [r["runs"][0]["exp"] for r in round2[:2]])
    assert round2[-1]["label"].startswith("stage 06: all 4 students of the 2 pseudo-label rounds")
    train2 = pd.read_csv(out2 / "pseudo_round2" / "train.csv", dtype=str, keep_default_na=False)
    assert set(train2["round"]) == {"0", "2"} and (train2["round"] == "2").sum() == len(comp.test)
    assert store.read_json(fold_dir(round2[0]["runs"][0]["exp"], 0) / "config.json")["config"]["data"] == str(
        out2 / "pseudo_round2")
    out = isolated / "working" / "bench-grocery-pseudo-s3" / "06_ensemble"
    kept = pd.read_csv(out / "pseudo_round1.csv", dtype=str, keep_default_na=False)
    assert len(kept) == len(comp.test)  # p >= 0.01 keeps every image of a few classes
    truth = comp.truth.set_index("image")["individual_id"]
    right = (kept["individual_id"] == kept["image"].map(truth)).mean()
    assert f"({len(kept)} of {len(comp.test)} val images at p >= 0.01 from the ensemble of 4, {right:.1%}" in row["label"]
    exp = row["runs"][0]["exp"]
    meta = store.read_json(fold_dir(exp, 0) / "config.json")["config"]
    assert meta["data"] == str(out / "pseudo_round1") and meta["ema_decay"] == 0.995  # the chosen trick row
    other_meta = store.read_json(fold_dir(other["runs"][0]["exp"], 0) / "config.json")["config"]
    assert other_meta["image_size"] == 40 and other_meta["data"] == meta["data"]
    ens = store.read_json(isolated / "working" / "bench-grocery-pseudo-ensemble-s3" / "06_ensemble" / "metrics.json")
    assert sorted(ens["weights"]) == sorted([exp, other["runs"][0]["exp"]])  # the students, on one folder
    with pytest.raises(SystemExit, match="needs the ensemble"):
        grocery.main(["--pseudo", "0.9", "--no-ensemble"])
    with pytest.raises(SystemExit, match="'emma': neither a trained row"):  # before the dataset is read
        grocery.main(["--pseudo", "0.9", "--pseudo-rows", "emma", "--shared", str(isolated / "absent")])
    with pytest.raises(SystemExit, match="'emma': neither a trained row"):  # round 2's list is checked too
        grocery.main(["--pseudo", "0.9", "--pseudo-rounds", "2", "--pseudo-rows", "ema", "--pseudo-rows", "emma",
                      "--shared", str(isolated / "absent")])
    with pytest.raises(SystemExit, match="given 2 times for 1 round"):
        grocery.main(["--pseudo", "0.9", "--pseudo-rows", "ema", "--pseudo-rows", "plain"])
    with pytest.raises(SystemExit, match="BACKBONE:PX"):
        grocery.backbone_spec("tf_efficientnet_lite2:big")
    with pytest.raises(SystemExit, match="input size"):
        grocery.probe_rows(argparse.Namespace(probes=["mobilenetv3_small_050"]), base, comp.root, comp)


def test_stage06_experiments_are_per_seed_and_seed_42_keeps_its_names():
    from bench import grocery

    assert grocery.stage06_exp("bench-grocery-pseudo", {"seed": 42}) == "bench-grocery-pseudo"
    assert grocery.stage06_exp("bench-grocery-pseudo", {"seed": 1}) == "bench-grocery-pseudo-s1"
    assert grocery.stage06_exp("bench-grocery-pseudo2-ensemble", {"seed": 0}) == "bench-grocery-pseudo2-ensemble-s0"


def test_merge_seeds_averages_each_row_over_the_seeds_and_names_them():
    from bench import grocery

    def run(acc, bal, top5, train_s=0.0):
        return {"accuracy": acc, "balanced_accuracy": bal, "top5": top5, "train_s": train_s, "exp": "x"}

    info = dict(which="one pseudo-label round", n_test=296, threshold=0.45, n_sources=8, model="plain fine-tuning")
    seed42 = [grocery.summarise("plain-lite1-240", "plain fine-tuning, lite1 at 240 px (seed 42)", [run(0.7, 0.6, 0.9, 800)]),
              grocery.summarise("ensemble-all", "stage 06: all 8 models above (fine-tuned and probes, seed 42), w",
                                [run(0.8, 0.8, 1.0)]),
              {**grocery.summarise("pseudo-plain", "student", [run(0.86, 0.85, 0.95, 500)]),
               "round": {**info, "kept": [221], "right": [0.941]}}]
    seed1 = [grocery.summarise("plain-lite1-240", "plain fine-tuning, lite1 at 240 px (seed 1)", [run(0.6, 0.7, 0.8, 900)]),
             grocery.summarise("ensemble-all", "stage 06: all 8 models above (fine-tuned and probes, seed 1), w",
                               [run(0.9, 0.8, 0.9)]),
             {**grocery.summarise("pseudo-plain", "student", [run(0.88, 0.87, 0.93, 700)]),
              "round": {**info, "kept": [230], "right": [0.92]}}]
    lite, every, student = grocery.merge_seeds([seed42, seed1], [42, 1])
    assert lite["label"] == "plain fine-tuning, lite1 at 240 px (seeds 42, 1)" and len(lite["runs"]) == 2
    assert lite["accuracy"] == pytest.approx(0.65) and lite["accuracy_spread"] == pytest.approx(0.1)
    assert lite["balanced_accuracy"] == pytest.approx(0.65) and lite["top5_spread"] == pytest.approx(0.1)
    assert lite["train_s"] == pytest.approx(850)
    assert every["label"] == "stage 06: all 8 models above (fine-tuned and probes, seeds 42, 1), w"
    assert every["accuracy"] == pytest.approx(0.85) and every["balanced_accuracy_spread"] == pytest.approx(0.0)
    assert student["label"] == ("plain fine-tuning + one pseudo-label round (221, 230 of 296 val images at p >= 0.45 "
                                "from the ensemble of 8, 94.1%, 92.0% of them right, per seed; transductive)")
    assert student["accuracy"] == pytest.approx(0.87) and student["top5_spread"] == pytest.approx(0.02)
    one = grocery.round_label(**{k: v for k, v in info.items() if k != "model"}, kept=[221], right=[0.941])
    assert one == ("one pseudo-label round (221 of 296 val images at p >= 0.45 from the ensemble of 8, 94.1% of them "
                   "right; transductive)")  # one seed: the words of the single-seed tables
    with pytest.raises(RuntimeError, match="seed 1: rows"):
        grocery.merge_seeds([seed42, seed1[:2]], [42, 1])


def test_seed_rows_give_each_seed_its_own_trick_models(monkeypatch):
    import argparse

    from bench import grocery

    seen = []

    def fake_probes(args, base, data, comp):
        seen.append(("probes", base["seed"]))
        return [], [f"probe-s{base['seed']}"]

    def fake_ensembles(args, base, data, comp, exps, probes):
        seen.append(("ensembles", base["seed"], exps, list(probes)))
        return [], [f"widest-s{base['seed']}"]

    def fake_pseudo(args, base, data, comp, sources):
        seen.append(("pseudo", base["seed"], sources))
        return []

    monkeypatch.setattr(grocery, "probe_rows", fake_probes)
    monkeypatch.setattr(grocery, "ensemble_rows", fake_ensembles)
    monkeypatch.setattr(grocery, "pseudo_rows", fake_pseudo)
    args = argparse.Namespace(probes=["x:224"], no_ensemble=False, pseudo=0.45)
    exps = {"plain": ["plain-42", "plain-1"], "ema": ["ema-42", "ema-1"]}
    assert grocery.seed_rows(args, {"seed": 1}, Path("d"), None, exps, 1) == []
    assert seen == [("probes", 1), ("ensembles", 1, {"plain": ["plain-1"], "ema": ["ema-1"]}, ["probe-s1"]),
                    ("pseudo", 1, ["widest-s1"])]


def test_bad_seeds_fail_before_the_dataset_is_read(tmp_path):
    from bench import grocery

    with pytest.raises(SystemExit, match="at least one seed"):
        grocery.main(["--seeds", ",", "--shared", str(tmp_path / "absent")])
    with pytest.raises(SystemExit, match="'x' is not an integer"):
        grocery.main(["--seeds", "42,x", "--shared", str(tmp_path / "absent")])
