"""The openai backend's transport: POST with retries, the `/v1/models` probe, and what each endpoint turned out to
accept, learned from its replies (so one backend talks to `vllm serve`, SGLang, `transformers serve`, TGI, llama.cpp).

- 429, 5xx, timeouts and connection errors are retried `max_retries` times with exponential backoff and jitter, or
  after the server's `Retry-After` seconds when it sends them (the HTTP-date form would need the clock, so it falls
  back to backoff). Other 4xx raise `RejectedError` at once, with the status and the server's message, so the backend
  can adapt the request (a field the server does not know, a token-id prompt it cannot take) or fail it.
- `Endpoint` holds what was learned about one base URL: its `max_model_len` (from `/v1/models`, probed once; vLLM
  and SGLang report it, others do not), how sampling fields travel (`sampling`), whether token-id prompts work, and
  whether `n` works.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from ckptdpo.errors import UserError

log = logging.getLogger(__name__)

SamplingMode = Literal["vllm", "generation_config", "plain"]
# Fields beyond OpenAI's own that vLLM and SGLang take; a strict server rejects them by name.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "add_special_tokens", "return_token_ids")
NAMES_N = re.compile(r"(?<![\w-])[`'\"]?n[`'\"]?(?![\w-])")  # a 4xx message about the field `n`


class OpenAIError(RuntimeError):
    """A request to an OpenAI-compatible endpoint failed (after retries where retrying makes sense)."""


class RejectedError(OpenAIError):
    """The server answered a 4xx other than 429: the request itself is wrong for this server."""

    def __init__(self, url: str, status: int, text: str) -> None:
        super().__init__(f"{url} rejected the request (HTTP {status}: {text[:300]})")
        self.status, self.text = status, text


class ServerCapabilityError(OpenAIError, UserError):
    """The server cannot do what the recipe asks of it; the message names the server and the setting to change."""


@dataclass
class Endpoint:
    """What one base URL accepts, learned from its replies (guarded by the transport's lock)."""

    url: str
    probed: bool = False
    max_model_len: int | None = None
    # vllm: top_k / min_p / repetition_penalty / add_special_tokens / return_token_ids as body fields (vLLM, SGLang);
    # generation_config: a transformers `GenerationConfig` as a JSON string (`transformers serve`); plain: standard
    # OpenAI fields only, the server's defaults apply to the rest.
    sampling: SamplingMode = "vllm"
    token_prompts: bool = True
    single_n: bool = False  # the server ignores or refuses n > 1: n samples are n seeded single requests


class Transport:
    """An httpx client over several base URLs, with bounded connections and retries."""

    def __init__(
        self,
        urls: list[str],
        *,
        max_concurrency: int,
        timeout_s: float,
        max_retries: int,
        api_key: str | None,
        backoff_base_s: float,
        backoff_max_s: float,
        sleep: Callable[[float], None],
        seed: int | None,
    ) -> None:
        self.endpoints = [Endpoint(u.rstrip("/")) for u in urls]
        self.max_retries = max_retries
        self.backoff_base_s, self.backoff_max_s, self._sleep = backoff_base_s, backoff_max_s, sleep
        self._rng = random.Random(seed)
        self._rr = itertools.count()
        self.lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(headers=headers, timeout=timeout_s, limits=limits)

    def next_round_robin(self) -> int:
        with self.lock:
            return next(self._rr) % len(self.endpoints)

    def post(self, server: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.endpoints[server].url + path
        for attempt in range(self.max_retries + 1):
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
                    raise RejectedError(url, resp.status_code, resp.text)
                retry_after = retry_after_s(resp.headers.get("retry-after"))
            if attempt == self.max_retries:
                raise OpenAIError(f"{url} failed after {attempt + 1} attempts ({failure})")
            if retry_after is None:
                with self.lock:
                    jitter = 0.5 + 0.5 * self._rng.random()
                retry_after = min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * jitter
            log.warning("%s: %s; retry %d in %.2fs", url, failure, attempt + 1, retry_after)
            self._sleep(retry_after)
        raise AssertionError("unreachable")

    def probe(self, server: int, model: str) -> Endpoint:
        """The endpoint, after one GET /models to read the served model's `max_model_len` (once per endpoint)."""
        ep = self.endpoints[server]
        if ep.probed:
            return ep
        try:
            resp = self._http.get(ep.url + "/models")
        except httpx.TransportError as e:  # not cached: the next request probes again
            log.debug("%s/models: %s", ep.url, e)
            return ep
        cards = []
        if resp.status_code == 200:
            try:
                cards = [c for c in resp.json().get("data") or [] if isinstance(c, dict)]
            except (ValueError, AttributeError):
                cards = []
        card = next((c for c in cards if c.get("id") == model), cards[0] if len(cards) == 1 else None)
        length = card.get("max_model_len") if card else None
        with self.lock:
            ep.max_model_len = length if isinstance(length, int) and length > 0 else None
            ep.probed = True
        return ep

    def close(self) -> None:
        self._http.close()


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None for a missing header or the HTTP-date form."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def learn(ep: Endpoint, lock: threading.Lock, name: str, value: Any, why: str) -> bool:
    """Record what an endpoint turned out to accept (logged the first time); True, for `adapt`'s callers."""
    with lock:
        changed = getattr(ep, name) != value
        setattr(ep, name, value)
    if changed:
        log.warning("%s %s", ep.url, why)
    return True


def adapt(ep: Endpoint, lock: threading.Lock, err: RejectedError, body: dict[str, Any]) -> bool:
    """Change what this endpoint gets after a 4xx that names what it cannot take; False when nothing applies."""
    text = err.text
    if isinstance(body.get("prompt"), list) and ep.token_prompts and "prompt" in text and "str" in text:
        return learn(ep, lock, "token_prompts", False, "takes only text prompts; prompts go as text")
    if ep.sampling == "vllm" and any(f in text for f in EXTENSIONS if f in body):
        why = "rejects vLLM's sampling fields; they go as a generation_config"
        return learn(ep, lock, "sampling", "generation_config", why)
    if ep.sampling == "generation_config" and "generation_config" in text:
        why = "rejects generation_config too; top_k, min_p and repetition_penalty take the server's defaults"
        return learn(ep, lock, "sampling", "plain", why)
    return False


def sampling_fields(ep: Endpoint, *, temperature: float, top_p: float, top_k: int) -> dict[str, Any]:
    """Every sampling setting, in the form this endpoint takes (min_p 0 and repetition_penalty 1: both off)."""
    fields: dict[str, Any] = {"temperature": temperature, "top_p": top_p}
    if ep.sampling == "vllm":
        return fields | {"top_k": top_k if top_k > 0 else -1, "min_p": 0.0, "repetition_penalty": 1.0}
    if ep.sampling == "generation_config":
        # transformers serve replaces the model's generation_config with this one (unset fields keep the model's).
        config: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            config = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0)}
        config["repetition_penalty"] = 1.0
        return fields | {"generation_config": json.dumps(config)}
    if top_k > 0:
        raise ServerCapabilityError(
            f"{ep.url} accepts no top_k (neither as a field nor in a generation_config); set top_k: -1 in the "
            "recipe or serve the model with vllm serve."
        )
    return fields


def no_echo(url: str) -> ServerCapabilityError:
    return ServerCapabilityError(
        f"{url} returns no prompt logprobs for echo=True, so it cannot score continuations (transformers serve, TGI "
        "and llama.cpp cannot); set dto.probe: sample in the recipe, or serve the model with vllm serve."
    )


def draw_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` when `n` is emulated by single requests (31 bits: every server takes it)."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def split_proportionally(total: int, weights: list[int]) -> list[int]:
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
