"""Entry point of the verification processes: `python -m ckptdpo.verify.worker --fd N [--preload MODS]`.

`ckptdpo.verify.pool` starts this module as a plain subprocess of the library's own, so the caller's `__main__` is
never imported (a script without a main guard, a REPL, a notebook, a thread or a Prefect task all work the same).
This process is a fork server: it imports and warms up the preload modules once (each module's `warm_up()`, when it
has one), then forks one worker per request on the control socket, so a worker, and the replacement of a killed one,
starts in milliseconds with math-verify already warm. Forking is safe here because this process never starts a thread.

Each worker serves `(token, function, args)` jobs on its own socket and answers `(token, outcome, value, retire)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import struct
import sys
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the fork server exits (Linux), so no worker outlives its pool."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the fork server died before prctl took effect
        os._exit(0)


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_resources(memory_limit_bytes: int) -> None:
    """No core dumps; address space capped at what the process maps now plus `memory_limit_bytes` (0: no cap)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_limit_bytes:
            limit = _address_space_bytes() + memory_limit_bytes
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass


def _answer(token: int, fn, args) -> tuple:
    try:
        return (token, "ok", fn(*args), False)
    except MemoryError:
        # The heap may be in a poor state after this; answer, then let the parent replace this process.
        return (token, "error", "MemoryError", True)
    except BaseException as e:  # noqa: BLE001 - any failure of one job is that job's `error`
        return (token, "error", f"{type(e).__name__}: {e}"[:500], False)


def serve(fd: int, memory_limit_bytes: int, parent_pid: int) -> None:
    """Run jobs received on socket `fd` until EOF or a `None` message."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # jobs may run subprocesses and must be able to wait for them
    _die_with_parent(parent_pid)
    _limit_resources(memory_limit_bytes)
    conn = Connection(fd)
    while True:
        try:
            msg = conn.recv()
        except Exception:  # EOF (the pool is gone), or a message too large for the memory limit
            return
        if msg is None:
            return
        reply = _answer(*msg) if isinstance(msg, tuple) and len(msg) == 3 else (None, "error", "bad job", True)
        try:
            conn.send(reply)
        except Exception:
            return
        if reply[3]:
            return


def _preload(modules: list[str]) -> None:
    for name in modules:
        module = importlib.import_module(name)
        warm_up = getattr(module, "warm_up", None)
        if callable(warm_up):
            warm_up()


def _fork_workers(ctl: socket.socket, memory_limit_bytes: int) -> None:
    """Fork a worker for every socket the pool sends; reply with its pid. Returns when the pool closes `ctl`."""
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 16, 1)
        except OSError:
            return
        if not msg:
            return
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ctl.close()
                serve(fds[0], memory_limit_bytes, me)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(fds[0])
        try:
            ctl.sendall(struct.pack("!q", pid))
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ckptdpo.verify.worker", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="control socket inherited from the pool")
    p.add_argument("--preload", default="", help="comma-separated modules to import (and warm up) before forking")
    p.add_argument("--memory-limit", type=int, default=0, help="address-space headroom per worker in bytes")
    args = p.parse_args(argv)
    # Ctrl-C reaches the whole process group; the pool decides what happens to its processes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers are reaped by the kernel: this process never waits for them, and the pool kills them by pid.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    ctl = socket.socket(fileno=args.fd)
    _preload([m for m in args.preload.split(",") if m])
    ctl.sendall(b"R")
    _fork_workers(ctl, args.memory_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
