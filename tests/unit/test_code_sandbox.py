"""The sandbox against hostile programs: each ends within its limits and leaves the machine as it was.

These run real programs in real sandboxed interpreters (no stand-in). Where this machine cannot isolate programs
(no user/network namespaces), the tests that need isolation are skipped and the refusal is tested instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ckptdpo import sandbox
from ckptdpo.sandbox import Program, SandboxError, SandboxLimits, SandboxUnavailable, run_programs
from ckptdpo.verify.code import CodeTask, verify_code_batch

SUPPORT = sandbox.sandbox_support()
needs_isolation = pytest.mark.skipif(not SUPPORT.isolated, reason=f"no sandbox here: {SUPPORT.reason}")
FAST = SandboxLimits(cpu_s=2, wall_s=6.0, memory_bytes=512 << 20, max_processes=16)


@pytest.fixture
def scratch_root(tmp_path, monkeypatch):
    """Sandbox scratch directories under this test's own tmp dir, so leftovers can be found by path."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _left_cgroups() -> list[str]:
    root = sandbox._pids_cgroup_root()
    if root is None:
        return []
    return [p.name for p in root.iterdir() if p.name.startswith(f"ckptdpo-sandbox-{os.getpid()}-")]


def _assert_clean(scratch_root: Path) -> None:
    assert _processes_mentioning(str(scratch_root)) == []
    assert list(scratch_root.iterdir()) == []
    assert _left_cgroups() == []


def _run(source: str, limits: SandboxLimits = FAST) -> sandbox.ProgramResult:
    return run_programs([Program(source)], limits, allow_unsandboxed=not SUPPORT.isolated)[0]


def test_plain_program_runs_with_stdin_and_exit_codes(scratch_root):
    ok, failed = run_programs(
        [Program("import sys; print(sys.stdin.read().upper())", stdin="abc"), Program("raise SystemExit(4)")],
        FAST,
        allow_unsandboxed=not SUPPORT.isolated,
    )
    assert (ok.status, ok.stdout) == ("ok", "ABC\n")
    assert (failed.status, failed.exit_code) == ("failed", 4)
    _assert_clean(scratch_root)


def test_output_is_truncated(scratch_root):
    res = _run("print('x' * 1_000_000)", SandboxLimits(output_bytes=1000))
    assert res.status == "ok" and len(res.stdout) < 1100 and res.stdout.endswith("[truncated]")


def test_infinite_loop_ends_as_timeout_at_the_cpu_limit(scratch_root):
    t0 = time.monotonic()
    res = _run("while True:\n    pass\n")
    assert res.status == "timeout"
    assert time.monotonic() - t0 < FAST.wall_s + 3
    _assert_clean(scratch_root)


def test_sleeping_program_ends_as_timeout_at_the_wall_clock(scratch_root):
    t0 = time.monotonic()
    res = _run("import time\ntime.sleep(60)\n", SandboxLimits(wall_s=1.5))
    assert res.status == "timeout" and time.monotonic() - t0 < 5
    _assert_clean(scratch_root)


def test_ten_gigabyte_allocation_fails_inside_the_limit(scratch_root):
    res = _run("x = bytearray(10 * 1024**3)\nprint('allocated')\n")
    assert res.status == "failed" and "MemoryError" in res.stderr and "allocated" not in res.stdout
    _assert_clean(scratch_root)


def _bounded_forks(n: int) -> str:
    return (
        "import os, time\nkids, refused = [], 0\n"
        f"for _ in range({n}):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        refused += 1\n        continue\n"
        "    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
        "for pid in kids:\n    os.waitpid(pid, 0)\nprint(len(kids), refused)\n"
    )


def test_fork_bomb_stops_at_the_process_limit_and_leaves_nothing(scratch_root):
    if SUPPORT.process_limit == "none":
        pytest.skip("no process-count limit can be enforced here; never run a fork bomb without one")
    # First prove the limit holds with a bounded number of forks; only then run the bomb.
    probe = _run(_bounded_forks(3 * FAST.max_processes))
    assert probe.status == "ok", probe.stderr
    forked, refused = map(int, probe.stdout.split())
    assert forked < FAST.max_processes and refused > 0
    _assert_clean(scratch_root)

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = _run(bomb)
    assert res.status == "timeout"
    assert time.monotonic() - t0 < FAST.wall_s + 5
    _assert_clean(scratch_root)


@needs_isolation
def test_writing_outside_the_work_directory_fails(scratch_root, tmp_path):
    targets = [tmp_path / "escaped.txt", Path.cwd() / "escaped-from-sandbox.txt"]
    source = "\n".join(f"open({str(t)!r}, 'w').write('x')" for t in targets)
    res = _run(source)
    assert res.status == "failed" and "Read-only file system" in res.stderr
    assert not any(t.exists() for t in targets)
    inside = _run("open('local.txt', 'w').write('x')\nprint(open('local.txt').read())")
    assert (inside.status, inside.stdout) == ("ok", "x\n")
    _assert_clean(scratch_root)


@needs_isolation
def test_no_network_even_to_a_server_on_this_machine(scratch_root):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    thread.start()
    try:
        res = _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')")
        reach = socket.create_connection(("127.0.0.1", port), timeout=3)  # the server itself is reachable from here
        reach.close()
        thread.join(6)
    finally:
        server.close()
    assert res.status == "failed" and "connected" not in res.stdout
    assert accepted == [True]  # exactly one connection arrived: ours, not the sandbox's
    _assert_clean(scratch_root)


def _accept(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
        conn.close()
        return True
    except OSError:
        return False


def test_environment_secrets_are_not_visible(scratch_root, monkeypatch):
    monkeypatch.setenv("CKPTDPO_TEST_SECRET", "s3cret-value")
    steal = "import os\nseen = str(os.environ)\n"
    if SUPPORT.isolated:  # unsandboxed, the caller's /proc/<pid>/environ is readable: only limits apply then
        steal += (
            "for pid in os.listdir('/proc'):\n"
            "    try:\n        seen += open(f'/proc/{pid}/environ', errors='replace').read()\n"
            "    except (OSError, ValueError):\n        pass\n"
        )
    steal += "assert 's3cret-value' in seen, 'no secret found'\n"
    # A process on this machine that holds the secret in its environment (visible in its /proc/<pid>/environ).
    holder = subprocess.Popen(["sleep", "60"], env={"CKPTDPO_TEST_SECRET": "s3cret-value"})
    try:
        res = _run(steal)
    finally:
        holder.kill()
        holder.wait()
    assert res.status == "failed" and "no secret found" in res.stderr
    [verdict] = verify_code_batch(
        [CodeTask("```python\nimport os\n```", tests="assert os.environ.get('CKPTDPO_TEST_SECRET')")],
        limits=FAST,
        allow_unsandboxed=not SUPPORT.isolated,
    )
    assert verdict.status == "incorrect"
    _assert_clean(scratch_root)


def test_a_sandbox_that_cannot_be_built_is_an_error_not_a_verdict(scratch_root):
    if SUPPORT.process_limit == "none":
        pytest.skip("no process-count limit here")
    # No process to spare: the boot process cannot even start the program.
    res = _run("print('ran')", SandboxLimits(max_processes=0))
    assert (res.status, res.started, res.stdout) == ("error", False, "")
    with pytest.raises(SandboxError, match="sandbox failed for 1 of 1"):
        verify_code_batch(
            [CodeTask("```python\nx = 1\n```", tests="assert x == 1")],
            limits=SandboxLimits(max_processes=0),
            allow_unsandboxed=not SUPPORT.isolated,
        )
    # A program cannot pass itself off as a sandbox failure: it started, so it is judged.
    fake = _run("import sys\nsys.stderr.write('ckptdpo-sandbox: unshare: nope')\nsys.exit(120)")
    assert (fake.status, fake.started) == ("failed", True)
    _assert_clean(scratch_root)


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_support", lambda: sandbox.Support(False, "rlimit", "no user namespaces"))
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        run_programs([Program("print(1)")])
    with pytest.raises(SandboxUnavailable):
        verify_code_batch([CodeTask("```python\nx = 1\n```", tests="assert x == 1")])
