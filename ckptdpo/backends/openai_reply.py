"""What a 200 reply of an OpenAI-compatible server must hold, checked before anything in it is used.

A server can answer 200 and still break the API: a null `text`, token ids that are not token ids, a negative
`usage.prompt_tokens`, more tokens than `max_tokens`, a `finish_reason` such as `abort` (vLLM's: the sample is cut
short), more choices than `n`, two choices with one index. Taken as they come, such replies become empty samples
with token counts, or statistics that are wrong, and nothing says so. Each check here raises `ContractError` naming
the server, the field, the value and what the field must hold, so the request fails (its shard is retried, then the
stage fails) with a message that says what went wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptdpo.backends.base import FinishReason
from ckptdpo.backends.openai_http import OpenAIError

# What each server's finish reason means here: vLLM and SGLang send stop / length (vLLM `repetition` for its own loop
# detection), transformers serve and llama.cpp stop / length, TGI eos_token / stop_sequence / length. Anything else
# (vLLM's `abort`, OpenAI's `content_filter`, a null) is not a finished sample.
FINISH_FROM_SERVER: dict[str, FinishReason] = {
    "stop": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "repetition": "loop",
    "loop": "loop",
}


class ContractError(OpenAIError):
    """A 200 reply that breaks the API contract; the message names the server, the field and what it must hold."""


def broken(url: str, field: str, value: Any, want: str) -> ContractError:
    shown = repr(value)
    return ContractError(f"{url} sent {field} = {shown[:80]}{'...' if len(shown) > 80 else ''}; {want}")


@dataclass(frozen=True)
class CompletionReply:
    """The checked parts of one `/completions` reply: its choices in index order and its token usage."""

    choices: list[dict[str, Any]]
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int


def parse_completion(data: Any, url: str, *, n: int, max_tokens: int) -> CompletionReply:
    """Check a reply to a request for `n` choices of at most `max_tokens` tokens each.

    Fewer choices than `n` pass (a server without `n` support sends one; the caller asks for the rest), more fail.
    """
    if not isinstance(data, dict):
        raise broken(url, "the reply", data, "a JSON object is required")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise broken(url, "choices", choices, "a list of choices is required")
    if len(choices) > n:
        raise ContractError(f"{url} sent {len(choices)} choices for a request of n={n}")
    for i, choice in enumerate(choices):
        _check_choice(choice, i, url, max_tokens)
    indices = [c.get("index", i) for i, c in enumerate(choices)]
    if sorted(indices) != list(range(len(choices))):
        raise broken(url, "choices[].index", indices, f"each of 0..{len(choices) - 1} once is required")
    prompt, completion, cached = _usage(data.get("usage"), url)
    if completion is not None and completion > len(choices) * max_tokens:
        raise broken(
            url, "usage.completion_tokens", completion, f"at most {len(choices)} choice(s) x max_tokens {max_tokens}"
        )
    ordered = [c for _, c in sorted(zip(indices, choices, strict=True), key=lambda pair: pair[0])]
    return CompletionReply(ordered, prompt, completion, cached)


def _check_choice(choice: Any, i: int, url: str, max_tokens: int) -> None:
    where = f"choices[{i}]"
    if not isinstance(choice, dict):
        raise broken(url, where, choice, "an object is required")
    if not isinstance(choice.get("text"), str):
        raise broken(url, f"{where}.text", choice.get("text"), "a string is required")
    reason = choice.get("finish_reason")
    if reason not in FINISH_FROM_SERVER:
        raise broken(url, f"{where}.finish_reason", reason, f"one of {', '.join(FINISH_FROM_SERVER)} is required")
    index = choice.get("index", i)
    if not _is_count(index):
        raise broken(url, f"{where}.index", index, "an integer >= 0 is required")
    ids = choice.get("token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_count(t) for t in ids):
            raise broken(url, f"{where}.token_ids", ids, "a list of token ids (integers >= 0) is required")
        if len(ids) > max_tokens:
            raise broken(url, f"{where}.token_ids", f"{len(ids)} ids", f"at most max_tokens {max_tokens}")


def _usage(usage: Any, url: str) -> tuple[int | None, int | None, int]:
    """(prompt tokens, completion tokens, cached prompt tokens) of a reply's `usage`; None where it sends none."""
    if usage is None:
        return None, None, 0
    if not isinstance(usage, dict):
        raise broken(url, "usage", usage, "an object is required")
    prompt = _count(usage, "prompt_tokens", url)
    completion = _count(usage, "completion_tokens", url)
    details = usage.get("prompt_tokens_details")
    if details is None:
        return prompt, completion, 0
    if not isinstance(details, dict):
        raise broken(url, "usage.prompt_tokens_details", details, "an object is required")
    cached = _count(details, "cached_tokens", url, "usage.prompt_tokens_details.") or 0
    if prompt is not None and cached > prompt:
        raise broken(
            url, "usage.prompt_tokens_details.cached_tokens", cached, f"at most usage.prompt_tokens ({prompt})"
        )
    return prompt, completion, cached


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(section: dict[str, Any], name: str, url: str, prefix: str = "usage.") -> int | None:
    value = section.get(name)
    if value is None:
        return None
    if not _is_count(value):
        raise broken(url, f"{prefix}{name}", value, "an integer >= 0 is required")
    return value


def chat_text(data: Any, url: str) -> str:
    """The reply text of a `/chat/completions` reply (its first choice's `message.content`)."""
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise ContractError(f"{url} sent a chat completion without choices[0].message") from None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise broken(url, "choices[0].message.content", content, "a string is required")
    return content


def echo_logprobs(data: Any, url: str) -> tuple[list[float | None], list[int] | None]:
    """(token_logprobs, text_offset) of an echo reply; empty logprobs mean the server does not echo them."""
    try:
        lp = (data.get("choices") or [{}])[0].get("logprobs") or {}
    except (AttributeError, TypeError):
        raise broken(url, "choices[0].logprobs", data, "an object is required") from None
    values, offsets = lp.get("token_logprobs") or [], lp.get("text_offset")
    if not isinstance(values, list) or not all(v is None or _is_logprob(v) for v in values):
        raise broken(url, "choices[0].logprobs.token_logprobs", values, "log-probabilities (numbers <= 0) only")
    if offsets is not None and (not isinstance(offsets, list) or not all(_is_count(o) for o in offsets)):
        raise broken(url, "choices[0].logprobs.text_offset", offsets, "character offsets (integers >= 0) only")
    return values, offsets


def _is_logprob(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= 0
