"""Running untrusted Python programs (model-written code) so that they cannot hurt the machine.

Each program runs in a fresh interpreter started by a small boot script that, before any candidate code runs:

- joins a fresh pids cgroup (as root, where RLIMIT_NPROC is never enforced) or sets RLIMIT_NPROC above the user's
  current process count (as any other user), so a fork bomb stops at `max_processes`;
- moves into new user, mount, network and PID namespaces: no network interface but a downed loopback, every mount
  read-only except the program's own temporary directory, a private /proc showing only the sandbox's processes;
- forks the program as PID 1 of that PID namespace, so that when it ends or its parent is killed (parent-death
  signal) the kernel kills every process left in the namespace: nothing outlives a run;
- enters a second user and mount namespace so the program holds no capability over the mounts made read-only above;
- sets CPU-time, address-space, file-size, open-file and core limits, with a scrubbed environment.

The parent enforces the wall-clock limit by killing the boot process's group; stdout and stderr go to files outside
the program's directory and are read back truncated. Where namespaces cannot be created, `run_programs` refuses
(SandboxUnavailable) unless `allow_unsandboxed` is set, in which case only the resource limits apply.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ckptdpo.errors import UserError

log = logging.getLogger(__name__)

SETUP_EXIT = 120  # the boot script could not build the sandbox
BOOT_SCRIPT = Path(__file__).with_name("sandbox_boot.py")
PIDS_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")
# The environment a program sees: nothing from the caller's (tokens, keys, proxies), only what Python needs.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "PYTHONHASHSEED": "0"}


class SandboxUnavailable(UserError):
    """The machine cannot isolate programs and running them unsandboxed was not allowed."""


class SandboxError(RuntimeError):
    """The sandbox could not be built for a run that should have worked (not the program's doing): callers fail the
    batch rather than record the program as wrong."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run."""

    cpu_s: int = 10
    wall_s: float = 20.0
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file (stdout included) the program may write
    max_processes: int = 32  # processes and threads, the program's own included
    open_files: int = 256
    output_bytes: int = 64 << 10  # stdout / stderr kept per run


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended: ok (exit 0) | failed (other exit or signal) | timeout | error (sandbox failure).

    `started` says the sandbox was built and the program's code began; an `error` is never the program's doing.
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    started: bool = False


# --- what this machine supports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """How programs can be run here: isolated (namespaces) or not, and how the process count is capped."""

    isolated: bool
    process_limit: str  # cgroup | rlimit | none
    reason: str | None  # why not isolated, when not


def _pids_cgroup_root() -> Path | None:
    for root in PIDS_CGROUP_ROOTS:
        p = Path(root)
        if (p / "pids.max").exists() or ((p / "cgroup.procs").exists() and (p / "tasks").exists()):
            if os.access(p, os.W_OK):
                return p
    return None


class _Cgroup:
    """A pids cgroup holding one run, removed afterwards (as root, where RLIMIT_NPROC does not apply)."""

    _counter = 0
    _lock = threading.Lock()

    def __init__(self, root: Path, max_processes: int) -> None:
        with _Cgroup._lock:
            _Cgroup._counter += 1
            n = _Cgroup._counter
        self.path = root / f"ckptdpo-sandbox-{os.getpid()}-{n}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_processes + 1))  # + the boot process

    def remove(self) -> None:
        for _ in range(200):  # the kernel reaps a killed namespace asynchronously
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.01)
        log.warning("sandbox cgroup %s still holds processes after 2 s; left in place", self.path)


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


@lru_cache(maxsize=1)
def sandbox_support() -> Support:
    """Probe once: can a program run isolated here, and what caps its process count?"""
    process_limit = ("cgroup" if _pids_cgroup_root() else "none") if os.geteuid() == 0 else "rlimit"
    probe = "import socket\ns = socket.socket()\ntry:\n    s.connect(('1.1.1.1', 53))\n    raise SystemExit(3)\n"
    # Outside its work directory (in the run's scratch directory, removed afterwards) a write must fail.
    probe += "except OSError:\n    pass\nimport os\nopen(os.path.join(os.path.dirname(os.getcwd()), 'probe'), 'w')\n"
    res = _run_one(probe, None, SandboxLimits(cpu_s=5, wall_s=30), isolate=True, process_limit=process_limit)
    if res.status == "failed" and "Read-only file system" in res.stderr:
        return Support(True, process_limit, None)
    reason = (res.stderr.strip().splitlines() or [res.status])[-1]
    return Support(False, process_limit, reason)


def require_isolation(allow_unsandboxed: bool) -> Support:
    """The machine's support; SandboxUnavailable when it cannot isolate and that was not explicitly allowed."""
    support = sandbox_support()
    if not support.isolated and not allow_unsandboxed:
        raise SandboxUnavailable(
            f"code execution cannot be sandboxed on this machine ({support.reason}); run where user and network "
            "namespaces are allowed, or set allow_unsandboxed: true to run model-written code without isolation."
        )
    if support.process_limit == "none" and not allow_unsandboxed:
        raise SandboxUnavailable(
            "code execution has no process-count limit here (root without a writable pids cgroup); run as another "
            "user or set allow_unsandboxed: true."
        )
    return support


# --- running ------------------------------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[truncated]" if len(data) > limit else "")


def _launch(cfg: dict, stdin_path: Path | None, out: Path, err: Path) -> subprocess.Popen:
    """Start the boot process; `cfg["ready_fd"]` is the write end of a pipe it gets, already in `cfg`."""
    with open(out, "wb") as fo, open(err, "wb") as fe:
        fi = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(BOOT_SCRIPT), json.dumps(cfg)],
                stdin=fi,
                stdout=fo,
                stderr=fe,
                cwd=cfg["dir"],
                env=dict(CLEAN_ENV),
                start_new_session=True,  # one process group to kill
                close_fds=True,
                pass_fds=(cfg["ready_fd"],),
            )
        finally:
            if stdin_path:
                fi.close()
    return proc


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the boot process to exit, without reaping it; True when it exited.

    Unreaped, its pid (and so its process group id) cannot be reused, so the group kill that follows can only reach
    the sandbox's own processes.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped (by a Ctrl-C cleanup)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run_one(
    source: str, stdin: str | None, limits: SandboxLimits, *, isolate: bool, process_limit: str
) -> ProgramResult:
    scratch = Path(tempfile.mkdtemp(prefix="ckptdpo-run-"))
    work = scratch / "work"  # the only writable directory; outputs sit beside it, out of the program's reach
    work.mkdir()
    (work / "main.py").write_text(source, encoding="utf-8")
    stdin_path = None
    if stdin is not None:
        stdin_path = scratch / "stdin"
        stdin_path.write_text(stdin, encoding="utf-8")
    cgroup = None
    t0 = time.monotonic()
    try:
        nproc = 0
        if process_limit == "cgroup":
            root = _pids_cgroup_root()
            cgroup = _Cgroup(root, limits.max_processes) if root else None
        elif process_limit == "rlimit":
            nproc = _user_process_count() + limits.max_processes
        cfg = {
            "dir": str(work),
            "isolate": isolate,
            "cgroup": str(cgroup.path) if cgroup else None,
            "nproc": nproc,
            "limits": asdict(limits),
        }
        ready_r, cfg["ready_fd"] = os.pipe()
        try:
            proc = _launch(cfg, stdin_path, scratch / "stdout", scratch / "stderr")
        finally:
            os.close(cfg["ready_fd"])  # the boot process holds the only write end now
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            timed_out = not _wait_unreaped(proc, limits.wall_s)
        finally:
            _kill_group(proc)  # also when it exited: nothing it started may outlive it
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        wall = time.monotonic() - t0
        started = _was_started(ready_r)
        stdout = _read_head(scratch / "stdout", limits.output_bytes)
        stderr = _read_head(scratch / "stderr", limits.output_bytes)
        status = _status(proc.returncode, timed_out) if started else "error"
        return ProgramResult(status, proc.returncode, stdout, stderr, wall, started)
    except OSError as e:
        return ProgramResult("error", None, "", f"ckptdpo-sandbox: {e}", time.monotonic() - t0)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(scratch, ignore_errors=True)


def _was_started(ready_r: int) -> bool:
    """Whether the boot process reported the sandbox built (one byte, written just before the program's code)."""
    try:
        os.set_blocking(ready_r, False)
        return os.read(ready_r, 1) == b"r"
    except BlockingIOError:
        return False
    finally:
        os.close(ready_r)


def _status(code: int | None, timed_out: bool) -> str:
    if timed_out or code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return "timeout"  # wall clock, or RLIMIT_CPU (SIGXCPU, then SIGKILL at the hard limit)
    return "ok" if code == 0 else "failed"


def kill_all() -> None:
    """Kill every program still running (Ctrl-C in the caller)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        _kill_group(proc)


@dataclass(frozen=True)
class Program:
    """One program to run: its source and, for stdin/stdout problems, what it reads."""

    source: str
    stdin: str | None = None


def run_programs(
    programs: Sequence[Program],
    limits: SandboxLimits | None = None,
    *,
    workers: int | None = None,
    allow_unsandboxed: bool = False,
) -> list[ProgramResult]:
    """Run each program in its own sandboxed interpreter, `workers` at a time; results in input order."""
    support = require_isolation(allow_unsandboxed)
    limits = limits or SandboxLimits()
    if not programs:
        return []

    def one(p: Program) -> ProgramResult:
        return _run_one(p.source, p.stdin, limits, isolate=support.isolated, process_limit=support.process_limit)

    size = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    with ThreadPoolExecutor(size, thread_name_prefix="ckptdpo-sandbox") as pool:
        try:
            return list(pool.map(one, programs))
        except BaseException:
            kill_all()
            raise
