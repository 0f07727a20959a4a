"""SIGTERM and SIGINT stop a run within seconds, with every written shard intact.

Workers, `docker stop`, Kubernetes and the Prefect UI's Cancel all stop work with SIGTERM. Python's default would
end the main thread only: generation in task threads goes on, and interpreter exit waits for those threads (a run
once went on for 12 minutes against a dead API). So the handler interrupts the main thread (Prefect then records the
flow run as crashed or cancelled) and arms a watchdog that ends the process after a short grace period, after
ending its child processes (verifier workers, the ephemeral Prefect API). Shards are written to a temporary name
and renamed, so whatever was written is complete, and the next run resumes from it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("ckptdpo")
GRACE_S = 8.0


def _children(pid: int) -> list[int]:
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


def end_children() -> None:
    """SIGTERM, then SIGKILL after a moment, to every descendant of this process."""
    kids = _children(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in kids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _exit_after(grace_s: float, code: int) -> None:
    time.sleep(grace_s)
    log.warning("still running %.0f s after the stop signal: ending the process now", grace_s)
    end_children()
    os._exit(code)


@contextmanager
def stop_on_signals(grace_s: float = GRACE_S):
    """While the block runs in the main thread, SIGTERM/SIGINT interrupt it and end the process within `grace_s`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    armed = threading.Event()

    def handler(signum, frame):
        if not armed.is_set():
            armed.set()
            log.warning("%s received: stopping; written shards are kept and the next run resumes from them",
                        signal.Signals(signum).name)  # fmt: skip
            threading.Thread(target=_exit_after, args=(grace_s, 128 + signum), daemon=True).start()
        prev = previous.get(signum)
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(signum, frame)  # Prefect's own handler marks the flow run
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
