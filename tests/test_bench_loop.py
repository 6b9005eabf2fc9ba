"""bench/loop_overhead.py: its pure helpers on hand-made timings, and a tiny end-to-end run (``--quick``).

Known answers are worked out by hand in the comments: overhead = 100 * (bare img/s / project img/s - 1); a
loop whose loader and model run in turn has rate 1 / (1/loader + 1/model).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return importlib.import_module("bench.loop_overhead")


@pytest.fixture(scope="module")
def lo():
    return _bench()


def test_overhead_pct_known_answers(lo):
    assert lo.overhead_pct(100.0, 100.0) == pytest.approx(0.0)  # same speed: no overhead
    assert lo.overhead_pct(95.0, 100.0) == pytest.approx(5.2631579)  # 100/95 = 1.05263: 5.26 % more time
    assert lo.overhead_pct(80.0, 100.0) == pytest.approx(25.0)  # 100/80 = 1.25
    assert lo.overhead_pct(200.0, 100.0) == pytest.approx(-50.0)  # twice as fast: half the time
    with pytest.raises(ValueError, match="must be > 0"):
        lo.overhead_pct(0.0, 100.0)


def test_verdict_boundary(lo):
    assert lo.verdict(5.0) == "met"  # the target is "below or at 5 %"
    assert lo.verdict(5.01) == "not met"
    assert lo.verdict(-3.0) == "met"  # faster than the bare loop
    assert lo.verdict(8.0, target=10.0) == "met"


def test_median_rate_known_answers(lo):
    samples = [
        (100, 2.0),  # 50 img/s
        (100, 4.0),  # 25 img/s
        (100, 1.0),  # 100 img/s
    ]
    assert lo.median_rate(samples) == pytest.approx(50.0)  # median of rates, not total images / total time
    assert lo.median_rate([(30, 1.0), (10, 1.0)]) == pytest.approx(20.0)  # even count: mean of the middle two
    with pytest.raises(ValueError, match="no samples"):
        lo.median_rate([])
    with pytest.raises(ValueError, match="> 0"):
        lo.median_rate([(10, 0.0)])


def test_bottleneck_model_bound(lo):
    out = lo.bottleneck(loader_ips=1000.0, model_ips=100.0)
    assert out["bound"] == "model"
    assert out["serial_ips"] == pytest.approx(1 / (0.001 + 0.01))  # 90.909 img/s
    assert out["overlap_ips"] == pytest.approx(100.0)  # workers beside the model: the model's rate at best
    assert out["loader_share"] == pytest.approx(0.001 / 0.011)  # 9.1 % of the time in the loader
    assert out["headroom"] == pytest.approx(10.0)  # loader 10x faster than the model


def test_bottleneck_loader_bound(lo):
    out = lo.bottleneck(loader_ips=50.0, model_ips=200.0)
    assert out["bound"] == "data loading"
    assert out["serial_ips"] == pytest.approx(40.0)  # 1 / (0.02 + 0.005)
    assert out["overlap_ips"] == pytest.approx(50.0)  # the loader's rate
    assert out["loader_share"] == pytest.approx(0.8)  # 0.02 / 0.025
    assert out["headroom"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="must be > 0"):
        lo.bottleneck(0.0, 10.0)


def test_interleaved_order_alternates(lo):
    assert lo.interleaved_order(3) == [("project", "bare"), ("bare", "project"), ("project", "bare")]
    assert lo.interleaved_order(0) == []


def test_timed_calls_records_and_restores(lo):
    mod = types.SimpleNamespace(f=lambda x: x + 1)
    original, durations = mod.f, []
    with lo.timed_calls(mod, "f", durations):
        assert mod.f(1) == 2  # the wrapper returns what the function returns
        assert mod.f(2) == 3
    assert len(durations) == 2
    for wall0, cpu0, wall1, cpu1 in durations:  # start and end of each call on both clocks
        assert wall1 >= wall0 and cpu1 >= cpu0
    assert durations[1][0] >= durations[0][2]  # the second call started after the first ended
    assert mod.f is original  # restored

    def boom():
        raise KeyError("x")

    mod.g = boom
    with pytest.raises(KeyError), lo.timed_calls(mod, "g", durations):
        mod.g()
    assert len(durations) == 3 and mod.g is boom  # a failing call is timed too, and the patch is undone


def test_bad_arguments_exit(lo):
    with pytest.raises(SystemExit):
        lo.main(["--epochs", "0"])


def test_quick_end_to_end(lo, isolated, monkeypatch):
    """The whole bench on demo_tiny (made in tmp) at 32 px, one repeat; its section appended to a file."""
    results = isolated / "RESULTS.md"
    results.write_text("# earlier section\n")
    monkeypatch.setattr(sys, "argv", ["loop_overhead.py"])
    res = lo.main(["--quick", "--device", "cpu", "--record", "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# earlier section\n")  # appended, never rewritten
    assert "## Loop overhead: stage 02 training and stage 03 extraction" in text
    assert "python -m bench.loop_overhead --quick --device cpu --record" in text
    assert text.count("| training") == 7 and text.count("| extraction") == 5  # loops 4 + 2, bottleneck 3 + 3
    # demo_tiny: 21 training images, fold 0 of 5 holds out 5; 16 fit images in 4 full batches of 4
    assert (res["n_fit"], res["n_valid"]) == (16, 5)
    assert len(res["bare_train"]) == 1 and len(res["project_steps"]) == 1
    assert res["project_steps"][0][0] == 16 and res["bare_train"][0][0] == 16  # same images on both sides
    for clock in (1, 2):  # wall, CPU: steps only < + validation < + checkpoint, per epoch
        steps, logged = res["project_steps"][0][clock], res["project_logged"][0][clock]
        assert 0 < steps < logged < res["project_with_ckpt"][0][clock]
    assert res["log_gap"] < 0.05  # log.csv's seconds = the steps + validation timed by the bench
    assert res["call_fixed_s"] > 0  # model build and final save lie outside the epochs
    assert len(res["train_model"]) == len(res["train_loader"]) == 1  # one bottleneck round per repeat
    assert res["extract_max_diff"] < 1e-5  # the bare extraction loop computes the same embeddings
    assert not list((isolated / "working").glob("loopbench-*"))  # stage outputs went to a temp folder
