"""The sandbox's boot script: run as `python -I sandbox_boot.py CONFIG_JSON` by `ckptdpo.sandbox`, never imported.

It builds the sandbox (pids cgroup or RLIMIT_NPROC, user/mount/network/PID namespaces, read-only mounts but the work
directory, a private /proc), then runs `main.py` of the work directory as a child of the namespace's PID 1 under the
resource limits. Exit code: the program's, 128 + signal when killed, 120 when the sandbox could not be built.
"""

import ctypes
import json
import os
import resource
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
RDONLY, REMOUNT, BIND, REC, PRIVATE = 1, 32, 4096, 16384, 1 << 18
OPTS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PSEUDO = {
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "fusectl",
    "configfs",
    "binfmt_misc",
    "autofs",
    "hugetlbfs",
    "nsfs",
}


def fail(msg):
    os.write(2, ("ckptdpo-sandbox: " + msg + "\n").encode())
    os._exit(120)


def check(rc, what):
    if rc != 0:
        fail(what + ": " + os.strerror(ctypes.get_errno()))


def write(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        fail(path + ": " + str(e))


def enter_userns(extra):
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(NEWUSER | extra), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1")
    write("/proc/self/gid_map", f"{gid} {gid} 1")


def make_readonly(keep):
    check(libc.mount(None, b"/", None, REC | PRIVATE, None), "make mounts private")
    check(libc.mount(keep.encode(), keep.encode(), None, BIND | REC, None), "bind the work directory")
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for _dev, target, fstype, opts, *_ in mounts:
        target = target.encode().decode("unicode_escape")
        if target == keep or "ro" in opts.split(","):
            continue
        flags = REMOUNT | BIND | RDONLY
        for o in opts.split(","):
            flags |= OPTS.get(o, 0)
        if libc.mount(None, target.encode(), None, flags, None) != 0 and fstype not in PSEUDO:
            if os.path.ismount(target):
                fail("cannot make " + target + " read-only: " + os.strerror(ctypes.get_errno()))


def limit(name, value):
    resource.setrlimit(getattr(resource, name), (value, value))


def run_program():
    lim = cfg["limits"]
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    limit("RLIMIT_AS", lim["memory_bytes"])
    limit("RLIMIT_FSIZE", lim["file_bytes"])
    limit("RLIMIT_NOFILE", lim["open_files"])
    limit("RLIMIT_CORE", 0)
    if cfg["nproc"]:
        limit("RLIMIT_NPROC", cfg["nproc"])
    os.chdir(cfg["dir"])
    # The sandbox is built: tell the parent before any of the program's code (even compiling it) can run, and close
    # the pipe so the program cannot write to it.
    os.write(cfg["ready_fd"], b"r")
    os.close(cfg["ready_fd"])
    sys.argv = ["main.py"]
    sys.path.insert(0, cfg["dir"])
    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


def program_process():
    try:
        run_program()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    os._exit(code & 0xFF)


def exit_like(status):
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def namespace_init():
    # PID 1 of the namespace: the kernel drops default-action signals (SIGXCPU) sent to it, so the program runs as
    # its child; when this process exits, the kernel kills everything else in the namespace.
    if cfg["isolate"]:
        check(libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None), "mount /proc")
        enter_userns(NEWNS)  # no capability over the read-only mounts made above
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the boot process
    child = os.fork()
    if child == 0:
        program_process()
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            exit_like(status)


def main():
    if cfg["cgroup"]:
        write(os.path.join(cfg["cgroup"], "cgroup.procs"), str(os.getpid()))
    if cfg["isolate"]:
        enter_userns(NEWNS | NEWNET | NEWPID)
        make_readonly(cfg["dir"])
    pid = os.fork()
    if pid == 0:
        namespace_init()
    _, status = os.waitpid(pid, 0)
    exit_like(status)


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    main()
