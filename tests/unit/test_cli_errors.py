"""What the CLI prints for a failed run (issue 26): one line saying what failed, tracebacks only with -v."""

from __future__ import annotations

import errno
import logging

import httpx

from ckptdpo.shards import DiskFull
from commands.cli import _WithoutTraceback, describe_failure


def _connect_error(url: str) -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused", request=httpx.Request("GET", url))


def test_a_full_disk_is_one_line_naming_the_file():
    try:
        try:
            raise DiskFull(errno.ENOSPC, "no space left on the device writing /r/generate/part-00002.parquet; free it")
        except DiskFull as e:
            raise RuntimeError("stage failed") from e
    except RuntimeError as e:
        assert (
            describe_failure(e)
            == "error: no space left on the device writing /r/generate/part-00002.parquet; free it."
        )


def test_a_full_disk_elsewhere_names_the_file_when_the_error_does():
    line = describe_failure(OSError(errno.ENOSPC, "No space left on device", "/home/u/.prefect/storage/x"))
    assert line == (
        "error: no space left on the device writing /home/u/.prefect/storage/x; free space and run the same command "
        "again."
    )


def test_a_lost_temporary_prefect_api_is_named_with_its_url_and_what_to_do(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    line = describe_failure(_connect_error("http://127.0.0.1:8833/api/flow_runs/abc/set_state"))
    assert line.startswith("error: the Prefect API at http://127.0.0.1:8833/api stopped answering")
    assert "run the same command again" in line and "\n" not in line


def test_a_lost_prefect_server_says_to_check_it(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    line = describe_failure(_connect_error("http://prefect:4200/api/task_runs/"))
    assert "the Prefect API at http://prefect:4200/api stopped answering" in line and "server status" in line
    # A connection to anything else (a model endpoint) is not the Prefect API.
    assert "Prefect API" not in describe_failure(_connect_error("http://vllm:8000/v1/completions"))


def test_other_failures_keep_their_first_line_and_the_resume_hint():
    text = describe_failure(RuntimeError("generate shard 3: 2 request(s) failed (failure budget 0): HTTP 500\nmore"))
    first, second = text.splitlines()
    assert first == "error: RuntimeError: generate shard 3: 2 request(s) failed (failure budget 0): HTTP 500"
    assert "add -v for the traceback" in second


def test_log_records_print_without_their_traceback_unless_verbose():
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", None, None)
        import sys

        record.exc_info = sys.exc_info()
    assert _WithoutTraceback("%(levelname)s %(message)s").format(record) == "ERROR Task run failed"
    assert record.exc_info is not None  # other handlers (Prefect's API log) still get it
    assert "Traceback" in logging.Formatter("%(message)s").format(record)


def test_the_server_outage_a_run_waits_out_comes_from_the_environment(monkeypatch):
    import pytest

    from ckptdpo.errors import UserError
    from commands.localserver import SERVER_OUTAGE_S, server_outage_s

    monkeypatch.delenv("CKPTDPO_SERVER_OUTAGE_S", raising=False)
    assert server_outage_s() == SERVER_OUTAGE_S == 60
    monkeypatch.setenv("CKPTDPO_SERVER_OUTAGE_S", "15")
    assert server_outage_s() == 15
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("CKPTDPO_SERVER_OUTAGE_S", bad)
        with pytest.raises(UserError, match="CKPTDPO_SERVER_OUTAGE_S"):
            server_outage_s()
