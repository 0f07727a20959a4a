"""Any OpenAI-compatible `/v1/completions` endpoint (vllm serve, SGLang, TGI), and `/v1/chat/completions` for judges.

- `backend.model` is the model name the server serves (`vllm serve DIR` serves it under DIR).
- `backend.base_urls` are base URLs the way the OpenAI SDK takes them, ending in `/v1`. A request with a `route_key`
  always goes to the same URL (hash of the key mod the number of URLs), so continuations of one trajectory reach the
  server that holds its prefix in cache; requests without a key go round-robin.
- At most `max_concurrency` requests are in flight; 429, 5xx, timeouts and connection errors are retried
  `max_retries` times with exponential backoff and jitter, or after the server's `Retry-After` seconds when it sends
  them (the HTTP-date form would need the clock, so it falls back to backoff). Other 4xx fail the request at once.
- Prompts go as text, or as a list of token ids when the request carries ids (the completions API takes both).
  `top_k` is sent only when enabled: it is an extension (vLLM, SGLang) that a strict server may reject.
- Token counts per sample: `choices[i].token_ids` when the server returns them (vLLM's `return_token_ids`), else the
  local tokenizer, else `usage.completion_tokens` split over the choices in proportion to their characters (exact
  for n = 1, an approximation for n > 1; with no `usage` at all, characters / 4).
- `score` asks for `echo=True, logprobs=1, max_tokens=1` on prompt + continuation (the shape lm-eval uses; the one
  generated token is dropped) and sums the logprobs of the continuation's tokens. With a local tokenizer the prompt
  goes as token ids (prompt ids + continuation ids), which makes the split exact. Without one the split uses
  `text_offset`, measured back from the generated token so a BOS the server adds does not shift it; a token that
  straddles the boundary counts as prompt. A server that does not return prompt logprobs raises OpenAIError.
- Chat template: a local tokenizer's when `backend.model` is a local directory, else ChatML
  (`<|im_start|>user ... <|im_end|>`, Qwen/SmolLM style). Point `backend.model` at a local copy of the tokenizer for
  any other template.
- Loop guard: chunked generation would pay a prefill per chunk, so the guard runs post hoc on the returned text
  (`loop_cut`: the sample is cut where the loop is proven and marked `loop`), and a vLLM finish_reason `repetition`
  also maps to `loop`. That labels loops but saves no tokens. `vllm serve` (>= 0.17) can stop them itself when a
  request carries its `repetition_detection` option; it is not sent here because other servers may reject unknown
  fields. `repetition_penalty`/`frequency_penalty` would change the sampling distribution, so they are not set.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from ckptdpo.backends.base import (
    BackendStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Sample,
    problem_message,
)
from ckptdpo.backends.loopguard import PARAGRAPH_BREAK, LoopGuard
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
_CHUNK = re.compile(r"\s*\S+|\s+")  # a word with the whitespace before it
_FINISH = {"stop": "stop", "length": "length", "repetition": "loop", "loop": "loop"}


class OpenAIError(RuntimeError):
    """A request to an OpenAI-compatible endpoint failed (after retries where retrying makes sense)."""


class OpenAIBackend:
    """Completions and chat completions over HTTP with routing, bounded concurrency and retries."""

    def __init__(
        self,
        cfg: BackendConfig,
        *,
        api_key: str | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        if not cfg.base_urls:
            raise UserError("backend.base_urls is empty; list at least one endpoint such as http://localhost:8000/v1.")
        self.cfg = cfg
        self.urls = [u.rstrip("/") for u in cfg.base_urls]
        self.model_id = cfg.model
        # The served weights are invisible from here: pin backend.revision so cache keys change with the model.
        self.revision = cfg.revision or "unpinned"
        self.stats = BackendStats()
        self.backoff_base_s, self.backoff_max_s, self._sleep = backoff_base_s, backoff_max_s, sleep
        self._rng = random.Random(seed)
        self._rr = itertools.count()
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._http = httpx.Client(headers=headers, timeout=cfg.request_timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="openai")
        self.tokenizer = _local_tokenizer(cfg.model)
        self._tok_lock = threading.Lock()  # a fast tokenizer used from several threads can fail "Already borrowed"

    # -- routing and transport -------------------------------------------------------------------------------------

    def route(self, route_key: str | None) -> int:
        """Index of the base URL for a request: stable per key, round-robin without one."""
        if route_key is None:
            with self._lock:
                return next(self._rr) % len(self.urls)
        return int.from_bytes(hashlib.sha256(route_key.encode()).digest()[:8], "big") % len(self.urls)

    def _post(self, server: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.urls[server] + path
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                resp = self._http.post(url, json=body)
            except httpx.TransportError as e:  # timeouts, refused or dropped connections
                failure = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise OpenAIError(f"{url} answered 200 with a body that is not JSON") from None
                failure = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise OpenAIError(f"{url} rejected the request ({failure})")
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
            if attempt == self.cfg.max_retries:
                raise OpenAIError(f"{url} failed after {attempt + 1} attempts ({failure})")
            if retry_after is None:
                with self._lock:
                    jitter = 0.5 + 0.5 * self._rng.random()
                retry_after = min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * jitter
            log.warning("%s: %s; retry %d in %.2fs", url, failure, attempt + 1, retry_after)
            self._sleep(retry_after)
        raise AssertionError("unreachable")

    # -- generation ------------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        # Routes are fixed here, in submission order, so round-robin does not depend on thread timing.
        futures = [self._pool.submit(self._generate_one, r, self.route(r.route_key)) for r in requests]
        results = [f.result() for f in futures]
        for r in results:
            self.stats.count(r)
        return results

    def _generate_one(self, req: GenerationRequest, server: int) -> GenerationResult:
        body: dict[str, Any] = {
            "model": self.model_id,
            "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt),
            "n": req.n,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.top_k > 0:
            body["top_k"] = req.top_k
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = list(req.stop)
        try:
            data = self._post(server, "/completions", body)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            usage = data.get("usage") or {}
            counts = self._choice_tokens(choices, usage)
            samples = [self._sample(c, k) for c, k in zip(choices, counts, strict=True)]
        except (OpenAIError, KeyError, TypeError) as e:
            return GenerationResult([], 0, error=f"{type(e).__name__}: {e}")
        return GenerationResult(samples, int(usage.get("prompt_tokens") or 0))

    def _choice_tokens(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> list[int]:
        texts = [c.get("text") or "" for c in choices]
        if all(isinstance(c.get("token_ids"), list) for c in choices):
            return [len(c["token_ids"]) for c in choices]
        if self.tokenizer is not None:
            return self.count_tokens(texts)
        total = usage.get("completion_tokens")
        if total is None:
            return [math.ceil(len(t) / 4) for t in texts]
        return _split_proportionally(int(total), [len(t) for t in texts])

    def _sample(self, choice: dict[str, Any], num_tokens: int) -> Sample:
        text = choice.get("text") or ""
        finish: FinishReason = _FINISH.get(choice.get("finish_reason") or "stop", "stop")  # type: ignore[assignment]
        token_ids = choice.get("token_ids") if isinstance(choice.get("token_ids"), list) else None
        cut = None
        if self.cfg.loop_guard and finish != "loop":
            cut = loop_cut(text, min_repeats=self.cfg.loop_min_repeats, ngram=self.cfg.loop_ngram)
        if cut is not None:
            # Without a tokenizer the cut keeps the server's count in proportion to the characters kept.
            kept = self.count_tokens([text[:cut]])[0] if self.tokenizer is not None else None
            num_tokens = kept if kept is not None else round(num_tokens * cut / max(1, len(text)))
            text, finish, token_ids = text[:cut], "loop", None
        return Sample(text=text, num_tokens=num_tokens, finish_reason=finish, token_ids=token_ids)

    # -- scoring, chat, tokens -------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"score needs as many prompts as continuations ({len(prompts)} != {len(continuations)})")
        futures = [
            self._pool.submit(self._score_one, p, c, self.route(None))
            for p, c in zip(prompts, continuations, strict=True)
        ]
        return [f.result() for f in futures]

    def _score_one(self, prompt: str, continuation: str, server: int) -> float:
        body: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 1,
            "echo": True,
        }
        if self.tokenizer is not None:
            p_ids, c_ids = (self._encode(t) for t in (prompt, continuation))
            body["prompt"] = p_ids + c_ids
        else:
            body["prompt"] = prompt + continuation
        data = self._post(server, "/completions", body)
        lp = (data.get("choices") or [{}])[0].get("logprobs") or {}
        token_lps, offsets = lp.get("token_logprobs"), lp.get("text_offset")
        if not token_lps or (self.tokenizer is None and not offsets):
            raise OpenAIError(
                f"{self.urls[server]} returned no prompt logprobs for echo=True; score needs a server that supports "
                "echo with logprobs on /v1/completions (vllm serve does)."
            )
        if self.tokenizer is not None:
            picked = token_lps[len(p_ids) : len(p_ids) + len(c_ids)]
            if len(picked) != len(c_ids):
                raise OpenAIError(f"{self.urls[server]} echoed {len(token_lps)} logprobs for a longer prompt")
        else:
            # The last entry is the generated token: it starts where the echoed prompt + continuation ends.
            shift = offsets[-1] - len(prompt + continuation)
            picked = [t for t, off in zip(token_lps[:-1], offsets[:-1], strict=True) if off - shift >= len(prompt)]
        if any(t is None for t in picked):
            raise OpenAIError(f"{self.urls[server]} returned a null logprob inside the continuation")
        return float(sum(picked))

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        def one(conv: Sequence[dict[str, str]], server: int) -> str:
            body = {
                "model": self.model_id,
                "messages": list(conv),
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            data = self._post(server, "/chat/completions", body)
            try:
                return data["choices"][0]["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                raise OpenAIError(f"{self.urls[server]} sent a chat completion without a message") from None

        futures = [self._pool.submit(one, conv, self.route(None)) for conv in conversations]
        return [f.result() for f in futures]

    def chat_prompt(self, problem: str) -> str:
        message = problem_message(problem)
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        return CHATML_TEMPLATE.replace("{message}", message)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Local tokenizer counts; without one, characters / 4 (an estimate)."""
        if self.tokenizer is not None:
            return [len(self._encode(t)) for t in texts]
        return [math.ceil(len(t) / 4) for t in texts]

    def _encode(self, text: str) -> list[int]:
        # Chat prompts already carry the template's special tokens as text.
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None for a missing header or the HTTP-date form."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _split_proportionally(total: int, weights: list[int]) -> list[int]:
    """Integers summing to `total`, proportional to `weights` (largest remainder)."""
    if not weights:
        return []
    wsum = sum(weights)
    if wsum == 0:
        weights, wsum = [1] * len(weights), len(weights)
    exact = [total * w / wsum for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _local_tokenizer(model: str) -> Any | None:
    """The tokenizer of `backend.model` when it is a local directory, else None."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: backend.model is a directory without a loadable tokenizer ({e}).") from None


def loop_cut(text: str, *, min_repeats: int, ngram: int) -> int | None:
    """Where a finished text is proven to loop, as a character offset to cut at, or None.

    Runs ckptdpo.backends.loopguard over the text with words standing in for tokens (the server's token ids are
    not at hand), so the cut falls on a word boundary; a paragraph loop is cut at the break before the paragraph
    that completed the proof.
    """
    guard = LoopGuard(min_repeats=min_repeats, ngram=ngram)
    vocab: dict[str, int] = {}
    for m in _CHUNK.finditer(text):
        word = m.group().lstrip()
        if guard.update(vocab.setdefault(word, len(vocab)) if word else None, m.group()):
            if guard.reason == "paragraph":
                return text.rfind(PARAGRAPH_BREAK, 0, m.end())
            return m.end()
    return None
