"""`backend.compile` with the real torch.compile on a CPU: a tiny random model gives the same samples compiled."""

from __future__ import annotations

import pytest

from tests.unit import test_hf_decode

# The tiny random Llama and its tokenizer, built once per module (fixtures of the decode tests).
tokenizer = test_hf_decode.tokenizer
tiny = test_hf_decode.tiny
compiled = test_hf_decode.compiled


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_samples_on_cpu(tiny, compiled) -> None:
    requests = test_hf_decode.mixed_requests(tiny)
    tiny.cfg = tiny.cfg.model_copy(update={"compile": False})
    want = test_hf_decode.samples(tiny.generate(requests))
    alone = test_hf_decode.samples(tiny.generate(requests[1:2]))
    tiny.cfg = tiny.cfg.model_copy(update={"compile": True})
    assert test_hf_decode.samples(tiny.generate(requests)) == want  # compiles (tens of seconds on 2 cores)
    status = tiny.compile_status()
    assert status["failure"] is None and status["compiled_steps"] > 0
    assert test_hf_decode.samples(tiny.generate(requests)) == want  # the compiled step again, the cache reused
    assert test_hf_decode.samples(tiny.generate(requests[1:2])) == alone  # another shape: compiled anew
    assert tiny.compile_status()["compiled_steps"] > status["compiled_steps"]
