"""The hf backend: sampler and planner units, then real SmolLM2 generation on CPU (slow, few and small)."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ckptdpo.backends.base import GenerationRequest, problem_message
from ckptdpo.backends.decode import Prepared
from ckptdpo.backends.hf import HFBackend, SamplingParams, local_revision, plan_batches, sample_seed
from ckptdpo.configs import INSTRUCTION

# --- no model needed ---------------------------------------------------------------------------------------------


def params(*requests: GenerationRequest) -> SamplingParams:
    return SamplingParams(list(requests), torch.device("cpu"))


def test_inverse_cdf_sampling_follows_the_uniforms() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 3))
    p = params(*[GenerationRequest("x", temperature=1.0)] * 3)
    assert p.sample(logits, [0.05, 0.25, 0.9]).tolist() == [0, 1, 2]


def test_top_p_top_k_and_greedy_per_row() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 4))
    p = params(
        GenerationRequest("x", temperature=1.0, top_p=0.7),  # keeps only the 0.7 token
        GenerationRequest("x", temperature=1.0, top_k=1),
        GenerationRequest("x", temperature=0.0),
        GenerationRequest("x", temperature=1.0, top_p=0.8),  # keeps 0.7 and 0.2
    )
    for u in (0.0, 0.5, 0.999):
        assert p.sample(logits, [u] * 4).tolist()[:3] == [2, 2, 2]
    assert p.sample(logits, [0.99] * 4).tolist()[3] == 1  # renormalized over {2, 1}: 0.99 falls on token 1
    assert p.sample(logits, [0.1] * 4).tolist()[3] == 2


def test_sampling_frequencies_match_the_distribution() -> None:
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    rows = 4000
    p = params(*[GenerationRequest("x", temperature=1.0)] * rows)
    rng = random.Random(0)
    picked = p.sample(torch.log(probs).repeat(rows, 1), [rng.random() for _ in range(rows)])
    freq = torch.bincount(picked, minlength=4).float() / rows
    assert torch.allclose(freq, probs, atol=0.03)
    # temperature 0.5 squares the odds
    p_cold = params(*[GenerationRequest("x", temperature=0.5)] * rows)
    picked = p_cold.sample(torch.log(probs).repeat(rows, 1), [rng.random() for _ in range(rows)])
    freq = torch.bincount(picked, minlength=4).float() / rows
    assert torch.allclose(freq, probs**2 / (probs**2).sum(), atol=0.03)


def test_sample_streams_differ_per_sample_and_seed() -> None:
    seeds = {sample_seed(s, k) for s in range(5) for k in range(5)}
    assert len(seeds) == 25
    assert sample_seed(3, 1) == sample_seed(3, 1)


def prep(index: int, prompt_len: int, n: int, max_new: int) -> Prepared:
    return Prepared(index, [1] * prompt_len, max_new, GenerationRequest((1,) * prompt_len, n=n, max_tokens=max_new))


def test_plan_respects_rows_and_budget() -> None:
    prepared = [prep(0, 10, 3, 10), prep(1, 50, 1, 10), prep(2, 5, 8, 5), prep(3, 200, 1, 100)]
    batches = plan_batches(prepared, budget=200, max_rows=4)
    covered: dict[int, list[int]] = {}
    for batch in batches:
        rows = sum(u.count for u in batch)
        assert rows <= 4
        assert rows * max(u.cost for u in batch) <= 200 or rows == 1  # a single oversized row still runs
        for u in batch:
            covered.setdefault(u.prep.index, []).extend(range(u.start, u.start + u.count))
    assert {i: sorted(v) for i, v in covered.items()} == {0: [0, 1, 2], 1: [0], 2: list(range(8)), 3: [0]}
    assert plan_batches(prepared, budget=200, max_rows=4) == batches  # a function of the requests alone


def test_local_revision_follows_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    weights = bytearray(random.Random(0).randbytes(3_000_000))
    (tmp_path / "model.safetensors").write_bytes(weights)
    first = local_revision(tmp_path)
    assert first == local_revision(tmp_path)
    # Training rewrites every weight: flip one byte in every 4 KiB page, same size.
    for i in range(0, len(weights), 4096):
        weights[i] ^= 1
    (tmp_path / "model.safetensors").write_bytes(weights)
    second = local_revision(tmp_path)
    assert second != first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert local_revision(tmp_path) != second


# --- the real demo model -----------------------------------------------------------------------------------------


@contextmanager
def settings(backend: HFBackend, **changes):
    """Change backend settings for one test and restore them (the backend is shared by the session)."""
    old = backend.cfg
    backend.cfg = old.model_copy(update=changes)
    try:
        yield
    finally:
        backend.cfg = old


@pytest.mark.slow
def test_greedy_matches_model_generate_in_a_padded_batch(hf_backend: HFBackend) -> None:
    tok, model = hf_backend.tokenizer, hf_backend.model
    prompts = [hf_backend.chat_prompt(q) for q in ("What is 12*3?", "Name a prime number larger than ten.", "Hi")]
    results = hf_backend.generate([GenerationRequest(p, max_tokens=10, temperature=0.0) for p in prompts])
    for prompt, res in zip(prompts, results, strict=True):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids.input_ids.shape[1] :].tolist()
        assert res.samples[0].token_ids == ref
        assert res.prompt_tokens == ids.input_ids.shape[1]


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(hf_backend: HFBackend) -> None:
    prompts = [hf_backend.chat_prompt("Write a word."), hf_backend.chat_prompt("Tell me about cats.")]
    reqs = [GenerationRequest(p, n=2, seed=7, max_tokens=10, temperature=1.0) for p in prompts]
    first = hf_backend.generate(reqs)
    second = hf_backend.generate(reqs)
    texts = [[s.token_ids for s in r.samples] for r in first]
    assert texts == [[s.token_ids for s in r.samples] for r in second]
    assert len({tuple(t) for r in texts for t in r}) > 1  # the samples are not all the same
    other = hf_backend.generate([GenerationRequest(p, n=2, seed=8, max_tokens=10, temperature=1.0) for p in prompts])
    assert [[s.token_ids for s in r.samples] for r in other] != texts


@pytest.mark.slow
def test_n_samples_share_one_prefill(hf_backend: HFBackend) -> None:
    prompt = hf_backend.chat_prompt("List three fruits.")
    num_prompt = hf_backend.count_tokens([prompt])[0]
    before = hf_backend.stats.prompt_tokens_computed
    (res,) = hf_backend.generate([GenerationRequest(prompt, n=4, seed=1, max_tokens=4, temperature=1.0)])
    assert len(res.samples) == 4 and all(s.num_tokens == 4 for s in res.samples)
    assert hf_backend.stats.prompt_tokens_computed - before == num_prompt  # not 4 * num_prompt
    # Rows capped at 2 per batch: two groups, two prefills, still one random stream per sample.
    with settings(hf_backend, max_batch_size=2):
        before = hf_backend.stats.prompt_tokens_computed
        (split,) = hf_backend.generate([GenerationRequest(prompt, n=4, seed=1, max_tokens=4, temperature=1.0)])
        assert hf_backend.stats.prompt_tokens_computed - before == 2 * num_prompt
    assert len(split.samples) == 4
    # A prompt as token ids is the same prompt.
    ids = tuple(hf_backend.tokenizer(prompt, add_special_tokens=False).input_ids)
    greedy = [GenerationRequest(p, max_tokens=4, temperature=0.0) for p in (prompt, ids)]
    a, b = hf_backend.generate(greedy)
    assert a.samples[0].token_ids == b.samples[0].token_ids


@pytest.mark.slow
def test_stop_strings_eos_and_length(hf_backend: HFBackend) -> None:
    # Without the reasoning instruction the demo model answers in a few tokens and ends its turn.
    prompt = hf_backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    (free,) = hf_backend.generate([GenerationRequest(prompt, max_tokens=16, temperature=0.0)])
    sample = free.samples[0]
    # The demo model answers and ends its turn: EOS is "stop", and the EOS token is not in the text.
    assert sample.finish_reason == "stop" and sample.token_ids[-1] in hf_backend.eos_ids
    assert "<|im_end|>" not in sample.text and "5" in sample.text
    text = sample.text
    stop_late, stop_early = text[-3:], text[2:4]
    assert text.find(stop_early) < text.find(stop_late)
    (cut,) = hf_backend.generate(
        [GenerationRequest(prompt, max_tokens=16, temperature=0.0, stop=(stop_late, stop_early))]
    )
    s = cut.samples[0]
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop_early)]
    assert s.num_tokens < sample.num_tokens
    (short,) = hf_backend.generate([GenerationRequest(prompt, max_tokens=3, temperature=0.0)])
    assert short.samples[0].finish_reason == "length" and short.samples[0].num_tokens == 3


@pytest.mark.slow
def test_loop_guard_stops_a_looping_sample(hf_backend: HFBackend) -> None:
    prompt = "Wait, triangle AFE: same.\n\n" * 6  # greedy continues the loop
    before = hf_backend.stats.finish_reasons.get("loop", 0)
    with settings(hf_backend, loop_min_repeats=2):
        (res,) = hf_backend.generate([GenerationRequest(prompt, max_tokens=40, temperature=0.0)])
    s = res.samples[0]
    assert s.finish_reason == "loop" and s.num_tokens < 40
    assert s.text.count("Wait, triangle AFE: same.") >= 2
    assert hf_backend.stats.finish_reasons["loop"] == before + 1
    with settings(hf_backend, loop_guard=False):
        (res,) = hf_backend.generate([GenerationRequest(prompt, max_tokens=s.num_tokens + 4, temperature=0.0)])
    assert res.samples[0].finish_reason == "length"
    assert res.samples[0].token_ids[: s.num_tokens] == s.token_ids


@pytest.mark.slow
def test_bad_requests_fail_alone(hf_backend: HFBackend) -> None:
    too_long = (1,) * hf_backend.max_len
    reqs = [
        GenerationRequest(too_long, max_tokens=2),
        GenerationRequest("", max_tokens=2),
        GenerationRequest("Hello", max_tokens=2, temperature=0.0),
        GenerationRequest((10**9,), max_tokens=2),
    ]
    results = hf_backend.generate(reqs)
    assert "context" in results[0].error and results[0].prompt_tokens == hf_backend.max_len
    assert "empty" in results[1].error
    assert results[2].error is None and results[2].samples[0].num_tokens == 2
    assert "token ids" in results[3].error
    assert all(r.samples == [] for r in (results[0], results[1], results[3]))


@pytest.mark.slow
def test_score_matches_a_direct_forward_pass(hf_backend: HFBackend) -> None:
    tok, model = hf_backend.tokenizer, hf_backend.model
    prompts = [hf_backend.chat_prompt("What is 2+3?"), "The capital of France is", "1, 2, 3,"]
    conts = ["2 + 3 = 5", " Paris, a city on the Seine.", " 4"]
    got = hf_backend.score(prompts, conts)
    for prompt, cont, value in zip(prompts, conts, got, strict=True):
        p = tok(prompt, add_special_tokens=False).input_ids
        c = tok(cont, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), dim=-1)
        want = sum(float(logprobs[len(p) - 1 + k, t]) for k, t in enumerate(c))
        assert math.isclose(value, want, abs_tol=1e-3)
    assert hf_backend.score(["abc"], [""]) == [0.0]
    assert got[2] > got[1] / 3  # a likely continuation scores higher per token than a long one in total


@pytest.mark.slow
def test_chat_prompt_chat_and_count_tokens(hf_backend: HFBackend) -> None:
    prompt = hf_backend.chat_prompt("What is 1+1?")
    assert problem_message("What is 1+1?") in prompt and INSTRUCTION in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    (reply,) = hf_backend.chat([[{"role": "user", "content": "Say yes."}]], max_tokens=4)
    assert isinstance(reply, str) and reply
    a, b = hf_backend.count_tokens(["hello world", prompt])
    assert a == 2 and b == len(hf_backend.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert hf_backend.revision.startswith("sha256:") and hf_backend.model_id
