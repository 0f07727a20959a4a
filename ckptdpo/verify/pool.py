"""A killable process pool: each call runs in a worker under a hard wall-clock limit enforced by the parent.

math-verify can hang or exhaust memory on adversarial LaTeX and its own timeout is a SIGALRM that works only in the
main thread and cannot interrupt long C calls such as big-integer powers; a code sandbox needs the same guarantee.
Here a worker past its deadline is SIGKILLed and replaced, and its call is reported as a timeout.

Workers are forks of a fork server that runs `python -m ckptdpo.verify.worker` (see there), a plain subprocess:
multiprocessing's spawn and forkserver would re-import the caller's `__main__` in every worker, which breaks every
unguarded script. If the fork server cannot start at all, `WorkersUnavailable` is raised: a broken environment is
never reported as `error` verdicts.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A worker that grows by more than this (address space, over what it had after start-up) gets MemoryError, reported as
# `error`, instead of eating the machine.
WORKER_MEMORY_HEADROOM_BYTES = 2 << 30
# Generous: the fork server imports sympy and math-verify and warms them up, on a machine that may be busy.
WORKER_STARTUP_TIMEOUT_S = 120.0
FORK_TIMEOUT_S = 10.0
DEFAULT_PRELOAD = ("ckptdpo.verify.math",)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

CallResult = tuple[str, Any]  # ("ok", value) | ("timeout", None) | ("error", message)


class WorkersUnavailable(RuntimeError):
    """The worker processes could not be started (broken interpreter or environment): nothing was verified."""


class _Worker:
    def __init__(self, conn: mp_connection.Connection, pid: int) -> None:
        self.conn, self.pid = conn, pid
        self.job: int | None = None
        self.token = 0
        self.sent = 0.0
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.conn.close()
        except OSError:
            pass


def _stderr_tail(f: Any) -> str:
    try:
        f.seek(0)
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no error output"
    except OSError:
        return "no error output"


class Pool:
    """Worker processes forked from one fork server; `run` is not thread-safe (`run_calls` serialises callers)."""

    def __init__(
        self,
        memory_limit_bytes: int | None = WORKER_MEMORY_HEADROOM_BYTES,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        python: str | None = None,
    ) -> None:
        self.pid = os.getpid()
        self.memory_limit_bytes = memory_limit_bytes or 0
        self.preload = tuple(preload)
        self.python = python or sys.executable
        self.workers: list[_Worker] = []
        self.token = 0
        self._server: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None

    # --- processes ------------------------------------------------------------------------------------------------

    def _command(self, fd: int) -> list[str]:
        # -P: the caller's working directory must not shadow modules (a `sympy.py` next to a script).
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        return [self.python, *safe_path, "-m", "ckptdpo.verify.worker", "--fd", str(fd)] + [
            "--preload",
            ",".join(self.preload),
            "--memory-limit",
            str(self.memory_limit_bytes),
        ]

    def _start_server(self) -> None:
        """Start the fork server and wait until it has warmed up; raise WorkersUnavailable if it cannot."""
        self._stop_server()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The caller may have put this package on sys.path by hand; the subprocess must find the same one.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        errors = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(
                self._command(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                env=env,
            )
        except OSError as e:
            ours.close()
            errors.close()
            raise WorkersUnavailable(f"verification workers could not start: {self.python}: {e}") from e
        finally:
            theirs.close()
        ours.settimeout(WORKER_STARTUP_TIMEOUT_S)
        try:
            ready = ours.recv(1)
        except OSError:
            ready = b""
        if ready != b"R":
            proc.kill()
            proc.wait()
            ours.close()
            why = _stderr_tail(errors)
            errors.close()
            raise WorkersUnavailable(
                f"verification workers could not start ({self.python} -m ckptdpo.verify.worker exited with "
                f"{proc.returncode}: {why}); check that this interpreter can import ckptdpo and math-verify."
            )
        errors.close()  # the server keeps its own handle; later warnings still land in the (unlinked) file
        ours.settimeout(FORK_TIMEOUT_S)
        self._server, self._ctl = proc, ours

    def _stop_server(self) -> None:
        if self._ctl is not None:
            self._ctl.close()  # EOF: the server exits, and the kernel kills its workers (PDEATHSIG)
            self._ctl = None
        if self._server is not None:
            try:
                self._server.wait(2.0)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def _fork(self) -> _Worker:
        assert self._ctl is not None
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self._ctl, [b"F"], [theirs.fileno()])
            reply = b""
            while len(reply) < 8:
                chunk = self._ctl.recv(8 - len(reply))
                if not chunk:
                    raise OSError("the fork server exited")
                reply += chunk
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(mp_connection.Connection(ours.detach()), struct.unpack("!q", reply)[0])

    def _spawn(self) -> None:
        """Add one worker; restart the fork server once if it died. Raises WorkersUnavailable."""
        if self._ctl is None:
            self._start_server()
        try:
            self.workers.append(self._fork())
            return
        except OSError:
            log.warning("verify: the worker fork server died; starting a new one")
        self._start_server()
        try:
            self.workers.append(self._fork())
        except OSError as e:
            raise WorkersUnavailable(f"verification workers could not start: the fork server fails ({e}).") from e

    def _retire(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def shutdown(self) -> None:
        for w in list(self.workers):
            self._retire(w)
        self._stop_server()

    # --- running calls --------------------------------------------------------------------------------------------

    def _dispatch(self, state: _RunState) -> None:
        for w in self.workers:
            if not state.pending:
                return
            if w.job is not None:
                continue
            i = state.pending.popleft()
            self.token += 1
            fn, args = state.calls[i]
            now = time.monotonic()
            try:
                w.conn.send((self.token, fn, tuple(args)))
            except Exception:
                # It died while idle, so the call never started: give it to another worker, but only once, as a call
                # too large to receive kills every worker it is sent to.
                state.send_failures[i] += 1
                if state.send_failures[i] > 1:
                    state.finish(i, ("error", "could not send the call to a worker"), 0.0)
                else:
                    state.pending.appendleft(i)
                w.job = -1  # retired below
                continue
            w.job, w.token, w.sent, w.deadline = i, self.token, now, now + state.timeout_s
        for w in [w for w in self.workers if w.job == -1]:
            self._retire(w)

    def _collect(self, state: _RunState) -> None:
        busy = [w for w in self.workers if w.job is not None]
        if not busy:
            return
        until = min(w.deadline for w in busy)
        by_conn = {w.conn: w for w in busy}
        ready = mp_connection.wait(list(by_conn), timeout=max(0.0, until - time.monotonic()))
        now = time.monotonic()
        for conn in ready:
            w = by_conn[conn]
            try:
                token, outcome, value, retire = conn.recv()
            except Exception:  # died: crashed (segfault, kernel OOM kill)
                state.finish(w.job, ("error", "the worker process died"), now - w.sent)
                self._retire(w)
                continue
            if token == w.token:
                state.finish(w.job, (outcome, value), now - w.sent)
                w.job = None
            if retire:
                self._retire(w)
        for w in list(self.workers):
            if w.job is not None and now >= w.deadline:
                state.finish(w.job, ("timeout", None), now - w.sent)
                self._retire(w)

    def run(
        self, calls: Sequence[tuple[Callable, Sequence]], timeout_s: float, size: int
    ) -> tuple[list[CallResult], list[float]]:
        """Per call, its result and the seconds from dispatch to result; see `run_calls`."""
        state = _RunState(list(calls), timeout_s)
        while len(self.workers) > size:  # a smaller pool was asked for: drop the surplus
            self._retire(self.workers[-1])
        try:
            while state.pending or any(w.job is not None for w in self.workers):
                while state.pending and len(self.workers) < min(size, len(state.calls)):
                    self._spawn()
                self._dispatch(state)
                self._collect(state)
        except BaseException:
            # Interrupted (Ctrl-C): busy workers hold calls nobody will collect; drop them so the next run is clean.
            for w in list(self.workers):
                if w.job is not None:
                    self._retire(w)
            raise
        return [r if r is not None else ("error", "lost") for r in state.results], state.latency


class _RunState:
    def __init__(self, calls: list[tuple[Callable, Sequence]], timeout_s: float) -> None:
        self.calls, self.timeout_s = calls, timeout_s
        self.results: list[CallResult | None] = [None] * len(calls)
        self.latency = [0.0] * len(calls)
        self.pending = collections.deque(range(len(calls)))
        self.send_failures = [0] * len(calls)

    def finish(self, i: int, result: CallResult, seconds: float) -> None:
        self.results[i], self.latency[i] = result, seconds


_LOCK = threading.Lock()
_POOL: Pool | None = None
_ATEXIT_REGISTERED = False


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _shared_pool() -> Pool:
    global _POOL, _ATEXIT_REGISTERED
    if _POOL is None or _POOL.pid != os.getpid():  # a forked child must not touch its parent's workers
        _POOL = Pool()
        if not _ATEXIT_REGISTERED:
            atexit.register(shutdown_pool)
            _ATEXIT_REGISTERED = True
    return _POOL


def run_calls(
    fn: Callable, args_list: Sequence[Sequence], *, timeout_s: float, workers: int | None = None
) -> tuple[list[CallResult], list[float]]:
    """Run `fn(*args)` for each `args` in the shared killable pool; results in input order, and seconds per call.

    Each result is `("ok", return value)`, `("timeout", None)` when the call ran past `timeout_s` (its worker was
    SIGKILLed and replaced), or `("error", message)` when it raised or its worker died. `fn` and its arguments are
    pickled: `fn` must be a module-level function of a module the worker can import by name (not `__main__`);
    modules outside `DEFAULT_PRELOAD` are imported on first use in each worker. Up to `workers` processes (default:
    one per CPU) run calls at once; threads calling this take turns. Raises `WorkersUnavailable` when no worker can
    be started. Workers also serve the math, code and choice verifiers, so keep `fn` free of process-wide state.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if getattr(fn, "__module__", None) == "__main__":
        raise ValueError(f"{fn!r} is defined in __main__, which workers never import; define it in a module")
    if not args_list:
        return [], []
    with _LOCK:
        return _shared_pool().run([(fn, args) for args in args_list], timeout_s, workers or default_workers())


def shutdown_pool() -> None:
    """Stop the worker processes (also run at interpreter exit); the next call starts new ones."""
    global _POOL
    # At exit another (daemon) thread may still hold the lock mid-call; do not wait on it forever.
    locked = _LOCK.acquire(timeout=2.0)
    try:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.shutdown()
        _POOL = None
    finally:
        if locked:
            _LOCK.release()
