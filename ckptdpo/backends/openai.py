"""Any OpenAI-compatible `/v1/completions` endpoint (vllm serve, SGLang, TGI, transformers serve), and
`/v1/chat/completions` for judges. The transport (retries, the `/v1/models` probe, what each endpoint accepts) is in
ckptdpo.backends.openai_http.

- `backend.model` is the model name the server serves (`vllm serve DIR` serves it under DIR); when it is a local
  directory its tokenizer is loaded here. `backend.base_urls` end in `/v1`. A request with a `route_key` always goes
  to the same URL (hash of the key mod the number of URLs), so continuations of one trajectory reach the server that
  holds its prefix in cache; requests without a key go round-robin. At most `max_concurrency` are in flight.
- Prompts: with a local tokenizer every prompt goes as token ids (encoded without special tokens: chat prompts
  carry the template's own), so the server adds no second BOS and prompt lengths are known here; a server that only
  takes text prompts (transformers serve) gets text from then on. Without a tokenizer, text with
  `add_special_tokens: false`.
- Sampling: every field is sent, so the server samples from the same distribution as the hf backend whatever the
  model's generation_config says: temperature, top_p, top_k (-1 = off), min_p 0, repetition_penalty 1, seed, stop,
  max_tokens. vLLM and SGLang take them as body fields. A server that rejects those fields by name (transformers
  serve answers 422 "Unexpected fields") gets them as a `generation_config` JSON string instead (what transformers
  serve reads; without `do_sample: true` it would decode greedily at any temperature); one that rejects that too gets
  the standard fields only, with a warning, and a request with top_k enabled fails there rather than sample wrong.
- `max_tokens` is capped at the server's `max_model_len` (from `/v1/models`) minus the prompt when the prompt length
  is known, else at `max_model_len` (vLLM answers 400 above it and clamps below it); a prompt that leaves no room
  fails alone.
- `n`: a server that ignores it (a reply with fewer choices than asked) or refuses it (a 4xx naming `n`) gets `n`
  single requests from then on, sample i seeded with `draw_seed(seed, i)` (sample 0 keeps the request's seed).
- Token counts are the server's: `choices[i].token_ids` (`return_token_ids: true`, vLLM), else
  `usage.completion_tokens` (exact for one choice; split over several in proportion to their characters), never a
  re-encoding of the text (a local tokenizer is used only without any `usage`, and for loop-guard cuts).
- Prompt tokens: `prompt_tokens_requested` sums `usage.prompt_tokens` over the request's calls and
  `prompt_tokens_computed` subtracts `usage.prompt_tokens_details.cached_tokens` (vLLM reports it when started with
  `--enable-prompt-tokens-details`; a server that reports none counts as computing every prompt token).
- `score` asks for `echo=True, logprobs=1, max_tokens=1` on prompt + continuation (lm-eval's shape; the one
  generated token is dropped) and sums the continuation's logprobs; with a local tokenizer the prompt goes as prompt
  ids + continuation ids, which makes the split exact, else the split uses `text_offset` measured back from the
  generated token (a server BOS does not shift it). Servers without echo (transformers serve, TGI, llama.cpp) raise
  ServerCapabilityError naming the server and `dto.probe: sample`.
- Chat template: a local tokenizer's, else ChatML (`<|im_start|>user ... <|im_end|>`, Qwen/SmolLM style).
- Loop guard: post hoc on the returned text (`loop_cut`: cut where the loop is proven, marked `loop`); a vLLM
  finish_reason `repetition` also maps to `loop`. That labels loops but saves no tokens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckptdpo.backends.base import (
    BackendStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Sample,
    problem_messages,
    result_problem,
)
from ckptdpo.backends.loopguard import loop_cut
from ckptdpo.backends.openai_http import (
    NAMES_N,
    Endpoint,
    OpenAIError,
    RejectedError,
    ServerCapabilityError,
    Transport,
    adapt,
    draw_seed,
    learn,
    no_echo,
    sampling_fields,
    split_proportionally,
)
from ckptdpo.backends.openai_reply import (
    FINISH_FROM_SERVER,
    CompletionReply,
    chat_text,
    echo_logprobs,
    parse_completion,
)
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError

__all__ = ["OpenAIBackend", "OpenAIError", "ServerCapabilityError", "draw_seed", "loop_cut"]

log = logging.getLogger(__name__)

CHATML_TEMPLATE = "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


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
        self.http = Transport(
            list(cfg.base_urls),
            max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            api_key=api_key,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            sleep=sleep,
            seed=seed,
        )
        self.urls = [ep.url for ep in self.http.endpoints]
        self.model_id = cfg.model
        # The served weights are invisible from here: pin backend.revision so cache keys change with the model.
        self.revision = cfg.revision or "unpinned"
        self.stats = BackendStats()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="openai")
        self.tokenizer = _local_tokenizer(cfg.model)
        self._tok_lock = threading.Lock()  # a fast tokenizer used from several threads can fail "Already borrowed"

    def route(self, route_key: str | None) -> int:
        """Index of the base URL for a request: stable per key, round-robin without one."""
        if route_key is None:
            return self.http.next_round_robin()
        return int.from_bytes(hashlib.sha256(route_key.encode()).digest()[:8], "big") % len(self.urls)

    # -- generation ------------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        # Routes are fixed here, in submission order, so round-robin does not depend on thread timing.
        futures = [self._pool.submit(self._generate_one, r, self.route(r.route_key)) for r in requests]
        results = [f.result() for f in futures]
        with self._stats_lock:
            for r in results:
                self.stats.count(r, prompt_tokens_computed=r.prompt_tokens_computed)
        return results

    def _generate_one(self, req: GenerationRequest, server: int) -> GenerationResult:
        try:
            ep = self.http.probe(server, self.model_id)
            ids = self._prompt_ids(req.prompt)
            max_tokens = self._capped_max_tokens(ep, req.max_tokens, None if ids is None else len(ids))
            replies = self._draw(server, req, ids, max_tokens)
            samples = [s for reply in replies for s in self._samples(reply)]
        except (OpenAIError, KeyError, TypeError, ValueError) as e:
            return GenerationResult([], 0, error=f"{type(e).__name__}: {e}")
        prompt_len = len(ids) if ids is not None else 0
        usage = [prompt_usage(reply, prompt_len) for reply in replies]
        requested, computed = sum(p for p, _ in usage), sum(c for _, c in usage)
        result = GenerationResult(
            samples, usage[0][0], prompt_tokens_requested=requested, prompt_tokens_computed=computed
        )
        problem = result_problem(req, result)  # the reply checks above make this a last guard, never the first
        if problem is not None:
            return GenerationResult([], 0, error=f"OpenAIError: {self.urls[server]} sent {problem}")
        return result

    def _draw(
        self, server: int, req: GenerationRequest, ids: list[int] | None, max_tokens: int
    ) -> list[CompletionReply]:
        """The replies that together hold `req.n` choices: one call, or one per sample where `n` does not work.

        Every reply is checked against what its call asked (`parse_completion`); a single-sample call that brings no
        choice fails the request, so a result never holds fewer samples than asked.
        """
        ep = self.http.endpoints[server]
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
        # An empty stop list is every server's default, and transformers serve answers 500 to one.
        extra = {"max_tokens": max_tokens, **({"stop": list(req.stop)} if req.stop else {})}

        def call(n: int, seed: int | None) -> CompletionReply:
            data = self._complete(server, req.prompt, ids, n=n, seed=seed, sampling=sampling, extra=extra)
            return parse_completion(data, ep.url, n=n, max_tokens=max_tokens)

        replies: list[CompletionReply] = []
        if not ep.single_n:
            try:
                replies.append(call(req.n, req.seed))
            except RejectedError as e:
                if req.n == 1 or not NAMES_N.search(e.text):
                    raise
                learn(
                    ep, self.http.lock, "single_n", True, "refuses n > 1; each sample becomes its own seeded request"
                )
        got = sum(len(r.choices) for r in replies)
        if replies and got == 0:
            raise OpenAIError(f"{ep.url} answered without choices")
        if replies and got < req.n:
            learn(
                ep,
                self.http.lock,
                "single_n",
                True,
                f"sent {got} choice(s) for n={req.n}; each sample becomes a request",
            )
        for i in range(got, req.n):
            reply = call(1, draw_seed(req.seed, i))
            if len(reply.choices) != 1:
                raise OpenAIError(f"{ep.url} sent no choice for a request of n=1 (sample {i + 1} of {req.n})")
            replies.append(reply)
        return replies

    def _complete(
        self,
        server: int,
        prompt: str | tuple[int, ...],
        ids: list[int] | None,
        *,
        n: int,
        seed: int | None,
        sampling: dict[str, Any],
        extra: dict[str, Any],
        path: str = "/completions",
    ) -> dict[str, Any]:
        """POST a completion, adapting to what the endpoint rejects (each adaptation is learned once)."""
        ep = self.http.endpoints[server]
        for _ in range(4):
            body: dict[str, Any] = {"model": self.model_id}
            if ids is not None and ep.token_prompts:
                body["prompt"] = ids
            else:
                body["prompt"] = prompt if isinstance(prompt, str) else self._decode(list(prompt))
            body |= {"n": n, **extra, **sampling_fields(ep, **sampling)}
            if seed is not None:
                body["seed"] = seed
            if ep.sampling == "vllm":
                body |= {"add_special_tokens": False, "return_token_ids": True}
            try:
                return self.http.post(server, path, body)
            except RejectedError as e:
                if not adapt(ep, self.http.lock, e, body):
                    raise
        raise OpenAIError(f"{ep.url} kept rejecting the request after adapting it")

    def _prompt_ids(self, prompt: str | tuple[int, ...]) -> list[int] | None:
        if not isinstance(prompt, str):
            return list(prompt)
        return self._encode(prompt) if self.tokenizer is not None else None

    def _capped_max_tokens(self, ep: Endpoint, max_tokens: int, prompt_len: int | None) -> int:
        if ep.max_model_len is None:
            return max_tokens
        room = ep.max_model_len - (prompt_len or 0)
        if room < 1:
            raise OpenAIError(f"prompt has {prompt_len} tokens; {ep.url} serves max_model_len {ep.max_model_len}")
        return min(max_tokens, room)

    def _samples(self, reply: CompletionReply) -> list[Sample]:
        counts = self._choice_tokens(reply)
        return [self._sample(c, k) for c, k in zip(reply.choices, counts, strict=True)]

    def _choice_tokens(self, reply: CompletionReply) -> list[int]:
        choices = reply.choices
        if all(isinstance(c.get("token_ids"), list) for c in choices):
            return [len(c["token_ids"]) for c in choices]
        if reply.completion_tokens is not None:
            return split_proportionally(reply.completion_tokens, [len(c["text"]) for c in choices])
        return self.count_tokens([c["text"] for c in choices])

    def _sample(self, choice: dict[str, Any], num_tokens: int) -> Sample:
        text = choice["text"]
        finish: FinishReason = FINISH_FROM_SERVER[choice["finish_reason"]]
        token_ids = choice.get("token_ids")
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
        ep = self.http.endpoints[server]
        p_ids = c_ids = None
        if self.tokenizer is not None:
            p_ids, c_ids = self._encode(prompt), self._encode(continuation)
        extra = {"max_tokens": 1, "logprobs": 1, "echo": True}
        sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
        ids = None if p_ids is None else p_ids + c_ids
        try:
            data = self._complete(server, prompt + continuation, ids, n=1, seed=None, sampling=sampling, extra=extra)
        except RejectedError as e:
            if "echo" in e.text or "logprobs" in e.text:
                raise no_echo(ep.url) from None
            raise
        token_lps, offsets = echo_logprobs(data, ep.url)
        exact = p_ids is not None and ep.token_prompts
        if not token_lps or (not exact and not offsets):
            raise no_echo(ep.url)
        if exact:
            picked = token_lps[len(p_ids) : len(p_ids) + len(c_ids)]
            if len(picked) != len(c_ids):
                raise OpenAIError(f"{ep.url} echoed {len(token_lps)} logprobs for a longer prompt")
        else:
            # The last entry is the generated token: it starts where the echoed prompt + continuation ends.
            shift = offsets[-1] - len(prompt + continuation)
            picked = [t for t, off in zip(token_lps[:-1], offsets[:-1], strict=True) if off - shift >= len(prompt)]
        if any(t is None for t in picked):
            raise OpenAIError(f"{ep.url} returned a null logprob inside the continuation")
        return float(sum(picked))

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        def one(conv: Sequence[dict[str, str]], server: int) -> str:
            ep = self.http.probe(server, self.model_id)
            for _ in range(3):
                body = {"model": self.model_id, "messages": list(conv), "max_tokens": max_tokens, "seed": 0}
                body |= sampling_fields(ep, temperature=temperature, top_p=1.0, top_k=-1)
                try:
                    data = self.http.post(server, "/chat/completions", body)
                    break
                except RejectedError as e:
                    if not adapt(ep, self.http.lock, e, body):
                        raise
            else:
                raise OpenAIError(f"{ep.url} kept rejecting the chat request after adapting it")
            return chat_text(data, ep.url)

        futures = [self._pool.submit(one, conv, self.route(None)) for conv in conversations]
        return [f.result() for f in futures]

    def chat_prompt(self, problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        turns = problem_messages(problem, few_shot)
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        # Without a local tokenizer: ChatML, each earlier assistant turn closed the way ChatML closes turns.
        return "".join(
            CHATML_TEMPLATE.replace("{message}", t["content"])
            if t["role"] == "user"
            else f"{t['content']}<|im_end|>\n"
            for t in turns
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Local tokenizer counts; without one, characters / 4 (an estimate)."""
        if self.tokenizer is not None:
            return [len(self._encode(t)) for t in texts]
        return [math.ceil(len(t) / 4) for t in texts]

    def _encode(self, text: str) -> list[int]:
        # Chat prompts already carry the template's special tokens as text.
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise OpenAIError("a token-id prompt needs a local tokenizer (backend.model a local directory)")
        with self._tok_lock:
            return self.tokenizer.decode(ids)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.http.close()


def prompt_usage(reply: CompletionReply, prompt_len: int) -> tuple[int, int]:
    """(prompt tokens, of which computed) of one reply: the server's usage, less its cached prompt tokens."""
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else prompt_len
    return prompt, max(0, prompt - reply.cached_tokens)


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
