"""How long `ckptdpo run` takes to end after SIGTERM / SIGINT, to its process or its whole process group, and whether
any process it started outlives it. Goal: within 10 s, under load.

Each trial starts the CLI in a session of its own (as a supervisor would), waits for the first shard of `--stage`,
sends the signal and times the exit; then it lists what is still running in the process group or among the children
recorded at the signal. `--load N` keeps N busy-looping processes running throughout (CPU contention on top of
whatever else the machine does). `--model` uses the demo model (hf backend) instead of the fake backend. `--api`
adds trials where the run's temporary Prefect API is killed instead (SIGKILL), which must end the run too.

    python benchmarks/stop_latency.py [--trials 2] [--load 2] [--model] [--api] [--stage generate]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.stopping import descendants, is_running  # noqa: E402

CASES = [("SIGTERM", "group"), ("SIGTERM", "pid"), ("SIGINT", "group"), ("SIGINT", "pid")]


def busy() -> None:
    while True:
        pass


def fake_recipe(tmp: Path) -> Path:
    from tests.conftest import write_fake_recipe
    from tests.flows.test_pipeline import PROBLEMS, SCRIPT, A, B

    script = {**SCRIPT, "problems": dict(SCRIPT["problems"]), "delay_s": 0.5}
    problems = list(PROBLEMS)
    for i in range(40):
        script["problems"][f"Copy {i}: what is 2 + 3?"] = {"samples": [A, B]}
        problems.append({"id": f"c{i}", "problem": f"Copy {i}: what is 2 + 3?", "answer": "5"})
    return write_fake_recipe(tmp, script, problems, stages=["generate", "verify"])


def command(args: argparse.Namespace, tmp: Path, run_dir: Path) -> list[str]:
    if args.model:
        sets = [
            "problems.num_problems=6",
            "generate.shard_size=1",
            "generate.num_samples=2",
            "generate.max_tokens=160",
        ]
        recipe, extra = REPO / "recipes" / "demo.yaml", ["--stages", "generate"]
        extra += [x for s in sets for x in ("--set", s)]
    else:
        recipe, extra = fake_recipe(tmp), []
    return [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(run_dir), *extra]


def pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def trial(args: argparse.Namespace, how: str, target: str) -> tuple[float | None, int, int]:
    """(seconds to exit or None past the limit, exit code, processes left running)."""
    tmp = Path(tempfile.mkdtemp(prefix="ckptdpo-stop-"))
    run_dir = tmp / "run"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    with open(tmp / "out.txt", "w") as out:
        proc = subprocess.Popen(command(args, tmp, run_dir), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    first = run_dir / args.stage / "part-00000.parquet"
    while not first.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended first: {(tmp / 'out.txt').read_text()[-2000:]}")
        time.sleep(0.1)
    kids = descendants(proc.pid)
    t0 = time.monotonic()
    if how == "API":
        (api,) = [p for p in kids if b"create_app" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(api, signal.SIGKILL)
    elif target == "group":
        os.killpg(proc.pid, getattr(signal, how))
    else:
        proc.send_signal(getattr(signal, how))
    try:
        proc.wait(timeout=args.limit_s)
        took = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        took = None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    group = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and pgid(int(p.name)) == proc.pid]
    left = {p for p in [*kids, *group] if is_running(p)}
    return took, proc.returncode, len(left)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--load", type=int, default=0, help="busy-looping processes kept running during the trials")
    p.add_argument("--model", action="store_true", help="the demo model (hf backend) instead of the fake backend")
    p.add_argument("--api", action="store_true", help="also kill the temporary Prefect API instead of signalling")
    p.add_argument("--stage", default="generate", help="signal once this stage's first shard exists")
    p.add_argument("--limit-s", type=float, default=180.0)
    args = p.parse_args()
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for h in hogs:
        h.start()
    print(f"cores: {os.cpu_count()}, extra busy processes: {args.load}, load average {os.getloadavg()[0]:.2f}, "
          f"backend: {'hf (demo model)' if args.model else 'fake'}, signalled during: {args.stage}")  # fmt: skip
    print("| stop | to | trials | exit code | seconds to exit (each) | median | max | processes left |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: |")
    cases = CASES + ([("API", "killed")] if args.api else [])
    try:
        for how, target in cases:
            results = [trial(args, how, target) for _ in range(args.trials)]
            times = [t for t, _, _ in results if t is not None]
            shown = ", ".join("-" if t is None else f"{t:.1f}" for t, _, _ in results)
            codes = ", ".join(sorted({str(c) for _, c, _ in results}))
            med = f"{statistics.median(times):.1f}" if times else "-"
            worst = f"{max(times):.1f}" if len(times) == len(results) else f"> {args.limit_s:.0f}"
            print(f"| {how} | {target} | {len(results)} | {codes} | {shown} | {med} | {worst} | "
                  f"{sum(n for _, _, n in results)} |", flush=True)  # fmt: skip
    finally:
        for h in hogs:
            h.terminate()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
