"""One runner per experiment: ``working/<exp>/.lock`` holds the running process's pid and host.

A second runner on the same experiment stops at once, naming the process that holds the lock. A lock left by
a run that was killed (its pid no longer alive on this host) is taken over, with a message. A lock written on
another host cannot be checked from here: it is refused, and the message says which file to delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another live process holds the experiment's lock."""


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists on this host (signal 0 probes without signalling).

    Args:
        pid: a process id.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # half-written or unreadable: treated as stale


@contextlib.contextmanager
def experiment_lock(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Hold ``path`` (e.g. ``working/<exp>/.lock``) for the block; released on exit, also on errors.

    Args:
        path: the lock file.
        what: the experiment's name, for messages.

    Raises:
        LockedError: a live process (or one on another host) holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read(path)
            host, pid = held.get("host"), int(held.get("pid", 0) or 0)
            if host not in (None, me["host"]):
                raise LockedError(f"experiment {what or path.parent.name!r} is locked by pid {pid} on host {host} "
                                  f"(since {held.get('started')}): if that run is dead, delete {path}") from None
            if held and pid_alive(pid):
                raise LockedError(f"experiment {what or path.parent.name!r} is being run by pid {pid} on {host} "
                                  f"(since {held.get('started')}): wait for it, or stop it first") from None
            print(f"taking over the stale lock {path} of pid {pid or '?'} (no longer running)", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise LockedError(f"{path}: could not take the lock (another runner keeps taking it)")
    try:
        yield path
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
