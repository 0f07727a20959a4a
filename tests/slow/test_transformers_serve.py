"""The openai backend against a real server no one here wrote: `transformers serve` (transformers' `serving` extra)
with the demo model on loopback, started and stopped by a fixture. It has no `n`, no `echo`/`logprobs`, no token-id
prompts, and it answers 422 to vLLM's sampling fields; the backend must learn all of that from its replies and still
sample what the recipe asks. Tiny `max_tokens` keep the module near a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.openai import OpenAIBackend, ServerCapabilityError
from ckptdpo.configs import JudgeConfig, ResampleConfig, backend_config
from commands.localserver import server_binary, transformers_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(demo_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base_url, model path) of a `transformers serve` process serving the demo model; stopped afterwards (the same
    server process `ckptdpo demo` starts for its judge)."""
    if server_binary() is None or importlib.util.find_spec("fastapi") is None:
        pytest.skip("`transformers serve` is not installed: pip install 'ckptdpo[serve]' (transformers[serving])")
    with transformers_server(demo_model_path, tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url, demo_model_path


@pytest.fixture(scope="module")
def backend(served):
    url, model = served
    # One request at a time: the server seeds torch globally per request, so concurrent ones would interleave.
    be = OpenAIBackend(backend_config(kind="openai", model=str(model), base_urls=[url], max_concurrency=1))
    yield be
    be.close()


def test_seeded_sampling_with_n_emulated_and_fields_adapted(backend: OpenAIBackend) -> None:
    prompt = backend.chat_prompt("What is 2+3?")
    req = GenerationRequest(prompt, n=3, seed=11, max_tokens=8, temperature=1.0, top_p=0.95)
    (res,) = backend.generate([req])
    assert res.error is None and len(res.samples) == 3
    ep = backend.http.endpoints[0]
    # What the server turned out to take, learned from its replies.
    assert ep.single_n and ep.sampling == "generation_config" and not ep.token_prompts
    texts = [s.text for s in res.samples]
    # Sampling really happens (without do_sample the server decodes greedily at any temperature), and is seeded.
    assert len(set(texts)) > 1, texts
    (again,) = backend.generate([req])
    assert [s.text for s in again.samples] == texts
    for s in res.samples:
        assert 0 < s.num_tokens <= 8 and (s.finish_reason == "stop" or s.num_tokens == 8)
    n_prompt = len(backend.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert res.prompt_tokens == n_prompt and res.prompt_tokens_requested == 3 * n_prompt


def test_greedy_text_and_counts_match_the_hf_backend(backend: OpenAIBackend, hf_backend) -> None:
    prompt = backend.chat_prompt("Name a prime number.")
    req = GenerationRequest(prompt, max_tokens=6, temperature=0.0, stop=("\n\n",))
    (served,) = backend.generate([req])
    (direct,) = hf_backend.generate([req])
    assert served.error is None and served.samples[0].text == direct.samples[0].text
    assert served.samples[0].num_tokens == direct.samples[0].num_tokens  # the server's usage, not a re-encoding


def test_the_dto_judge_chats_through_the_server(backend: OpenAIBackend) -> None:
    from ckptdpo.judge import judge_segments

    segments = ["We add 2 and 3.", "2 + 3 = 5.", "Wait, the weather is nice today."]
    cfg = JudgeConfig(max_tokens=3, reply_format="yes_no")  # the demo's judge settings
    keeps, stats = judge_segments(backend, "What is 2+3?", segments, cfg)
    assert len(keeps) == 3 and keeps[0] and all(isinstance(k, bool) for k in keeps)
    # The first segment is never judged (it sets the problem up); the other two are, and every reply parses.
    assert stats["segments_judged"] == 2 and stats["judge_parse_failures"] == 0, stats
    (reply,) = backend.chat([[{"role": "user", "content": "Say hi."}]], max_tokens=6)
    assert reply.strip()


def test_a_small_resample_round_through_the_server(backend: OpenAIBackend) -> None:
    from ckptdpo.resample import attempt_rows, build_pairs, build_requests, plan_slots
    from ckptdpo.verify import verify_batch

    completion = "2 + 3 = 5.\n\nWait, let me check: 2 + 3 = 5.\n\nBut is it 6? No.\n\nSo \\boxed{5}"
    chars = [completion.index("\n\nWait") + 2, completion.index("\n\nBut") + 2]
    trajectory = {
        "sample_id": "s1", "problem_id": "p1", "status": "correct", "completion": completion,
        "checkpoint_chars": chars, "prompt": backend.chat_prompt("What is 2+3?"), "prompt_tokens": 40,
        "completion_tokens": 30, "gold_answer": "5",
    }  # fmt: skip
    cfg = ResampleConfig(max_tokens=12, w2r=False)
    slots = plan_slots(trajectory, cfg)
    requests = build_requests([(s, s.draws) for s in slots], {"s1": trajectory}, cfg, round_index=1)
    results = backend.generate(requests)
    assert all(r.error is None for r in results)
    assert [len(r.samples) for r in results] == [s.draws for s in slots]  # n emulated where the server ignores it
    attempts = []
    for slot, req, res in zip(slots, requests, results, strict=True):
        verdicts = verify_batch([("5", s.text) for s in res.samples], timeout_s=5.0, workers=1)
        attempts += attempt_rows(slot, req, res.samples, verdicts, round_index=1)
    assert len(attempts) == sum(s.draws for s in slots)
    assert all(a["status"] in ("correct", "incorrect", "no_answer", "timeout", "error") for a in attempts)
    assert all(0 < a["completion_tokens"] <= 12 for a in attempts)
    pairs, _ = build_pairs({"s1": trajectory}, attempts, cfg, backend.count_tokens, backend.model_id)
    wrong = sum(a["status"] == "incorrect" for a in attempts)
    assert len(pairs) <= wrong and all(p["chosen"] != p["rejected"] for p in pairs)


def test_score_fails_with_the_probe_setting_to_use(backend: OpenAIBackend) -> None:
    with pytest.raises(ServerCapabilityError, match=r"dto\.probe: sample"):
        backend.score(["What is 2+3? \\boxed{"], ["5}"])
