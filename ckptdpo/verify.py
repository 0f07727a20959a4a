"""Answer extraction and verification with math-verify in a killable process pool.

math-verify can hang or exhaust memory on adversarial LaTeX (exponent towers, huge factorials, deep nesting), and its
own timeout is a SIGALRM that works only in the main thread and cannot interrupt long C calls such as big-integer
powers. So it runs here only in worker processes, each under a hard wall-clock limit per item enforced by the parent:
a worker past its deadline is SIGKILLed and replaced, and that item is reported as `timeout`.

The parent extracts the answer (the last `\\boxed{...}`) itself, so workers receive a few characters per item rather
than whole completions, and verdicts are cached by (gold, extracted).

Workers start with multiprocessing's "forkserver" method (never plain fork: the caller may hold threads), so, as with
any process pool, a script that calls `verify_batch` at import time must guard it with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("correct", "incorrect", "no_answer", "timeout", "error")
# A box whose braces do not close within this many characters is treated as unclosed (truncated output), which also
# bounds the work per candidate box on megabyte completions.
MAX_BOX_CHARS = 50_000
MAX_BOX_CANDIDATES = 64
# Brace tokens examined per completion over all candidate boxes, so brace spam cannot make extraction slow.
MAX_SCAN_TOKENS = 200_000
# Without a box, math-verify's own extraction looks only at the end of the answer, where a final answer sits.
FALLBACK_TAIL_CHARS = 1_000
# A worker that grows by more than this (address space, over what it had after start-up) gets MemoryError, reported as
# `error`, instead of eating the machine.
WORKER_MEMORY_HEADROOM_BYTES = 2 << 30
# Generous: the first start imports sympy and math-verify in the fork server, on a machine that may be busy.
WORKER_STARTUP_TIMEOUT_S = 60.0
MAX_STARTUP_FAILURES = 3
CACHE_SIZE = 65_536
DEFAULT_MAX_CHARS = 1_000_000


@dataclass(frozen=True)
class Verdict:
    """One verification result; `is_correct` is None unless status is correct or incorrect."""

    status: str  # correct | incorrect | no_answer | timeout | error
    is_correct: bool | None
    extracted: str | None


# --- extraction (parent side, pure string work) --------------------------------------------------------------------

_THINK_END = "</think>"
_BOX_NAMES = ("\\boxed", "\\fbox")
# An escaped character (`\{`, `\}`, `\\`) never opens or closes a group.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.S)
_HSPACE = re.compile(r"[ \t]+")
_BARE_ARG = re.compile(r"[^\s$]+")


def _box_argument(text: str, pos: int, budget: list[int]) -> str | None:
    """The argument of a box command whose name ends at `pos`: `{...}` with nested braces, or ` token`."""
    m = _HSPACE.match(text, pos)
    spaced = m is not None
    if spaced:
        pos = m.end()
    if pos >= len(text):
        return None
    if text[pos] == "{":
        depth = 0
        for tok in _BRACE_TOKENS.finditer(text, pos, min(len(text), pos + MAX_BOX_CHARS)):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            t = tok.group()
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : tok.start()].strip() or None
        return None  # unclosed: a truncated answer
    if spaced:  # `\boxed 42`
        m = _BARE_ARG.match(text, pos)
        return m.group() if m else None
    return None  # `\boxedfoo` is another command


def _last_box(text: str, start: int) -> str | None:
    """Content of the last non-empty, closed box in `text[start:]`, scanning backwards from the end."""
    # One pointer per command name, each moved backwards only, so the whole scan is linear in the text.
    ends = [len(text), len(text)]
    found = [text.rfind(name, start, ends[k]) for k, name in enumerate(_BOX_NAMES)]
    budget = [MAX_SCAN_TOKENS]
    for _ in range(MAX_BOX_CANDIDATES):
        k = 0 if found[0] >= found[1] else 1
        i = found[k]
        if i < 0:
            return None
        content = _box_argument(text, i + len(_BOX_NAMES[k]), budget)
        if content is not None:
            return content
        ends[k] = i
        found[k] = text.rfind(_BOX_NAMES[k], start, ends[k])
    return None


def _answer_region(completion: str) -> tuple[int, bool]:
    """Start of the text after the last `</think>`, and whether there was one."""
    cut = completion.rfind(_THINK_END)
    return (cut + len(_THINK_END), True) if cut >= 0 else (0, False)


def extract_answer(completion: str) -> str | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed x`) after the last `</think>`, else in the whole text."""
    if not isinstance(completion, str) or not completion:
        return None
    start, has_think = _answer_region(completion)
    if has_think:
        found = _last_box(completion, start)
        if found is not None:
            return found
    return _last_box(completion, 0)


def _fallback_tail(completion: str) -> str:
    """The end of the answer part (after `</think>` when it is not blank) for math-verify's own extraction."""
    start, has_think = _answer_region(completion)
    if has_think and completion[start:].strip():
        return completion[start:][-FALLBACK_TAIL_CHARS:]
    return completion[-FALLBACK_TAIL_CHARS:]


# --- worker process --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    # A bare gold answer (`\frac{1}{2}`, `1,450,000`) has no delimiters for math-verify to find, so box it.
    text = gold if ("\\boxed" in gold or "$" in gold) else "\\boxed{" + gold + "}"
    return parse(text, parsing_timeout=None)


def _check(kind: str, gold: str, text: str) -> tuple[str, bool | None, str | None]:
    """Parse and compare in this process; `kind` is "box" (text = extracted answer) or "tail" (text = answer tail)."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if kind == "box":
        pred = parse("\\boxed{" + text + "}", parsing_timeout=None)
        extracted: str | None = text
    else:
        pred = parse(text, parsing_timeout=None)
        if not pred:
            return "no_answer", None, None
        # parse returns [sympy object, matched string] (or just the string when sympy parsing failed).
        extracted = next((p for p in reversed(pred) if isinstance(p, str)), None) or str(pred[0])
    ok = bool(verify(gold_parsed, pred, timeout_seconds=None))
    return ("correct" if ok else "incorrect"), ok, extracted


# Answers covering the grammar that math answers use. Parsing them builds ANTLR's lazily grown DFA and sympy's caches;
# a cold process is several times slower on its first hundred distinct answers.
_WARM_UP = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "3/4"),
    ("-\\frac{7}{3}", "-7/3"),
    ("1,450,000", "1450000.0"),
    ("3.14", "3.140"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{\\sqrt{3}}"),
    ("(1, 2)", "\\left(1,2\\right)"),
    ("[0, 1)", "\\left[0,1\\right)"),
    ("(-\\infty, 2] \\cup [3, 4]", "(-\\infty,2]\\cup[3,4]"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("\\frac{5\\pi}{6}", "150^\\circ"),
    ("\\text{Monday}", "Monday"),
    ("\\text{(B)}", "B"),
    ("x^2+2x+1", "(x+1)^2"),
    ("x=5", "5"),
    ("x > 3", "(3, \\infty)"),
    ("10\\%", "0.1"),
    ("2^{10}", "1024"),
    ("\\binom{5}{2}", "5!"),
    ("\\log_2 8", "\\sin\\frac{\\pi}{6}"),
    ("1+2i", "\\left|x-1\\right|"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]


def _quiet_math_verify() -> None:
    # The parent enforces time limits, so math-verify's "timeout is disabled" warning is noise here.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


_warmed = False


def _warm_up() -> None:
    global _warmed
    _quiet_math_verify()
    if not _warmed:  # a worker forked from the warmed fork server inherits all of it
        for gold, answer in _WARM_UP:
            _check("box", gold, answer)
        _warmed = True


def _imported_by_fork_server() -> bool:
    """True while multiprocessing's fork server preloads this module; its forked workers then start warm."""
    code = getattr(getattr(sys.modules.get("multiprocessing.forkserver"), "main", None), "__code__", None)
    frame = sys._getframe(1) if code is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _worker_main(conn: Any, memory_limit_bytes: int | None) -> None:
    """Serve (token, kind, gold, text) jobs until EOF; reply (token, status, is_correct, extracted, retire)."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_limit_bytes:
            # Relative to what the process already maps (the caller's main module may have imported torch).
            limit = _address_space_bytes() + memory_limit_bytes
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        _warm_up()  # before reporting ready, so item deadlines never include it
        conn.send(("ready",))
    except Exception:
        return
    while True:
        try:
            msg = conn.recv()
        except Exception:  # EOF (the parent is gone) or a message too large for the memory limit
            return
        if msg is None:
            return
        token, kind, gold, text = msg
        retire = False
        try:
            status, ok, extracted = _check(kind, gold, text)
        except MemoryError:
            # The heap may be in a poor state after this; answer, then let the parent replace this process.
            status, ok, extracted, retire = "error", None, (text if kind == "box" else None), True
        except BaseException:
            status, ok, extracted = "error", None, (text if kind == "box" else None)
        try:
            conn.send((token, status, ok, extracted, retire))
        except Exception:
            return
        if retire:
            return


# --- the pool (parent side) -----------------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # box | tail
    gold: str
    text: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.gold, self.text)

    def timed_out(self) -> tuple[str, bool | None, str | None]:
        return ("timeout", None, self.text if self.kind == "box" else None)

    def failed(self) -> tuple[str, bool | None, str | None]:
        return ("error", None, self.text if self.kind == "box" else None)


class _Worker:
    def __init__(self, ctx: Any, memory_limit_bytes: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, memory_limit_bytes), daemon=True, name="ckptdpo-verify"
        )
        try:
            self.proc.start()
        finally:
            child.close()  # the parent keeps only its end, so a dead worker reads as EOF
        self.ready = False
        self.start_deadline = time.monotonic() + WORKER_STARTUP_TIMEOUT_S
        self.job: int | None = None
        self.token = 0
        self.sent = 0.0
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(2.0)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


def _start_method() -> str:
    # Never plain fork: the caller may hold threads (torch, Prefect) whose locks a forked child would inherit held.
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class _Pool:
    def __init__(self, memory_limit_bytes: int | None) -> None:
        self.pid = os.getpid()
        self.ctx = mp.get_context(_start_method())
        if self.ctx.get_start_method() == "forkserver":
            # The fork server imports sympy and math-verify once; each worker (and each replacement of a killed one)
            # is then a fork of it that starts in milliseconds instead of re-importing for a second or more.
            self.ctx.set_forkserver_preload(["math_verify", "ckptdpo.verify"])
        self.memory_limit_bytes = memory_limit_bytes
        self.workers: list[_Worker] = []
        self.token = 0

    def _spawn(self) -> bool:
        try:
            self.workers.append(_Worker(self.ctx, self.memory_limit_bytes))
            return True
        except Exception:
            log.warning("could not start a verification worker", exc_info=True)
            return False

    def _retire(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def shutdown(self) -> None:
        for w in list(self.workers):
            try:
                w.conn.send(None)
            except Exception:
                pass
        for w in list(self.workers):
            w.proc.join(0.5)
            self._retire(w)

    def run(self, jobs: list[_Job], timeout_s: float, size: int) -> tuple[list[tuple], list[float]]:
        """Results (status, is_correct, extracted) and seconds from dispatch to result, per job."""
        results: list[tuple | None] = [None] * len(jobs)
        latency = [0.0] * len(jobs)
        pending = collections.deque(range(len(jobs)))
        while len(self.workers) > size:  # a smaller pool was asked for: drop the surplus
            self._retire(self.workers[-1])
        target = min(size, len(jobs))
        failures = 0
        send_failures = [0] * len(jobs)
        try:
            while pending or any(w.job is not None for w in self.workers):
                while pending and len(self.workers) < target and failures < MAX_STARTUP_FAILURES:
                    if not self._spawn():
                        failures += 1
                if failures >= MAX_STARTUP_FAILURES and pending:
                    log.error("verify: workers failed to start %d times; %d items get `error`", failures, len(pending))
                    for i in pending:
                        results[i] = jobs[i].failed()
                    pending.clear()
                for w in list(self.workers):
                    if not (pending and w.ready and w.job is None):
                        continue
                    i = pending.popleft()
                    self.token += 1
                    now = time.monotonic()  # starting other workers above may have taken a while
                    try:
                        w.conn.send((self.token, jobs[i].kind, jobs[i].gold, jobs[i].text))
                    except Exception:
                        # It died while idle, so the job never started: give it to another worker, but only once, as
                        # a job too large to receive kills every worker it is sent to.
                        send_failures[i] += 1
                        if send_failures[i] > 1:
                            results[i] = jobs[i].failed()
                        else:
                            pending.appendleft(i)
                        self._retire(w)
                        continue
                    w.job, w.token, w.sent, w.deadline = i, self.token, now, now + timeout_s
                waiting = [w for w in self.workers if w.job is not None or not w.ready]
                if not waiting:
                    continue
                until = min(w.deadline if w.job is not None else w.start_deadline for w in waiting)
                by_conn = {w.conn: w for w in waiting}
                ready = mp_connection.wait(list(by_conn), timeout=max(0.0, until - time.monotonic()))
                now = time.monotonic()
                for conn in ready:
                    w = by_conn[conn]
                    try:
                        msg = conn.recv()
                    except Exception:  # died: crashed (segfault, kernel OOM kill) or failed to start
                        if w.job is not None:
                            results[w.job] = jobs[w.job].failed()
                            latency[w.job] = now - w.sent
                        else:
                            failures += 1
                        self._retire(w)
                        continue
                    if msg[0] == "ready":
                        w.ready, failures = True, 0
                        continue
                    token, status, ok, extracted, retire = msg
                    if w.job is not None and token == w.token:
                        results[w.job] = (status, ok, extracted)
                        latency[w.job] = now - w.sent
                        w.job = None
                    if retire:
                        self._retire(w)
                for w in list(self.workers):
                    if w.job is not None and now >= w.deadline:
                        results[w.job] = jobs[w.job].timed_out()
                        latency[w.job] = now - w.sent
                        self._retire(w)
                    elif not w.ready and now >= w.start_deadline:
                        failures += 1
                        self._retire(w)
        except BaseException:
            # Interrupted (Ctrl-C): busy workers hold jobs nobody will collect; drop them so the next call is clean.
            for w in list(self.workers):
                if w.job is not None:
                    self._retire(w)
            raise
        return [r if r is not None else ("error", None, None) for r in results], latency


_LOCK = threading.Lock()
_POOL: _Pool | None = None
_CACHE: collections.OrderedDict[tuple[str, str, str], tuple] = collections.OrderedDict()
_ATEXIT_REGISTERED = False
_CACHEABLE = frozenset(("correct", "incorrect", "no_answer"))


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


def clear_cache() -> None:
    """Forget cached verdicts (benchmarks and tests)."""
    with _LOCK:
        _CACHE.clear()


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _get_pool() -> _Pool:
    global _POOL, _ATEXIT_REGISTERED
    if _POOL is None or _POOL.pid != os.getpid():  # a forked child must not touch its parent's workers
        _POOL = _Pool(WORKER_MEMORY_HEADROOM_BYTES)
        if not _ATEXIT_REGISTERED:
            atexit.register(shutdown_pool)
            _ATEXIT_REGISTERED = True
    return _POOL


def _as_gold(value: Any) -> str | None:
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    text = str(value).strip() if not isinstance(value, str) else value.strip()
    return text or None


def verify_batch_timed(
    items: Sequence[tuple[str, str]], *, timeout_s: float = 5.0, workers: int | None = None
) -> tuple[list[Verdict], list[float]]:
    """`verify_batch` plus, per item, the seconds its check took in a worker (0 for cache hits and no-box misses)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n = len(items)
    verdicts: list[Verdict | None] = [None] * n
    latency = [0.0] * n
    keys: list[tuple[str, str, str] | None] = [None] * n
    for idx in range(n):
        try:
            gold_raw, completion = items[idx]
        except Exception:
            verdicts[idx] = Verdict("error", None, None)
            continue
        gold = _as_gold(gold_raw)
        if completion is None or (isinstance(completion, str) and not completion.strip()):
            verdicts[idx] = Verdict("no_answer", None, None)
            continue
        if gold is None or not isinstance(completion, str):
            verdicts[idx] = Verdict("error", None, None)
            continue
        boxed = extract_answer(completion)
        keys[idx] = ("box", gold, boxed) if boxed is not None else ("tail", gold, _fallback_tail(completion))

    with _LOCK:
        todo: dict[tuple[str, str, str], list[int]] = {}
        for idx, key in enumerate(keys):
            if key is None:
                continue
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                verdicts[idx] = Verdict(*hit)
            else:
                todo.setdefault(key, []).append(idx)
        if todo:
            jobs = [_Job(*key) for key in todo]
            results, job_latency = _get_pool().run(jobs, timeout_s, workers or _default_workers())
            for job, result, seconds in zip(jobs, results, job_latency, strict=True):
                if result[0] in _CACHEABLE:
                    _CACHE[job.key] = result
                    if len(_CACHE) > CACHE_SIZE:
                        _CACHE.popitem(last=False)
                for idx in todo[job.key]:
                    verdicts[idx] = Verdict(*result)
                    latency[idx] = seconds
    return [v if v is not None else Verdict("error", None, None) for v in verdicts], latency


def verify_batch(
    items: Sequence[tuple[str, str]], *, timeout_s: float = 5.0, workers: int | None = None
) -> list[Verdict]:
    """Verify (gold_answer, completion_text) pairs; never hangs past the per-item limit, never raises on bad items."""
    return verify_batch_timed(items, timeout_s=timeout_s, workers=workers)[0]


if _imported_by_fork_server():
    try:
        _warm_up()
    except Exception:  # a cold start is slower, not wrong
        pass
