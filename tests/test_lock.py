"""One runner per experiment (common.core.lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from common.core import lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no such process any more


def test_pid_alive():
    assert lock.pid_alive(os.getpid())
    assert not lock.pid_alive(dead_pid())
    assert not lock.pid_alive(0)


def test_lock_is_held_then_released(tmp_path):
    path = tmp_path / "e" / ".lock"
    with lock.experiment_lock(path, "e"):
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not path.exists()
    with pytest.raises(ZeroDivisionError), lock.experiment_lock(path, "e"):
        1 / 0  # noqa: B018 - released on errors too
    assert not path.exists()


def test_second_runner_stops_naming_the_first(tmp_path):
    path = tmp_path / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "t0"}))
        with pytest.raises(lock.LockedError, match=rf"experiment 'e' is being run by pid {sleeper.pid} on "):
            with lock.experiment_lock(path, "e"):
                pass
        assert json.loads(path.read_text())["pid"] == sleeper.pid  # the holder's lock is untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_is_taken_over(tmp_path, capsys):
    path = tmp_path / ".lock"
    pid = dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "t0"}))
    with lock.experiment_lock(path, "e"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {path} of pid {pid}" in capsys.readouterr().out
    path.write_text("{half")  # a lock half-written by a killed run: stale too
    with lock.experiment_lock(path, "e"):
        pass


def test_lock_from_another_host_is_refused(tmp_path):
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t0"}))
    with pytest.raises(lock.LockedError, match=rf"pid 1 on host elsewhere .*delete {path}"):
        with lock.experiment_lock(path, "e"):
            pass
