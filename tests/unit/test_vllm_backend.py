"""The vllm adapter against the stand-in in tests/vllm_standin (vLLM cannot run on CPU-only machines)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckptdpo.backends import make_backend
from ckptdpo.backends.base import GenerationRequest, problem_message
from ckptdpo.configs import backend_config
from ckptdpo.errors import UserError

STANDIN = Path(__file__).parent / "vllm_standin"


@pytest.fixture
def vllm(monkeypatch):
    """The stand-in imported as `vllm`, removed again afterwards."""
    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    assert vllm.__version__.endswith("+standin")
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def make(vllm, tmp_path):
    def build(**overrides):
        cfg = backend_config(kind="vllm", model=str(tmp_path), **overrides)
        return make_backend(cfg, home=tmp_path)

    return build


def ids_of(text: str) -> list[int]:
    return [ord(c) + 3 for c in text]


def test_config_reaches_the_engine(make, tmp_path) -> None:
    be = make(tensor_parallel_size=2, gpu_memory_utilization=0.5, enable_prefix_caching=False, max_model_len=300)
    args = be.llm.init_args
    assert args["model"] == str(tmp_path)
    assert (args["tensor_parallel_size"], args["gpu_memory_utilization"]) == (2, 0.5)
    assert args["enable_prefix_caching"] is False and args["max_model_len"] == 300
    assert args["seed"] == 0 and args["revision"] is None  # a local path has no hub revision
    assert be.max_len == 300 and be.revision.startswith("sha256:")
    assert "max_model_len" not in make().llm.init_args  # unset: the model's own context length


def test_n_samples_with_seeds_and_sampling_params(make) -> None:
    be = make()
    req = GenerationRequest("Solve it.", n=3, seed=5, max_tokens=40, temperature=0.7, top_p=0.9, top_k=20, stop=("!",))
    (a,) = be.generate([req])
    (b,) = be.generate([req])
    (c,) = be.generate([GenerationRequest("Solve it.", n=3, seed=6, max_tokens=40)])
    assert a.error is None and len(a.samples) == 3
    assert [s.text for s in a.samples] == [s.text for s in b.samples]  # seeded: reproducible
    assert [s.text for s in a.samples] != [s.text for s in c.samples]
    assert len({s.text for s in a.samples}) > 1  # the n samples differ
    for s in a.samples:
        assert s.num_tokens == len(s.token_ids) <= 40
        assert s.finish_reason in ("stop", "length")
    sp = be.llm.calls[0].params[0]
    assert (sp.n, sp.seed, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (3, 5, 40, 0.7, 0.9, 20)
    assert sp.stop == ["!"]
    assert be.stats.requests == 3 and be.stats.samples == 9


def test_prompts_go_as_token_ids(make) -> None:
    be = make()
    be.generate([GenerationRequest("abc"), GenerationRequest((7, 8, 9, 10))])
    prompts = be.llm.calls[0].prompts
    assert prompts == [{"prompt_token_ids": ids_of("abc")}, {"prompt_token_ids": [7, 8, 9, 10]}]  # no BOS added


def test_overlong_prompt_is_a_request_error_and_the_rest_run(make) -> None:
    be = make(max_model_len=64)
    short, long_ = GenerationRequest("short", max_tokens=8), GenerationRequest("x" * 64, max_tokens=8)
    results = be.generate([short, long_, short])
    assert results[1].error and "64 tokens" in results[1].error and not results[1].samples
    assert results[0].error is None and results[2].error is None and results[0].samples
    assert len(be.llm.calls) == 1 and len(be.llm.calls[0].prompts) == 2  # one engine call, the long one left out
    (fits,) = be.generate([GenerationRequest("x" * 63, max_tokens=8, seed=0)])
    assert fits.error is None and fits.samples[0].num_tokens <= 1  # the context ends after one token
    with pytest.raises(ValueError, match="maximum model length"):  # what the engine would do to the whole batch
        be.llm.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": [5] * 64}])


def test_stop_strings_and_length(make) -> None:
    be = make(loop_guard=False)
    results = be.generate([GenerationRequest("p", n=4, seed=s, max_tokens=60, stop=(".",)) for s in range(4)])
    samples = [s for r in results for s in r.samples]
    assert all("." not in s.text for s in samples)
    assert any(s.finish_reason == "stop" for s in samples)
    (cut,) = be.generate([GenerationRequest("p", n=2, seed=1, max_tokens=5)])
    assert all(s.finish_reason in ("length", "stop") and s.num_tokens <= 5 for s in cut.samples)
    assert any(s.finish_reason == "length" and s.num_tokens == 5 for s in cut.samples)


def test_loop_guard_uses_vllm_repetition_detection(make) -> None:
    be = make(loop_ngram=8, loop_min_repeats=4)
    (res,) = be.generate([GenerationRequest("go LOOP", max_tokens=1000)])
    rd = be.llm.calls[0].params[0].repetition_detection
    assert (rd.min_pattern_size, rd.max_pattern_size, rd.min_count) == (8, 16, 4)
    (s,) = res.samples
    assert s.finish_reason == "loop" and s.num_tokens < 1000
    assert be.stats.finish_reasons == {"loop": 1}
    (off,) = make(loop_guard=False).generate([GenerationRequest("go LOOP", max_tokens=300)])
    assert off.samples[0].finish_reason == "length" and off.samples[0].num_tokens == 300


def test_paragraph_loops_are_cut_post_hoc(make) -> None:
    # Blocks of 64 tokens x 4 never fit in 120 tokens, so the engine check cannot fire; the paragraph check does.
    be = make(loop_ngram=64, loop_min_repeats=4)
    (res,) = be.generate([GenerationRequest("go LOOP", max_tokens=120)])
    (s,) = res.samples
    assert s.finish_reason == "loop"
    assert s.text == "\n\n".join(["Wait, same."] * 4)
    assert s.num_tokens == len(s.text) == len(s.token_ids)


def test_prefix_cache_hits_are_not_counted_as_computed(make) -> None:
    shared = "p" * 40
    be = make()
    be.generate([GenerationRequest(shared + "a", max_tokens=2)])
    be.generate([GenerationRequest(shared + "b", max_tokens=2)])
    assert be.stats.prompt_tokens_computed == 41 + (41 - 32)  # two 16-token blocks were cached
    cold = make(enable_prefix_caching=False)
    cold.generate([GenerationRequest(shared + "a", max_tokens=2), GenerationRequest(shared + "b", max_tokens=2)])
    assert cold.stats.prompt_tokens_computed == 82


def test_score_sums_prompt_logprobs_of_the_continuation(make, vllm) -> None:
    be = make()
    prompts, conts = ["Answer: \\boxed{", "Q", "Q"], ["42}", "x", ""]
    got = be.score(prompts, conts)
    for p, c, g in zip(prompts, conts, got, strict=True):
        ids = ids_of(p + c)
        want = sum(vllm.standin_logprob(ids[:j], ids[j]) for j in range(len(p), len(ids)))
        assert g == pytest.approx(want)
    assert got[2] == 0.0 and got[0] != got[1]
    sp = be.llm.calls[-1].params[0]
    assert sp.prompt_logprobs == 0 and sp.max_tokens == 1
    assert len(be.llm.calls[-1].prompts) == 2  # the empty continuation needs no engine call
    with pytest.raises(ValueError, match="tokens >="):
        make(max_model_len=8).score(["abcdef"], ["ghi"])


def test_chat_prompt_and_chat(make) -> None:
    be = make(max_model_len=64)
    assert be.chat_prompt("P") == f"<|user|>\n{problem_message('P')}\n<|assistant|>\n"
    short = [{"role": "user", "content": "judge this"}]
    replies = be.chat([short, [{"role": "user", "content": "y" * 80}]], max_tokens=6)
    assert isinstance(replies[0], str) and replies[1] == ""
    assert be.llm.calls[-1].prompts[0]["prompt_token_ids"] == ids_of("<|user|>\njudge this\n<|assistant|>\n")
    assert be.llm.calls[-1].params[0].max_tokens == 6 and be.llm.calls[-1].params[0].temperature == 0.0
    assert be.count_tokens(["abc", ""]) == [3, 0]


def test_missing_vllm_is_a_user_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match="gpu extra"):
        make_backend(backend_config(kind="vllm", model=str(tmp_path)), home=tmp_path)
