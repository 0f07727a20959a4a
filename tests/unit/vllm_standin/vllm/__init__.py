"""Stand-in for the part of vLLM that ckptdpo.backends.vllm uses; tests put its parent folder on sys.path.

Names, signatures and fields follow the vllm-0.33.0 wheel's source (the files named below); the pinned vllm==0.22.1
(the `gpu` extra) has the same `LLM` arguments, outputs, `TokensPrompt` and `RepetitionDetectionParams`:
- `LLM(model, *, tokenizer, tensor_parallel_size, dtype, revision, seed, gpu_memory_utilization, **engine_kwargs)`
  (vllm/entrypoints/llm.py; `enable_prefix_caching`, `max_model_len` reach `EngineArgs` through **kwargs, which
  rejects unknown names), `llm.llm_engine.model_config.max_model_len`, `llm.get_tokenizer()`;
  `LLM.generate(prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None)` with one
  SamplingParams per prompt allowed, returning RequestOutputs in prompt order; a prompt of max_model_len tokens
  or more raises for the whole call (vllm/v1/engine/input_processor.py; VLLMValidationError is a ValueError).
- `RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished, num_cached_tokens)` and
  `CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)`
  (vllm/outputs.py); `finish_reason` is one of "stop", "length", "abort", "error", "repetition"
  (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS); `stop_reason` is the stop string or "repetition_detected".
- `prompt_logprobs`: a list over prompt positions, None for the first, else {token_id: Logprob} holding at least
  the actual prompt token (vllm/logprobs.py); `Logprob(logprob, rank, decoded_token)`.
- `TokensPrompt`: a TypedDict with `prompt_token_ids` (vllm/inputs/data.py, exported from `vllm`).
- The tokenizer from `get_tokenizer()`: `encode(text, truncation, max_length, add_special_tokens)`, `decode`,
  `apply_chat_template(messages, tools=None, **kwargs)` (vllm/tokenizers/protocol.py `TokenizerLike`; the HF
  tokenizer underneath takes `tokenize=False, add_generation_prompt=True`).

The "model" is trivial and deterministic: characters are tokens (id = ord(c) + 3, BOS 1, EOS 2); a sample is drawn
word by word from a small vocabulary with a RNG seeded by (seed, sample index, prompt ids); a prompt ending in
"LOOP" makes it repeat one paragraph forever. Prompt logprobs come from `standin_logprob`. Prefix caching reports
`num_cached_tokens` as the longest prefix shared with an earlier prompt, in 16-token blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

from vllm.sampling_params import RepetitionDetectionParams, SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "TokensPrompt"]
__version__ = "0.33.0+standin"

BOS, EOS = 1, 2
BLOCK = 16
DEFAULT_MAX_MODEL_LEN = 512
_ENGINE_KWARGS = {"enable_prefix_caching", "max_model_len", "disable_log_stats", "max_num_seqs"}
_WORDS = ["So", " x", " =", " 2", ".", "\n\n", "Wait", ",", " then", " \\boxed{4}", " is", " it", "<eos>"]
_LOOP = "Wait, same.\n\n"


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None


def standin_logprob(context: list[int], token: int) -> float:
    """The stand-in model's log-probability of `token` after `context` (depends on both, so misalignment shows)."""
    last = context[-1] if context else 0
    return -(((token * 31) + (last * 7) + len(context)) % 97) / 10.0 - 0.01


class _Tokenizer:
    """Characters are tokens; the chat template is a fixed two-line format."""

    bos_token_id, eos_token_id = BOS, EOS

    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        bos = [BOS] if add_special_tokens is None or add_special_tokens else []  # None: the tokenizer's default, True
        return bos + [ord(c) + 3 for c in text]

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) for i in ([ids] if isinstance(ids, int) else ids) if i > EOS)

    def apply_chat_template(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> str | list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        text += "<|assistant|>\n" if kwargs.get("add_generation_prompt") else ""
        return self.encode(text, add_special_tokens=False) if kwargs.get("tokenize", True) else text


@dataclass
class _ModelConfig:
    max_model_len: int


@dataclass
class _Engine:
    model_config: _ModelConfig


@dataclass
class _Call:
    prompts: list[Any]
    params: list[SamplingParams]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _repeats(ids: list[int], p: RepetitionDetectionParams) -> bool:
    """vLLM's check: the tail repeats a block of some size in [min, max] `min_count` times."""
    for size in range(max(1, p.min_pattern_size), p.max_pattern_size + 1):
        span = size * p.min_count
        if span > len(ids):
            return False
        tail = ids[-span:]
        if all(tail[i] == tail[i % size] for i in range(span)):
            return True
    return False


class LLM:
    instances: ClassVar[list[LLM]] = []

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        quantization: str | None = None,
        revision: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _ENGINE_KWARGS
        if unknown:  # EngineArgs(**kwargs) is a dataclass: unknown names are a TypeError
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        self.init_args = dict(
            model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            revision=revision, seed=seed, gpu_memory_utilization=gpu_memory_utilization, **kwargs,
        )  # fmt: skip
        self.llm_engine = _Engine(_ModelConfig(kwargs.get("max_model_len") or DEFAULT_MAX_MODEL_LEN))
        self.model_config = self.llm_engine.model_config
        self.prefix_caching = kwargs.get("enable_prefix_caching", True)  # on by default in the V1 engine
        self.calls: list[_Call] = []
        self._tokenizer = _Tokenizer()
        self._seen: list[list[int]] = []
        self._counter = 0
        LLM.instances.append(self)

    def get_tokenizer(self) -> _Tokenizer:
        return self._tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.calls.append(_Call(prompts, params, {"use_tqdm": use_tqdm}))
        max_len = self.model_config.max_model_len
        encoded = []
        for p in prompts:
            ids = list(p["prompt_token_ids"]) if isinstance(p, dict) else self._tokenizer.encode(p)
            if len(ids) >= max_len:  # equal leaves no room for the one output token
                raise ValueError(
                    f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of {max_len}. "
                    "Make sure that `max_model_len` is no smaller than the number of text tokens."
                )
            encoded.append(ids)
        return [self._run(p, ids, sp) for p, ids, sp in zip(prompts, encoded, params, strict=True)]

    def _run(self, prompt: Any, ids: list[int], sp: SamplingParams) -> RequestOutput:
        self._counter += 1
        cached = 0
        # vLLM skips reading the prefix cache when prompt logprobs are wanted.
        if self.prefix_caching and sp.prompt_logprobs is None:
            for seen in self._seen:
                n = 0
                while n < min(len(seen), len(ids)) and seen[n] == ids[n]:
                    n += 1
                cached = max(cached, min(n, len(ids) - 1) // BLOCK * BLOCK)
            self._seen.append(ids)
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            prompt_logprobs = [None] + [
                {ids[j]: Logprob(standin_logprob(ids[:j], ids[j]), rank=1, decoded_token=chr(ids[j] - 3))}
                for j in range(1, len(ids))
            ]
        outputs = [self._sample(ids, sp, i) for i in range(sp.n)]
        text = prompt if isinstance(prompt, str) else None
        return RequestOutput(str(self._counter), text, ids, prompt_logprobs, outputs, True, cached)

    def _sample(self, ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        if sp.temperature == 0:
            rng = random.Random(hash((-1, tuple(ids))))  # no str inside: stable across processes
        elif sp.seed is not None:
            rng = random.Random(hash((sp.seed, index, tuple(ids))))
        else:
            rng = random.Random()
        looping = self._tokenizer.decode(ids).endswith("LOOP")
        max_len = self.model_config.max_model_len
        out: list[int] = []
        text, finish, stop_reason = "", None, None
        while finish is None:
            word = _LOOP if looping else rng.choice(_WORDS)
            if word == "<eos>":
                finish = "stop"
                break
            for ch in word:
                out.append(ord(ch) + 3)
                text += ch
                hit = next((s for s in sp.stop if s in text), None)
                if hit is not None:
                    text, finish, stop_reason = text[: text.index(hit)], "stop", hit
                elif sp.max_tokens is not None and len(out) >= sp.max_tokens or len(ids) + len(out) >= max_len:
                    finish = "length"
                elif sp.repetition_detection is not None and _repeats(out, sp.repetition_detection):
                    finish, stop_reason = "repetition", "repetition_detected"
                if finish is not None:
                    break
        return CompletionOutput(index, text, out, None, None, finish, stop_reason)
