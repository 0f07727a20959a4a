"""SIGTERM and SIGINT stop a run within seconds, child processes included, with every written shard intact.

Workers, `docker stop`, Kubernetes, a supervisor's `kill -- -PGID` and the Prefect UI's Cancel stop work with SIGTERM,
to the run's process or to its whole process group. Python's default would end the main thread only: generation in
task threads goes on, and interpreter exit waits for those threads. Prefect also puts its own SIGTERM handler in
place while a flow runs; its crash handling then waits for the running task threads and for its API, which a signal
to the group has ended first (the ephemeral API is a child in the same group): a run once went on for minutes,
retrying a dead API. So a stop never waits for a Python handler to run: `signal.set_wakeup_fd` makes the
interpreter's C-level handler write every signal's number to a socket, whichever Python handler is installed, and a
listener thread arms the stop from there. A stop interrupts the main thread (Prefect records the flow run as crashed
where its API still answers) and ends the process `GRACE_S` later at the latest, or as soon as the CLI's main thread
has unwound, after ending every child process (verifier workers, the ephemeral Prefect API, a served judge, training
processes). Shards are written to a temporary name and renamed, so whatever was written is complete, and the next
run resumes from it; temporary files of interrupted writes are removed when their stage is prepared again.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("ckptdpo")
GRACE_S = 4.0  # for Prefect to record the crash while its API answers; the run ends by then at the latest
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESUME = "written shards are kept; run the same command again to resume"


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc (no psutil needed)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def is_running(pid: int) -> bool:
    """The process exists and has not exited (a zombie, not yet reaped by its parent, has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def end_children(wait_s: float = 1.0) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those still running after `wait_s`."""
    kids = descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in kids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(is_running(pid) for pid in kids):
            time.sleep(0.05)
        kids = [pid for pid in kids if is_running(pid)]
        if not kids:
            return


@dataclass
class _Stop:
    """The one stop of this process: why, its exit code and the last line to print (signal handlers are global)."""

    reason: str | None = None
    code: int = 1
    message: str = ""
    printed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


_STOP = _Stop()


def request_stop(reason: str, code: int, message: str, grace_s: float = GRACE_S) -> bool:
    """Stop this process: log `reason` now, end it `grace_s` later at the latest (children first), printing
    `message` last. Only the first request counts; returns whether this one did."""
    with _STOP.lock:
        if _STOP.reason is not None:
            return False
        _STOP.reason, _STOP.code, _STOP.message = reason, code, message
    log.warning("%s: stopping; %s", reason, RESUME)
    threading.Thread(target=_finish_after, args=(grace_s,), daemon=True, name="ckptdpo-stop").start()
    return True


def stop_requested() -> bool:
    return _STOP.reason is not None


def finish_stop() -> NoReturn:
    """End a stopped process now: print its last line (once), end its children, exit with its code."""
    with _STOP.lock:
        first, _STOP.printed = not _STOP.printed, True
    if first and _STOP.message:
        print(_STOP.message, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    end_children()
    os._exit(_STOP.code)


def _finish_after(grace_s: float) -> None:
    time.sleep(grace_s)
    log.warning("still running %.0f s after the stop was requested: ending the process now", grace_s)
    finish_stop()


def _request_signal_stop(signum: int, grace_s: float) -> None:
    name = signal.Signals(signum).name
    request_stop(f"{name} received", 128 + signum, f"interrupted by {name}: {RESUME}", grace_s)


@contextmanager
def stop_on_signals(grace_s: float = GRACE_S):
    """While the block runs in the main thread, SIGTERM/SIGINT stop the process within `grace_s` (see the module)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum, frame):
        _request_signal_stop(signum, grace_s)
        prev = previous.get(signum)
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)  # Prefect's own handler marks the flow run
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    with _signal_listener(grace_s):
        try:
            yield
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)


@contextmanager
def _signal_listener(grace_s: float):
    """A thread that arms the stop from the interpreter's wakeup fd, whichever Python handler a signal meets."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def listen() -> None:
        with reader:
            while data := reader.recv(64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        _request_signal_stop(signum, grace_s)

    threading.Thread(target=listen, daemon=True, name="ckptdpo-signals").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        writer.close()  # the listener reads the end of the stream and returns


def interrupt_main() -> None:
    """Raise KeyboardInterrupt in the main thread (after `request_stop`, so the handlers only unwind it)."""
    _thread.interrupt_main()
