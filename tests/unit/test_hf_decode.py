"""The hf backend's decode loop on a tiny random model: blocks end rows where token-by-token checks would, the sampler
keeps its numbers, prompts of no shared route key share one prefill, and `backend.compile` falls back cleanly."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from ckptdpo.backends import decode
from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.decode import (
    Detokenizer,
    Prepared,
    Row,
    TextDecoder,
    advance_block,
    newline_tokens,
    prefill_batch,
    prefill_padded,
)
from ckptdpo.backends.hf import HFBackend
from ckptdpo.backends.loopguard import LoopGuard
from ckptdpo.backends.sampling import NUCLEUS_K, SamplingParams, draw_uniforms, sample_seed
from ckptdpo.configs import backend_config
from ckptdpo.models import save_random_llama

CORPUS = [
    "Wait, let me check the sum again.\n\nThe answer is 12.\n\n",
    "Alternatively, 3 + 4 = 7, so the perimeter is 12. But wait: is it?\n",
    "Hmm, same as before.\n\nSame as before.\n\n",
    "Café, naïve, 中文, 数学.\n\n",
]
SNIPPETS = [
    "Wait, same.\n\n",
    "Let me check 3 + 4 = 7.\n\n",
    "The answer is 12",
    "\n",
    "\n\n\n",
    " 中文",
    "é",
    "So",
    " Wait",
    ".\n\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained here (no hub): multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory) -> HFBackend:
    """The hf backend around a random 2-layer Llama (float32, CPU) with peaked next-token distributions."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_random_llama(
        tokenizer, folder, hidden_size=32, intermediate_size=64, max_positions=512, initializer_range=1.0,
        bos_token_id=None,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    settings = dict(kind="hf", model=str(folder), device="cpu", loop_min_repeats=2, loop_ngram=4, max_batch_size=64)
    return HFBackend(backend_config(**settings), home=folder)


# --- the host's look at a block: exactly where token-by-token checks end a row -------------------------------------


def advance_one(row: Row, token: int, stop_len: int, eos_ids: frozenset[int]) -> bool:
    """The reference: the backend's former per-token check (EOS, stop strings, loop guard, length)."""
    row.ids.append(token)
    if token in eos_ids:
        row.finish = "stop"
        return True
    delta = row.detok.step(row.ids)
    stop = row.prep.request.stop
    if stop and delta:
        row.tail = (row.tail + delta)[-(stop_len + len(delta)) :]
        if any(s in row.tail for s in stop):
            row.finish = "stop"
            return True
        row.tail = row.tail[-stop_len:]
    if row.guard is not None and row.guard.update(token, delta):
        row.finish = "loop"
        return True
    if len(row.ids) >= row.prep.max_new:
        row.finish = "length"
        return True
    return False


def new_row(tokenizer, stop: tuple[str, ...], max_new: int, guard: bool) -> Row:
    req = GenerationRequest((1,), max_tokens=max_new, stop=stop)
    loop = LoopGuard(min_repeats=2, ngram=4) if guard else None
    return Row(Prepared(0, [1], max_new, req), 0, random.Random(0), loop, Detokenizer(TextDecoder(tokenizer)))


def test_blocks_end_each_row_where_token_by_token_checks_do(tokenizer) -> None:
    eos = frozenset({tokenizer.eos_token_id})
    newline = newline_tokens(tokenizer, len(tokenizer))
    rng = random.Random(0)
    stops = [(), ("Wait",), ("7.\n",), ("中文",), ("12", "same"), ("\n\n\n",)]
    endings: dict[str, int] = {}
    for trial in range(400):
        text = "".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 30)))
        stream = tokenizer(text, add_special_tokens=False).input_ids
        if rng.random() < 0.2:
            stream.insert(rng.randrange(len(stream) + 1), tokenizer.eos_token_id)
        stop, guard, max_new = rng.choice(stops), rng.random() < 0.8, rng.randint(1, len(stream) + 5)
        stop_len = max((len(s) for s in stop), default=0)
        want = new_row(tokenizer, stop, max_new, guard)
        for t in stream:
            if advance_one(want, t, stop_len, eos):
                break
        for lines in (None, newline):
            got = new_row(tokenizer, stop, max_new, guard)
            at = 0
            while got.finish is None and at < len(stream):
                size = rng.choice([1, 2, 3, 7, 16, 40])
                advance_block(got, stream[at : at + size], stop_len, eos, lines)
                at += size
            assert (got.ids, got.finish) == (want.ids, want.finish), (trial, text, stop, max_new, lines)
        endings[str(want.finish)] = endings.get(str(want.finish), 0) + 1
    # Every way of ending was met (and rows that ran out of tokens unfinished).
    assert set(endings) == {"stop", "loop", "length", "None"} and min(endings.values()) >= 10


def test_text_decoder_gives_what_the_tokenizer_gives(tokenizer) -> None:
    ids = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id, 7] for text in CORPUS]
    want = tokenizer.batch_decode(ids, skip_special_tokens=True)
    texts = TextDecoder(tokenizer)
    assert texts._fast is not None  # straight through the Rust tokenizer
    assert texts.decode_batch(ids) == want and [texts.decode(i) for i in ids] == want
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert TextDecoder(tokenizer)._fast is None  # a clean-up only transformers does: through transformers
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_newline_tokens_are_those_whose_text_breaks_a_line(tokenizer) -> None:
    newline = newline_tokens(tokenizer, len(tokenizer))
    assert newline and all("\n" in tokenizer.decode([t]) for t in newline)
    for t in tokenizer("a\nb\n\nc", add_special_tokens=False).input_ids:
        assert (t in newline) == ("\n" in tokenizer.decode([t]))


# --- sampling ------------------------------------------------------------------------------------------------------


def sample_by_sorting(params: SamplingParams, logits: torch.Tensor, u: list[float]) -> torch.Tensor:
    """The reference: top-p over the whole vocabulary, sorted (the sampler's former code)."""
    probs = torch.softmax(logits / params.temperature.clamp(min=1e-6)[:, None], dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p[:, None], 0.0)
    cdf = probs.cumsum(-1)
    target = torch.tensor(u, dtype=cdf.dtype)[:, None] * cdf[:, -1:] * (1 - 1e-6)
    return order.gather(1, torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1))[:, 0]


def test_top_p_takes_the_same_tokens_with_or_without_sorting_the_vocabulary() -> None:
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    rows, vocab = 48, 3000
    # Peaked rows have a nucleus of a few tokens; flat rows one of thousands, beyond NUCLEUS_K.
    scale = torch.tensor([12.0 if i % 3 else 1.0 for i in range(rows)])[:, None]
    params = SamplingParams([GenerationRequest("x", temperature=0.7, top_p=0.95)] * rows, torch.device("cpu"))
    for peaked_only in (True, False):
        for _ in range(20):
            logits = torch.randn(rows, vocab, generator=gen) * (12.0 if peaked_only else scale)
            u = [rng.random() for _ in range(rows)]
            assert torch.equal(params.sample(logits, u), sample_by_sorting(params, logits, u))
            assert torch.equal(params.sample(logits, torch.tensor(u, dtype=torch.float32)), params.sample(logits, u))
    flat = torch.softmax(torch.randn(1, vocab, generator=gen) / 0.7, -1).sort(descending=True).values
    assert int(((flat.cumsum(-1) - flat) < 0.95).sum()) > NUCLEUS_K  # the flat rows did take the sorting path


def test_a_row_samples_as_alone_whatever_the_top_p_of_its_batch() -> None:
    gen, rng = torch.Generator().manual_seed(1), random.Random(1)
    requests = [
        GenerationRequest("x", temperature=1.0),
        GenerationRequest("x", temperature=0.7, top_p=0.9),
        GenerationRequest("x", temperature=0.0),
        GenerationRequest("x", temperature=1.3, top_k=4),
    ]
    together = SamplingParams(requests, torch.device("cpu"))
    for _ in range(30):
        logits = torch.randn(len(requests), 200, generator=gen) * 3
        u = [rng.random() for _ in requests]
        picked = together.sample(logits, u)
        for i, req in enumerate(requests):
            alone = SamplingParams([req], torch.device("cpu")).sample(logits[i : i + 1], u[i : i + 1])
            assert int(picked[i]) == int(alone[0])
        kept = together.select(torch.tensor([0, 3]))  # after the batch lost its top-p row
        assert kept.sample(logits[[0, 3]], [u[0], u[3]]).tolist() == [int(picked[0]), int(picked[3])]


def test_uniforms_drawn_ahead_are_each_rows_own_stream(tokenizer) -> None:
    rows = [new_row(tokenizer, (), 4, False) for _ in range(3)]
    for i, r in enumerate(rows):
        r.rng = random.Random(sample_seed(7, i))
    rows[1].finish = "stop"
    drawn = draw_uniforms(rows, 5, torch.device("cpu"))
    for i in (0, 2):
        stream = random.Random(sample_seed(7, i))
        want = torch.tensor([stream.random() for _ in range(5)], dtype=torch.float32)
        assert torch.equal(drawn[i], want)
    assert not drawn[1].any()  # an ended row draws nothing


# --- prefill -------------------------------------------------------------------------------------------------------


def test_prefill_computes_shared_heads_once_and_pads_little(tiny: HFBackend) -> None:
    tok, model = tiny.tokenizer, tiny.model
    chain = tok("Wait, let me check the sum again.\n\n", add_special_tokens=False).input_ids
    head = tok("Hmm, same as before. Alternatively, 3 + 4 = 7.", add_special_tokens=False).input_ids
    plain = [head + [40 + i] * (3 + i % 2) for i in range(6)] + [head + [60] * 40]
    prompts = [chain + [40 + i] * (i + 1) for i in range(3)] + plain
    keys = ["traj"] * 3 + [None] * 6 + ["alone"]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    try:
        with torch.inference_mode():
            pre = prefill_batch(model, prompts, keys, tiny.pad_id, tiny.device, share=True)
    finally:
        hook.remove()
    # One forward per prompt of the chain "traj"; the head of the others once; their rests in two forwards (the
    # long one apart, rather than padding six short ones to its length).
    assert sorted(tuple(shape) for shape in calls) == sorted(
        [(1, len(chain) + 1), (1, 2), (1, 3), (1, len(head)), (6, 4), (1, 40)]
    )
    assert sum(pre.computed[3:]) == len(head) + sum(len(p) - len(head) for p in plain)
    assert sum(pre.computed[:3]) == len(chain) + 1 + 2 + 3
    with torch.inference_mode():
        alone = [prefill_padded(model, [p], tiny.pad_id, tiny.device) for p in prompts]
    for i, (p, one) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.allclose(pre.logits[i], one.logits[0], atol=1e-4)
        assert int(pre.next_pos[i]) == len(p) and int(pre.mask[i].sum()) == len(p)
        real = pre.mask[i].bool()  # the prompt's own positions (padding is masked wherever it is)
        for layer, single in zip(pre.cache.layers, one.cache.layers, strict=True):
            assert torch.allclose(layer.keys[i][:, real], single.keys[0], atol=1e-4)


def test_split_by_length_cuts_only_where_padding_is_saved() -> None:
    assert decode.split_by_length([]) == []
    assert decode.split_by_length([20] * 5) == [[0, 1, 2, 3, 4]]
    assert decode.split_by_length([10, 100, 11, 12]) == [[0, 2, 3], [1]]
    parts = decode.split_by_length([5, 6, 30, 31, 80, 81, 300, 7], max_parts=3)
    assert len(parts) == 3 and sorted(i for part in parts for i in part) == list(range(8))


# --- whole decodes on the tiny model -------------------------------------------------------------------------------


def mixed_requests(tiny: HFBackend) -> list[GenerationRequest]:
    prompts = ["Wait, let me check.\n\n", "The answer is", "Hmm, same as before.\n\nSame", "3 + 4 ="]
    settings = [
        dict(temperature=1.0, top_p=0.95, stop=("Wait",)),
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=5, stop=("\n\n", "12")),
        dict(temperature=1.2),
    ]
    return [
        GenerationRequest(p, n=3, seed=10 + i, max_tokens=24 + 8 * i, **s)
        for i, (p, s) in enumerate(zip(prompts, settings, strict=True))
    ]


def samples(results) -> list[list[tuple]]:
    return [[(s.token_ids, s.finish_reason, s.text) for s in r.samples] for r in results]


def test_block_size_changes_nothing_but_speed(tiny: HFBackend, monkeypatch) -> None:
    requests = mixed_requests(tiny)
    first = samples(tiny.generate(requests))
    finishes = {f for r in first for _, f, _ in r}
    assert {"stop", "length"} <= finishes  # stop strings and EOS ended some rows mid-block, the limit others
    for req, res in zip(requests, first, strict=True):
        for ids, finish, text in res:
            assert len(ids) <= req.max_tokens and (finish == "length") == (len(ids) == req.max_tokens)
            full = tiny.tokenizer.decode(ids, skip_special_tokens=True)
            assert text == full if finish != "stop" or not req.stop else full.startswith(text)
    for block in (1, 5):
        monkeypatch.setattr(decode, "BLOCK", block)
        assert samples(tiny.generate(requests)) == first


def test_a_requests_samples_do_not_depend_on_its_batch(tiny: HFBackend) -> None:
    requests = mixed_requests(tiny)
    together = samples(tiny.generate(requests))
    for i, req in enumerate(requests):
        assert samples(tiny.generate([req])) == [together[i]]


# --- backend.compile -------------------------------------------------------------------------------------------------


@pytest.fixture
def compiled(tiny: HFBackend):
    """The tiny backend with `compile` on, put back afterwards (the backend is shared by the module)."""
    old = tiny.cfg
    tiny.cfg = old.model_copy(update={"compile": True})
    tiny._compiled = None
    try:
        yield tiny
    finally:
        tiny.cfg, tiny._compiled = old, None


def test_a_model_that_cannot_be_compiled_says_so_once_and_decodes_the_same(
    tiny: HFBackend, compiled: HFBackend, monkeypatch, caplog
) -> None:
    requests = mixed_requests(tiny)
    tiny.cfg = tiny.cfg.model_copy(update={"compile": False})
    want = samples(tiny.generate(requests))
    tiny.cfg = tiny.cfg.model_copy(update={"compile": True})

    def broken_compile(fn, **kwargs):
        def run(**inputs):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="ckptdpo.backends.decode"):
        # The first step fails in the middle of a batch: the step is redone eagerly on the same static cache.
        assert samples(tiny.generate(requests)) == want
        assert samples(tiny.generate(requests)) == want
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "without compile" in warnings[0]
    status = tiny.compile_status()
    assert status["compile"] and "no C++ compiler" in status["failure"] and status["compiled_steps"] == 0


def test_static_cache_steps_give_the_same_samples(tiny: HFBackend, compiled: HFBackend, monkeypatch) -> None:
    # torch.compile replaced by the plain call: the static cache, its reuse across batches and the full-width mask
    # are what is tested here (the real compiler: tests/slow/test_hf_compile.py).
    requests = mixed_requests(tiny)
    tiny.cfg = tiny.cfg.model_copy(update={"compile": False})
    want = samples(tiny.generate(requests))
    tiny.cfg = tiny.cfg.model_copy(update={"compile": True})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda **inputs: fn(**inputs))
    assert samples(tiny.generate(requests)) == want
    assert samples(tiny.generate(requests)) == want  # the same static cache, reset and refilled
    status = tiny.compile_status()
    assert status["failure"] is None and status["compiled_steps"] > 0


def test_compile_is_a_config_field() -> None:
    assert backend_config(kind="hf").compile is False
    assert backend_config(kind="hf", compile=True).compile is True
