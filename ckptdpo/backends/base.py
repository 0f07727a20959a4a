"""The generation backend protocol: load once, generate for a batch, score continuations, build chat prompts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from ckptdpo.configs import INSTRUCTION

FinishReason = Literal["stop", "length", "loop", "error"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (text or token ids) and how to sample `n` continuations of it."""

    prompt: str | tuple[int, ...]
    n: int = 1
    seed: int | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    # Continuations of one trajectory share a key, so a multi-endpoint backend sends them where the prefix is cached.
    route_key: str | None = None


@dataclass
class Sample:
    text: str
    num_tokens: int
    finish_reason: FinishReason
    token_ids: list[int] | None = None


@dataclass
class GenerationResult:
    """The `n` samples of one request; `error` is set (and samples empty) when the request itself failed.

    Prompt-token accounting is per result (per request, not per sample: the `n` samples of a request share one
    prompt). `prompt_tokens_requested` is the prompt's length as sent; `prompt_tokens_computed` is how many of those
    tokens this request actually ran through the model, the rest having come from a cache (the hf backend's prefix
    reuse across requests of one `route_key`, a server's prefix cache). Both are 0 when the backend does not know;
    summing each over a stage's results gives that stage's totals.
    """

    samples: list[Sample]
    prompt_tokens: int
    error: str | None = None
    prompt_tokens_requested: int = 0
    prompt_tokens_computed: int = 0


def result_problem(request: GenerationRequest, result: GenerationResult) -> str | None:
    """What breaks the protocol in a backend's result for `request`, in one phrase; None when nothing does.

    A result either failed (`error` set, no samples) or holds exactly `request.n` samples, each with text, a token
    count >= 0 and a known finish reason. Anything between (a short or empty result without an error, a null text,
    a negative count) would be stored as if it were generated, so callers treat it as a failed request.
    """
    if result.error is not None:
        return None if not result.samples else "a failed result that still holds samples"
    if len(result.samples) != request.n:
        return f"{len(result.samples)} sample(s) for a request of n={request.n}"
    for name in ("prompt_tokens", "prompt_tokens_requested", "prompt_tokens_computed"):
        if not _is_count(getattr(result, name)):
            return f"{name} = {getattr(result, name)!r}, not an integer >= 0"
    for i, s in enumerate(result.samples):
        if not isinstance(s.text, str):
            return f"sample {i} has text {s.text!r}, not a string"
        if not _is_count(s.num_tokens):
            return f"sample {i} has num_tokens {s.num_tokens!r}, not an integer >= 0"
        if s.finish_reason not in FINISH_REASONS:
            return f"sample {i} has finish_reason {s.finish_reason!r}, not one of {', '.join(FINISH_REASONS)}"
        if s.token_ids is not None and not all(_is_count(t) for t in s.token_ids):
            return f"sample {i} has token_ids that are not integers >= 0"
    return None


def checked_results(
    requests: Sequence[GenerationRequest], results: Sequence[GenerationResult], who: str
) -> list[GenerationResult]:
    """`results` with any that breaks the protocol for its request turned into a failed request saying why (so it is
    never stored as generated); a result count that differs from the requests' is an error of the whole call."""
    if len(results) != len(requests):
        raise RuntimeError(f"{who}: {len(results)} result(s) for {len(requests)} request(s)")
    out = []
    for req, res in zip(requests, results, strict=True):
        problem = result_problem(req, res)
        out.append(
            res if problem is None else GenerationResult(samples=[], prompt_tokens=0, error=f"{who}: {problem}")
        )
    return out


class CheckedBackend:
    """A backend whose `generate` results are checked against their requests (`checked_results`); every other
    attribute is the backend's own."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        who = f"backend {getattr(self._backend, 'model_id', type(self._backend).__name__)}"
        return checked_results(requests, self._backend.generate(requests), who)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class BackendStats:
    """Counters a backend keeps across calls (reported in stats.json)."""

    requests: int = 0
    samples: int = 0
    prompt_tokens_computed: int = 0
    completion_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def count(self, result: GenerationResult, prompt_tokens_computed: int | None = None) -> None:
        self.requests += 1
        self.samples += len(result.samples)
        self.prompt_tokens_computed += (
            result.prompt_tokens if prompt_tokens_computed is None else prompt_tokens_computed
        )
        for s in result.samples:
            self.completion_tokens += s.num_tokens
            self.finish_reasons[s.finish_reason] = self.finish_reasons.get(s.finish_reason, 0) + 1


@runtime_checkable
class Backend(Protocol):
    """What every backend implements. `model_id` and `revision` go into cache keys."""

    model_id: str
    revision: str
    stats: BackendStats

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; never raises for a single bad request."""
        ...

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Summed log-probability of each continuation's tokens given its prompt."""
        ...

    def chat_prompt(self, problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        """The model's chat template applied to the problem plus the reasoning instruction, ready to continue;
        `few_shot` (problem, solution) pairs come first as earlier exchanges (`problem_messages`)."""
        ...

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Reply text per conversation (list of {role, content}); used by the DTO judge."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts under this backend's tokenizer."""
        ...

    def close(self) -> None: ...


def problem_message(problem: str) -> str:
    """The user turn every backend sends: the problem, a blank line, the instruction from DESIGN.md."""
    return f"{problem}\n\n{INSTRUCTION}"


def templated_prompts(tokenizer, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """A tokenizer's chat template around each conversation, ending where the assistant speaks."""
    return [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in conversations]


def problem_messages(problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The chat turns of one problem: each worked example (problem, solution) as an earlier user/assistant exchange,
    then the problem's own user turn from `problem_message`."""
    turns = []
    for example, solution in few_shot:
        turns += [{"role": "user", "content": problem_message(example)}, {"role": "assistant", "content": solution}]
    return [*turns, {"role": "user", "content": problem_message(problem)}]


def templated_problem(tokenizer, problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
    """The chat prompt of one problem (after its worked examples: `problem_messages`), templated by the tokenizer."""
    return templated_prompts(tokenizer, [problem_messages(problem, few_shot)])[0]


class LocalTokenizerChat:
    """`chat_prompt` and `chat` for a backend that holds its model's tokenizer as `self.tokenizer` (hf, vllm)."""

    tokenizer: Any

    def chat_prompt(self, problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        """The model's chat template around the problem and the instruction, ending where the assistant speaks."""
        return templated_problem(self.tokenizer, problem, few_shot)

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Reply text per conversation (`local_chat`: an empty reply where one cannot be generated)."""
        return local_chat(self, self.tokenizer, conversations, max_tokens, temperature)


def local_chat(backend, tokenizer, conversations: Sequence[Sequence[dict[str, str]]], max_tokens: int,
               temperature: float) -> list[str]:  # fmt: skip
    """`chat` of a backend that holds its tokenizer (hf, vllm): template each conversation, generate one reply.

    A conversation that cannot be generated (longer than the context, say) gets an empty reply, logged: the judge
    counts it as an unparseable reply, which its failure budget bounds.
    """
    prompts = templated_prompts(tokenizer, conversations)
    requests = [GenerationRequest(p, n=1, seed=0, max_tokens=max_tokens, temperature=temperature) for p in prompts]
    replies = []
    for res in backend.generate(requests):
        if res.error:
            logging.getLogger(__name__).warning("chat request failed: %s", res.error)
        replies.append(res.samples[0].text if res.samples else "")
    return replies
