"""The `ckptdpo` command. User errors print one sentence and exit 2; heavy imports live inside handlers.

A run that fails prints one line saying what failed (a full disk names the file, a lost Prefect API its URL) and exits
1; tracebacks, ours and those Prefect logs for a failed task, print only with -v. SIGTERM or SIGINT stops a run within
seconds (tasks/stopping.py), and so does the exit of the temporary Prefect API it started (commands/localserver.py).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from contextlib import contextmanager

from ckptdpo.errors import UserError
from tasks.environment import ckptdpo_home

log = logging.getLogger("ckptdpo")


# --- handlers: one per subcommand; each owns its imports ---------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    if getattr(args, "kind", "math") != "math":
        from commands.verify_kinds import verify_kind_command

        return verify_kind_command(args)
    from commands.verify import verify_command

    return verify_command(args)


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    from commands.checkpoints import checkpoints_command

    return checkpoints_command(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from ckptdpo.models import pull_demo

    path = pull_demo(ckptdpo_home())
    print(path)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    # Prefect is imported only by the commands that run flows.
    from commands.run import run_command

    with _stoppable():
        return run_command(args, home=ckptdpo_home())


def _cmd_demo(args: argparse.Namespace) -> int:
    from commands.run import demo_command

    with _stoppable():  # from the start: the demo's judge server is up before the run begins
        return demo_command(args, home=ckptdpo_home())


@contextmanager
def _stoppable():
    """A signal, or the temporary Prefect API exiting, stops the command within seconds, its children included."""
    from commands.localserver import watch_prefect_api
    from tasks.stopping import stop_on_signals

    with stop_on_signals(), watch_prefect_api():
        yield


def _cmd_status(args: argparse.Namespace) -> int:
    from commands.run import status_command

    return status_command(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from commands.report import report_command

    return report_command(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from commands.report import compare_command

    return compare_command(args)


def _cmd_server(args: argparse.Namespace) -> int:
    from commands.server import server_command

    return server_command(args, home=ckptdpo_home())


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptdpo", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("verify", help="verify completions against gold answers")
    s.add_argument("input", help="JSONL or Parquet file with gold and completion columns")
    s.add_argument("--output", "-o", required=True, help="Parquet file to write verdicts to")
    s.add_argument("--gold-column", default="gold")
    s.add_argument("--completion-column", default="completion")
    s.add_argument("--timeout-s", type=float, default=5.0, help="hard wall-clock limit per item")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    s.add_argument("--max-chars", type=int, default=1_000_000, help="refuse completions longer than this")
    s.add_argument(
        "--answer-format",
        choices=["boxed", "boxed_or_final_statement"],
        default="boxed_or_final_statement",
        help="boxed: only the last \\boxed{}; boxed_or_final_statement: else an explicit final statement at the end",
    )
    s.add_argument(
        "--finish-reason-column",
        default="finish_reason",
        help="column of finish reasons, used when present; a completion cut off at 'length' is never correct",
    )
    s.add_argument(
        "--kind",
        choices=["math", "code", "choice"],
        default="math",
        help="math: gold answers; code: run each completion's code with its `tests` (or stdin/expected_stdout) in a "
        "sandbox; choice: gold letters",
    )
    s.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="--kind code: run model-written code even where it cannot be isolated (resource limits only)",
    )
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("checkpoints", help="paragraph and checkpoint statistics of trajectories")
    s.add_argument("input", help="JSONL or Parquet file with a completion column")
    s.add_argument("--completion-column", default="completion")
    s.add_argument("--verdict-column", default=None, help="column with is_correct/status (auto-detected)")
    s.add_argument("--markers", default="Wait,Alternatively,But", help="comma-separated marker words")
    s.add_argument("--json", dest="json_out", default=None, help="write checkpoints per trajectory as JSON")
    s.set_defaults(func=_cmd_checkpoints)

    s = sub.add_parser("models", help="model provisioning")
    ms = s.add_subparsers(dest="models_command", required=True)
    ms.add_parser("pull-demo", help="provision SmolLM2-135M-Instruct into CKPTDPO_HOME (no hub needed)")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("run", help="run a recipe's pipeline (Prefect flows)")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--stages", default=None, help="comma-separated stages (default: the recipe's)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("demo", help="the demo recipe into runs/demo")
    s.add_argument("--run-dir", default="runs/demo")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("status", help="what is done and what is left in a run directory")
    s.add_argument("run_dir")
    s.set_defaults(func=_cmd_status)

    s = sub.add_parser("report", help="write RUN_DIR/report/index.html")
    s.add_argument("run_dir")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("compare", help="side-by-side metrics of two runs")
    s.add_argument("run_a")
    s.add_argument("run_b")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("server", help="local Prefect server, workers and deployments")
    s.add_argument("action", choices=["up", "down", "status"])
    s.set_defaults(func=_cmd_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # Before anything imports Prefect (its settings are read then): no telemetry, and a start-up limit for the
    # ephemeral API that a busy 2-core machine can meet (the default 20 s is not).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # Our own progress at INFO; third-party libraries (httpx logs every Prefect API call at INFO) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("ckptdpo").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        for handler in logging.getLogger().handlers:  # Prefect's logs reach the console through this root handler
            handler.setFormatter(_WithoutTraceback("%(levelname)s %(message)s"))
    try:
        return int(args.func(args) or 0)
    except BaseException as e:  # a stop ends here whatever it raised: KeyboardInterrupt, Prefect's TerminationSignal
        from tasks.stopping import finish_stop, stop_requested

        if stop_requested():
            finish_stop()  # its last line, its children ended, its exit code: now, not after the task threads
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, KeyboardInterrupt):
            print("interrupted: written shards are kept; run the same command again to resume", file=sys.stderr)
            return 130
        if not isinstance(e, Exception) or args.verbose:
            raise
        # A failed run (a stage past its failure budget, an endpoint that stayed down) is a sentence, not pages of
        # Prefect traceback; nothing it wrote is recorded as done.
        print(describe_failure(e), file=sys.stderr)
        return 1


class _WithoutTraceback(logging.Formatter):
    """The record's message only: tracebacks (a failed task's, logged by Prefect) are what -v is for."""

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return super().format(plain)


def describe_failure(e: BaseException) -> str:
    """The last lines of a failed run: what failed, in one line, then that finished work is kept."""
    resume = (
        "The run stopped; finished shards are kept, and running the same command again resumes from them "
        "(add -v for the traceback)."
    )
    from ckptdpo.shards import DiskFull

    for cause in _chain(e):
        if isinstance(cause, DiskFull):
            return f"error: {cause.strerror}."  # names the file
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {cause.filename}" if cause.filename else ""
            return f"error: no space left on the device{where}; free space and run the same command again."
        api = _prefect_api_url(cause)
        if api is not None:
            from commands.localserver import prefect_api_lost

            return f"{prefect_api_lost(api)[:-1]} ({type(cause).__name__}: {cause})."
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"error: {type(e).__name__}: {first}\n{resume}"


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _prefect_api_url(e: BaseException) -> str | None:
    """The Prefect API's URL when `e` is a failed connection to it (not to a model endpoint)."""
    import httpx

    if not isinstance(e, httpx.TransportError):
        return None
    try:
        url = e.request.url
    except RuntimeError:  # an error raised without its request
        return None
    configured = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if configured:
        return configured if str(url).startswith(configured) else None
    return f"{url.scheme}://{url.host}:{url.port}/api" if url.path.startswith("/api/") else None


if __name__ == "__main__":
    sys.exit(main())
