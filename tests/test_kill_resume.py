"""A run killed in stage 01 (detector training), 02 (after a fold) or 03 (after an embedding file), then rerun,
ends with the same submission, byte for byte, as a run that was never killed. Slow: several tiny-demo runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--params", "params/debug.yaml", "--stages", "01-04", "--quiet", "-p", "detector_epochs=3"]


def runner(base: Path, exp: str) -> subprocess.Popen:
    env = {**os.environ, "REID_INPUT_DIR": str(base / "inputs"), "REID_WORKING_DIR": str(base / "working"),
           "REID_SUBMISSIONS_DIR": str(base / "submissions"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "YOLO_OFFLINE": "1", "REID_PROGRESS": "off"}
    return subprocess.Popen([sys.executable, "-m", "common.pipeline", *ARGS, "--exp", exp], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("killresume")


@pytest.fixture(scope="module")
def unkilled(base) -> bytes:
    finish(runner(base, "ref"))
    return (base / "submissions" / "ref.csv").read_bytes()


KILL_POINTS = {  # stage -> the file whose appearance triggers the kill
    "01": "01_crop/detector/weights/last.pt",
    "02": "02_embedder/fold0/last.pt",
    "03": "03_embeddings/fold0/train.npz",
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_killed_run_resumes_to_the_same_submission(base, unkilled, stage):
    exp = f"kill{stage}"
    proc = runner(base, exp)
    trigger = base / "working" / exp / KILL_POINTS[stage]
    while proc.poll() is None and not trigger.exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before {trigger} appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its notebook kernel, as a machine failure would
    proc.wait()
    assert (base / "working" / exp / ".lock").exists()  # left behind: the rerun takes it over
    out = finish(runner(base, exp))
    assert "taking over the stale lock" in out
    assert (base / "submissions" / f"{exp}.csv").read_bytes() == unkilled
