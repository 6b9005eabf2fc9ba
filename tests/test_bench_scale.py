"""bench/scale.py, bench/read_speed.py and bench/happywhale_estimate.py: their helpers on hand-made inputs.

Known answers: a stage whose time grows 4x when the images grow 4x has exponent log(4) / log(4) = 1; 2x memory
over 4x images is 0.5. The estimate's GPU hours are FLOPs / (peak x utilisation) / 3600, with 3 forwards per
training image and 2 (flip) per extracted image; its loading hours are images / (decode rate x workers) / 3600.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return importlib.import_module(f"bench.{name}")


@pytest.fixture(scope="module")
def scale():
    return _load("scale")


def _row(size, stage, wall, cpu=1.0, rss=100.0, **extra):
    return dict(size=size, stage=stage, wall_s=wall, cpu_s=cpu, peak_rss_mb=rss, files=2, disk_mb=0.5,
                loader_wait=None, **extra)


def test_exponents_between_consecutive_sizes(scale):
    rows = [_row(1000, "02", 10.0, rss=500), _row(4000, "02", 40.0, rss=1000), _row(16000, "02", 640.0, rss=1000),
            _row(1000, "04", 2.0)]
    wall = scale.exponents(rows)
    assert wall[("02", 4000)] == pytest.approx(1.0)  # 4x time over 4x images
    assert wall[("02", 16000)] == pytest.approx(2.0)  # 16x over 4x: quadratic
    assert ("04", 1000) not in wall and ("02", 1000) not in wall  # no smaller size to compare with
    rss = scale.exponents(rows, "peak_rss_mb")
    assert rss[("02", 4000)] == pytest.approx(0.5) and rss[("02", 16000)] == pytest.approx(0.0)


def test_table_lists_every_row_with_its_exponents(scale):
    rows = [_row(1000, "04", 2.0, map5=0.5), _row(4000, "04", 8.0, cpu=2.0, map5=0.25)]
    rows[1]["loader_wait"], rows[1]["peak_pss_mb"] = 0.0123, 61.6
    lines = scale.table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1,000 | 04 retrieve+submit | 2.0 |")
    assert [c.strip() for c in lines[2].strip("|").split("|")][5] == "-"  # a row measured before PSS
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[4] == "100" and cells[5] == "62"
    assert cells[8] == "1.2 %" and cells[9] == "1.00" and cells[10] == "0.50" and cells[11] == "0.00"
    assert cells[12] == "0.250"
    rows[1]["loader_wait_after_first"] = 0.004  # the wait once the first batch is there
    assert [c.strip() for c in scale.table(rows).splitlines()[3].strip("|").split("|")][8] == "1.2 % (0.4 %)"


def test_merge_rows_replaces_only_the_stages_run_again(scale):
    old = [_row(1000, "00", 3.0), _row(1000, "01", 5.0), _row(1000, "06", 7.0), _row(5000, "06", 9.0)]
    drawn_again = dict(_row(1000, "00", 0.5), files=0)  # the competition was already there: nothing drawn
    merged = scale.merge_rows(old, [drawn_again, _row(1000, "06", 8.0)])
    assert sorted((r["size"], r["stage"], r["wall_s"]) for r in merged) == [
        (1000, "00", 3.0), (1000, "01", 5.0), (1000, "06", 8.0), (5000, "06", 9.0)]
    # with no stored generation row, the new one is kept
    assert [r["stage"] for r in scale.merge_rows([], [drawn_again])] == ["00"]


def test_tree_usage_counts_files_and_bytes(scale, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"12345")
    (tmp_path / "y.bin").write_bytes(b"123")
    (tmp_path / "link").symlink_to(tmp_path / "y.bin")
    assert scale.tree_usage([tmp_path]) == (3, 8)  # the link counts as a file of 0 bytes
    assert scale.tree_usage([tmp_path / "missing"]) == (0, 0)


def test_timed_loader_counts_waits_and_batches(scale):
    import time

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    class Loader:
        started = 0

        def __len__(self):
            return 3

        def __iter__(self):
            Loader.started += 1
            return slow()

    scale._TimedLoader.totals.update(wait_s=0.0, first_s=0.0, loop_s=0.0, batches=0)
    timed = scale._TimedLoader(Loader())
    assert len(timed) == 3
    batches = iter(timed)
    assert Loader.started == 1 and len(batches) == 3  # started at iter(), as the training loop expects
    time.sleep(0.1)  # the loop builds the model: not part of the loop's seconds
    for _ in batches:
        time.sleep(0.02)  # "training" between batches: not waiting
    t = scale._TimedLoader.totals
    assert t["batches"] == 3 and 0.055 <= t["wait_s"] < t["loop_s"]
    assert 0.3 < t["wait_s"] / t["loop_s"] < 0.7  # about half the loop waits
    assert 0.018 <= t["first_s"] < 0.055  # the first batch's wait alone


def test_estimate_hours_from_flops():
    est = _load("happywhale_estimate")
    params = {"n_folds": 5, "epochs": 2, "tta_flip": True}
    rows = {r["stage"]: r for r in est.estimate(10.0, 1e9, params, 100.0, 0.5, 4, query_ms=2.0)}
    fit = 51033 * 4 / 5
    train = rows["02 train embedder"]
    assert train["images"] == int(fit * 2 * 5)
    assert train["gpu_h"] == pytest.approx(3 * 10e9 * fit * 10 / 50e12 / 3600)
    assert train["hours"] == pytest.approx(train["gpu_h"])  # decoding 1e9 images/s never binds
    assert rows["03 extract"]["pflops"] == pytest.approx(10e9 * (51033 + 27956) * 5 * 2 / 1e15)
    assert rows["04 retrieve+submit"]["hours"] == pytest.approx(2.0 * (51033 + 27956) / 1000 / 3600)
    slow = {r["stage"]: r for r in est.estimate(10.0, 1.0, params, 100.0, 0.5, 4)}
    assert slow["03 extract"]["hours"] == pytest.approx((51033 + 27956) * 10 / 4 / 3600)  # loading bound
    assert math.isclose(slow["03 extract"]["load_h"], slow["03 extract"]["hours"])


def test_read_speed_reads_the_same_pixels(tmp_path):
    rs = _load("read_speed")
    import cv2

    from common.data.synth import make_synth

    folder = make_synth(tmp_path / "synth_40", 40)
    paths = sorted(str(p) for p in (folder / "train_images").iterdir())
    shard = rs.build_shard(paths, tmp_path / "s.npy")
    arr = np.load(shard, mmap_mode="r")
    assert arr.shape == (len(paths), 72, 96, 3)
    np.testing.assert_array_equal(arr[3], cv2.cvtColor(cv2.imread(paths[3]), cv2.COLOR_BGR2RGB))
    r = rs.measure(folder)
    assert r["images"] == len(paths) and r["jpeg_us"] > 0 and r["memmap_us"] > 0
    assert r["memmap_kb"] == pytest.approx(72 * 96 * 3 / 1024, rel=0.05)


def test_measure_reads_the_footprint_of_a_process_shorter_than_the_pss_period(scale, tmp_path):
    """A 1.5 s child that touches 300 MB: PSS sampled only every ``PSS_EVERY`` ticks (2 s) read it at its start
    (a few MB, once 0.0 for stage 04 in CI); the growth rule must catch the 300 MB."""
    import os
    import sys

    code = "import numpy as np, time; a = np.ones(300 * 2**20, np.uint8); time.sleep(1.0)"
    r = scale.measure([sys.executable, "-c", code], dict(os.environ), [tmp_path], tmp_path / "log.txt")
    assert 300 < r["peak_rss_mb"] < 600
    assert 280 < r["peak_pss_mb"] <= r["peak_rss_mb"]


def test_every_stage_runs_through_the_bench(scale, tmp_path):
    """The bench calls each stage's functions by name in a child process: a renamed function must fail here, not
    at the start of a two-hour run (stage 02 once called a function that had moved)."""
    rows = scale.run_size(120, list(scale.STAGES), tmp_path, (64, 48))
    assert [r["stage"] for r in rows] == ["00", *scale.STAGES]
    assert all(r["cpu_s"] > 0 and r["files"] > 0 and 0 < r["peak_pss_mb"] <= r["peak_rss_mb"] for r in rows)
    # the training stages report how long their loop waited for data
    assert {r["stage"] for r in rows if r.get("loader_wait") is not None} == {"02", "05"}
    assert "map5" in rows[4]
    # the inherent products timed apart: 04's faiss search, 05/06's head scoring every class at prediction
    by = {r["stage"]: r for r in rows}
    assert all(0 < by[s]["search_cpu_s"] < by[s]["cpu_s"] for s in ("04", "05", "06"))
    assert "search_cpu_s" not in by["02"]


def test_span_table_gives_the_exponent_over_the_whole_range(scale):
    # 5k -> 80k is 16x: CPU 10 -> 160 s is exponent 1, 10 -> 320 s is log(32) / log(16) = 1.25; 1k rows are ignored
    rows = [_row(1000, "01", 5.0, cpu=1.0), _row(5000, "01", 20.0, cpu=10.0), _row(80000, "01", 320.0, cpu=160.0),
            _row(5000, "02", 30.0, cpu=10.0), _row(80000, "02", 480.0, cpu=320.0, rss=5000.0)]
    text = scale.span_table(rows, stages=("01", "02"))
    line01 = next(ln for ln in text.splitlines() if ln.startswith("| 01"))
    line02 = next(ln for ln in text.splitlines() if ln.startswith("| 02"))
    assert line01.split(" | ")[3] == "1.00" and line01.split(" | ")[4] == "1.00"
    assert line02.split(" | ")[3] == "1.25" and line02.split(" | ")[5].rstrip(" |") == "5000 / -"
    # stages 01-02 together: 50 s at 5k, 800 s at 80k; at 1k stage 02 is missing, so no total there
    assert "5,000 images 0.8 min; 80,000 images 13.3 min" in text and "1,000 images" not in text.split("together")[1]
    assert scale.span_table([_row(5000, "01", 1.0)]) == ""
    # stage 04 with the search timed: 2 -> 32 s of search (exponent 1), 8 -> 288 s in all, so 6 -> 256 without it
    rows = [_row(5000, "04", 9.0, cpu=8.0, search_cpu_s=2.0), _row(80000, "04", 300.0, cpu=288.0, search_cpu_s=32.0)]
    lines = {ln.split(" | ")[0]: ln.split(" | ") for ln in scale.span_table(rows, stages=("04",)).splitlines()}
    assert lines["| 04 retrieve+submit"][3] == f"{math.log(36) / math.log(16):.2f}"
    assert lines["| 04 the faiss search alone"][1:4] == ["2.0", "32.0", "1.00"]
    assert lines["| 04 without the faiss search"][1:4] == ["6.0", "256.0", f"{math.log(256 / 6) / math.log(16):.2f}"]
    assert scale.table(rows).splitlines()[-1].rstrip(" |").endswith("| 32.0")
    rows = [_row(5000, "05", 9.0, cpu=8.0, search_cpu_s=2.0), _row(80000, "05", 300.0, cpu=288.0, search_cpu_s=32.0)]
    text = scale.span_table(rows, stages=("05",))
    assert "| 05 scoring every class at prediction alone | 2.0 | 32.0 | 1.00 |" in text
    assert "| 05 without scoring every class at prediction | 6.0 | 256.0 |" in text
