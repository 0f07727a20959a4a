"""The refresh with its generation endpoint down for a night: nothing of that night is recorded as processed, and the
next refresh (endpoint up) processes that night's problems too.

The endpoint is `tests/openai_server.py`'s HTTP server over the fake backend, reached through the real `openai`
backend; "down" is a port nothing listens on (a server that was started and stopped, so the port is known free).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ckptdpo.backends.fake import FakeBackend
from ckptdpo.backends.openai import CHATML_TEMPLATE
from ckptdpo.lineage import read_state
from ckptdpo.shards import read_stage
from tests.flows.test_ops import QUESTIONS, scripted, write_problems
from tests.openai_server import OpenAIServer


def fake_script(questions) -> dict:
    script = {"template": CHATML_TEMPLATE, "problems": {}, "continuations": []}
    for q, gold in questions:
        problems, continuations = scripted(q, gold)
        script["problems"].update(problems)
        script["continuations"].extend(continuations)
    return script


def openai_recipe(tmp: Path, base_url: str, **sections) -> Path:
    """A recipe on the `openai` backend at `base_url`, no retries anywhere (a down endpoint fails at once)."""
    recipe = {
        "name": "refresh-endpoint",
        "stages": ["generate", "verify", "checkpoints", "resample"],
        "problems": {"source": "file", "path": "problems.jsonl"},
        "backend": {"kind": "openai", "model": "served", "base_urls": [base_url], "max_retries": 0},
        "generate": {"num_samples": 2, "max_tokens": 100, "shard_size": 1},
        "verify": {"timeout_s": 5, "workers": 1},
        "resample": {"max_rounds": 2, "max_attempts": 2, "max_tokens": 100},
        "task_runner": {"retries": 0},
        **sections,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def closed_url() -> str:
    with OpenAIServer(FakeBackend(fake_script(QUESTIONS))) as srv:
        url = srv.base_url
    return url  # the server is stopped: connections to its port are refused


@pytest.mark.slow
def test_a_night_with_the_endpoint_down_is_processed_by_the_next_refresh(prefect_harness, tmp_path: Path):
    from flows.refresh import refresh_flow

    write_problems(tmp_path / "problems.jsonl", QUESTIONS[:2])
    data = tmp_path / "data"
    recipe = openai_recipe(tmp_path, closed_url())
    with pytest.raises(Exception):  # noqa: B017 (whatever the transport raises: the refresh must fail)
        refresh_flow(str(recipe), str(data))
    assert read_state(data).get("problems", {}) == {}, "a night without verified samples recorded problems"

    write_problems(tmp_path / "problems.jsonl", QUESTIONS)  # the source grew overnight
    with OpenAIServer(FakeBackend(fake_script(QUESTIONS))) as srv:
        openai_recipe(tmp_path, srv.base_url)
        second = refresh_flow(str(recipe), str(data))
    # The first night's two problems and the new one: all three processed, all three recorded.
    assert second["new_problems"] == 3 and second["recorded_problems"] == 3 and second["unverified_problems"] == []
    pairs = read_stage(data / "latest" / "pairs").to_pylist()
    assert sorted({p["problem_id"] for p in pairs}) == ["q0", "q1", "q2"] and len(pairs) == 6
    assert sorted(read_state(data)["problems"]) == ["q0", "q1", "q2"]


@pytest.mark.slow
def test_a_problem_whose_generation_failed_within_the_budget_stays_new(prefect_harness, tmp_path: Path):
    """The failure budget lets the night finish without one problem: it is published without it and not recorded,
    so the next refresh processes it (before, every new problem was recorded and that one was never tried again)."""
    from flows.refresh import refresh_flow

    write_problems(tmp_path / "problems.jsonl", QUESTIONS[:2])
    data = tmp_path / "data"
    with OpenAIServer(FakeBackend(fake_script(QUESTIONS)), fail_first=[500]) as srv:  # one request fails
        recipe = openai_recipe(tmp_path, srv.base_url, failure_budget={"generate": 1})
        first = refresh_flow(str(recipe), str(data))
    (failed,) = first["unverified_problems"]
    assert first["recorded_problems"] == 1 and first["new_pairs"] == 2
    assert sorted(read_state(data)["problems"]) == sorted({"q0", "q1"} - {failed})

    write_problems(tmp_path / "problems.jsonl", QUESTIONS)
    with OpenAIServer(FakeBackend(fake_script(QUESTIONS))) as srv:
        openai_recipe(tmp_path, srv.base_url, failure_budget={"generate": 1})
        second = refresh_flow(str(recipe), str(data))
    assert second["new_problems"] == 2 and second["recorded_problems"] == 2 and second["carried_pairs"] == 2
    pairs = read_stage(data / "latest" / "pairs").to_pylist()
    assert sorted({p["problem_id"] for p in pairs}) == ["q0", "q1", "q2"] and len(pairs) == 6
    assert sorted(read_state(data)["problems"]) == ["q0", "q1", "q2"]
    assert json.loads((data / "latest" / "version.json").read_text())["num_pairs"] == 6
