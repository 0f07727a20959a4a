"""One process at a time per run directory: a lock held by the process that runs flows on it.

Two runs into one directory (a UI quick run beside a CLI run, say) would mix their shards or delete each other's
stages. The lock is an flock on the run directory itself, so taking it writes nothing (a refused run leaves the
directory as it was) and the kernel drops it when its holder dies, however it dies: a stale lock of a killed
process never blocks the next run. While a run works, `<run_dir>/.lock` says who holds it, for the error message.
Re-entrant within a process: the pipeline flow holds it while the stage flows it calls take it again.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ckptdpo.errors import UserError

LOCK_FILE = ".lock"
_HELD: dict[str, tuple[int, int]] = {}  # resolved run dir -> (fd, depth)
_GUARD = threading.Lock()


class RunDirBusy(UserError):
    """Another process runs flows on this run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {started})"


def _acquire(run_dir: Path) -> int:
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(
            f"{run_dir}: this run directory is in use by {_holder(run_dir / LOCK_FILE)}; wait for that run to finish "
            "or pass another --run-dir."
        ) from None
    return fd


def _record_holder(run_dir: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
    (run_dir / LOCK_FILE).write_text(json.dumps(info)[:1000])


@contextmanager
def run_dir_lock(run_dir: str | Path, *, create: bool = True):
    """Hold the run directory's lock for the block; a second holder gets RunDirBusy (one sentence) at once.

    `create=False` takes it only on an existing directory and writes nothing (for checks before a run starts).
    """
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    with _GUARD:
        fd, depth = _HELD.get(key, (None, 0))
        if fd is None:
            fd = _acquire(run_dir)
        _HELD[key] = (fd, depth + 1)
    try:
        if create and not (run_dir / LOCK_FILE).exists():
            _record_holder(run_dir)
        yield
    finally:
        with _GUARD:
            fd, depth = _HELD[key]
            if depth == 1:
                del _HELD[key]
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
                os.close(fd)  # closing the descriptor releases the flock
            else:
                _HELD[key] = (fd, depth - 1)


def holds_run_dir(flow_fn):
    """Decorate a flow function taking `(recipe_path, run_dir, ...)` so it runs under the run directory's lock."""

    @functools.wraps(flow_fn)
    def locked(recipe_path, run_dir, *args, **kwargs):
        with run_dir_lock(run_dir):
            return flow_fn(recipe_path, run_dir, *args, **kwargs)

    return locked
