"""Verdicts are the same from any caller: an unguarded script, `python -c`, a script on stdin, a thread.

Issue 12, case 1: workers used to re-import the caller's `__main__`, so a plain script without an
`if __name__ == "__main__":` guard got `error` for every item. This runs a real interpreter subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

from ckptdpo.verify import verify_batch

ITEMS = [
    ["204", "The answer is \\boxed{204}."],
    ["\\$18.90", "\\boxed{\\$18.90}"],
    ["8", 'So the answer to the question "4 + 4" is indeed 8.'],
    ["5", "\\boxed{6}"],
    ["5", "no idea"],
    ["12", "<think>so \\boxed{12}, but then"],
    ["12", "it is \\boxed{12}. Let me check", "length"],
    ["7", "\\boxed{9^{9^{9^{9^{9}}}}}"],
]

# No main guard, on purpose: this is what a new user writes.
SCRIPT = """
import dataclasses, json, sys, threading
from ckptdpo.verify import verify_batch

items = [tuple(it) for it in json.load(open(sys.argv[1]))]
out = {"main": [dataclasses.astuple(v) for v in verify_batch(items, timeout_s=5.0)]}
t = threading.Thread(target=lambda: out.update(thread=[dataclasses.astuple(v) for v in verify_batch(items)]))
t.start()
t.join()
print(json.dumps(out))
"""


def expected() -> list[list]:
    return [list(dataclasses.astuple(v)) for v in verify_batch([tuple(it) for it in ITEMS], timeout_s=5.0)]


def run_callers(tmp_path: Path, kinds: tuple[str, ...] = ("script", "dash_c", "stdin")) -> dict[str, dict]:
    """Start callers of each kind at once (they overlap on the CPUs) and collect what each printed."""
    items = tmp_path / "items.json"
    items.write_text(json.dumps(ITEMS), encoding="utf-8")
    script = tmp_path / "plain_script.py"
    script.write_text(SCRIPT, encoding="utf-8")
    every = {
        "script": ([sys.executable, str(script), str(items)], None),
        "dash_c": ([sys.executable, "-c", SCRIPT, str(items)], None),
        "stdin": ([sys.executable, "-", str(items)], SCRIPT),
    }
    commands = {k: every[k] for k in kinds}
    procs = {
        name: subprocess.Popen(
            cmd, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, _) in commands.items()
    }
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(commands[name][1], timeout=180)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert "Traceback" not in err and "failed to start" not in err, err[-2000:]
        outputs[name] = json.loads(out.strip().splitlines()[-1])
    return outputs


def test_unguarded_script_agrees_with_this_process(tmp_path: Path) -> None:
    """The reported case; `python -c` and stdin callers run in tests/flows/test_verify_callers.py (slower)."""
    want = expected()
    assert [v[0] for v in want] == [
        "correct",
        "correct",
        "correct",
        "incorrect",
        "no_answer",
        "no_answer",
        "no_answer",
        "timeout",
    ]
    for name, out in run_callers(tmp_path, ("script",)).items():
        assert out["main"] == want, name
        assert out["thread"] == want, name


def test_thread_in_this_process_agrees() -> None:
    got: list = []
    t = threading.Thread(target=lambda: got.extend(verify_batch([tuple(it) for it in ITEMS], timeout_s=5.0)))
    t.start()
    t.join(120)
    assert [list(dataclasses.astuple(v)) for v in got] == expected()
