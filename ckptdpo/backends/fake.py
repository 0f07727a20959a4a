"""A scripted, deterministic, stateless backend for pipeline tests: the script decides every text and score.

Script (a dict, or a JSON/YAML file named by `backend.script`):

    template: "<|user|>\\n{message}\\n<|assistant|>\\n"   # chat_prompt(problem): {message} -> problem_message(problem)
    problems:                                            # prompts equal to chat_prompt(problem)
      "What is 2+3?":
        samples: ["traj A ...", {text: "traj B ...", finish_reason: loop}]   # sample j -> samples[j % len]
    continuations:                                       # any other prompt: the rule with the longest `after`
      - after: "text the prompt ends with"               # that the prompt ends with wins
        texts: ["continuation 1", "continuation 2"]      # sample j of a request with seed s -> texts[(s + j) % len]
    default_continuation: "... \\boxed{0}"               # optional; without it an unmatched prompt is a request error
    scores: [{prompt_endswith: "...", continuation: "...", logprob: -0.1}]   # first match wins
    default_logprob: -20.0
    chat: [{contains: "...", reply: "..."}]              # first rule whose `contains` is in the last user message
    default_reply: ""

A token is a whitespace-separated word: counts, `max_tokens` truncation ("length") and `count_tokens` all use that.
Stop strings cut the text before the earliest stop ("stop"). Token-id prompts are a request error (no vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ckptdpo.backends.base import (
    BackendStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Sample,
    problem_message,
)
from ckptdpo.configs import BackendConfig, describe_validation_error
from ckptdpo.errors import UserError

DEFAULT_TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"
_WORD = re.compile(r"\S+")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScriptedText(_Strict):
    text: str
    finish_reason: Literal["stop", "length", "loop"] = "stop"


class ProblemScript(_Strict):
    samples: list[str | ScriptedText] = Field(min_length=1)


class ContinuationRule(_Strict):
    after: str = Field(min_length=1)
    texts: list[str | ScriptedText] = Field(min_length=1)


class ScoreRule(_Strict):
    prompt_endswith: str = ""
    continuation: str
    logprob: float


class ChatRule(_Strict):
    contains: str
    reply: str


class FakeScript(_Strict):
    """The validated script; see the module docstring."""

    template: str = DEFAULT_TEMPLATE
    problems: dict[str, ProblemScript] = Field(default_factory=dict)
    continuations: list[ContinuationRule] = Field(default_factory=list)
    default_continuation: str | ScriptedText | None = None
    scores: list[ScoreRule] = Field(default_factory=list)
    default_logprob: float = -20.0
    chat: list[ChatRule] = Field(default_factory=list)
    default_reply: str = ""
    delay_s: float = Field(0.0, ge=0, description="sleep per generate call: makes a run slow enough to interrupt")


def count_words(text: str) -> int:
    """The fake backend's token count: whitespace-separated words (str.split: same words as \\S+, ~5x faster)."""
    return len(text.split())


def _first_words(text: str, k: int) -> str:
    """The text up to the end of its k-th word (whitespace before it kept, after it dropped)."""
    if k <= 0:
        return ""
    for i, m in enumerate(_WORD.finditer(text), start=1):
        if i == k:
            return text[: m.end()]
    return text


class FakeBackend:
    """Replays a script: texts by prompt, scores by (prompt suffix, continuation), chat replies by substring."""

    model_id = "fake"

    def __init__(self, script: dict[str, Any] | FakeScript, *, source: str = "<fake script>") -> None:
        if isinstance(script, FakeScript):
            self.script = script
        else:
            try:
                self.script = FakeScript.model_validate(script)
            except ValidationError as e:
                raise UserError(describe_validation_error(e, source)) from None
        dump = json.dumps(self.script.model_dump(mode="json"), sort_keys=True)
        self.revision = hashlib.sha256(dump.encode()).hexdigest()[:16]
        self.stats = BackendStats()
        self._by_prompt = {self.chat_prompt(p): s for p, s in self.script.problems.items()}
        # Longest `after` first, so the first suffix match is the most specific rule.
        self._rules = sorted(self.script.continuations, key=lambda r: len(r.after), reverse=True)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> FakeBackend:
        """Load the script named by `cfg.script` (JSON or YAML)."""
        if not cfg.script:
            raise UserError("backend.script is not set; the fake backend needs a JSON/YAML script file there.")
        path = Path(cfg.script)
        try:
            data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except FileNotFoundError:
            raise UserError(
                f"{path}: fake backend script not found; set backend.script to an existing file."
            ) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            msg = " ".join(str(e).split())
            raise UserError(f"{path}: cannot read the fake backend script ({msg}); fix the file.") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a fake backend script must be a mapping, got {type(data).__name__}.")
        return cls(data, source=str(path))

    def chat_prompt(self, problem: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        # replace, not str.format: problems are LaTeX and full of braces.
        examples = "".join(
            self.script.template.replace("{message}", problem_message(q)) + a + "\n" for q, a in few_shot
        )
        return examples + self.script.template.replace("{message}", problem_message(problem))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.script.delay_s:
            time.sleep(self.script.delay_s)
        results = []
        for req in requests:
            result = self._generate_one(req)
            self.stats.count(result)
            results.append(result)
        return results

    def _generate_one(self, req: GenerationRequest) -> GenerationResult:
        if not isinstance(req.prompt, str):
            return GenerationResult([], 0, error="the fake backend takes text prompts, not token ids")
        prompt_tokens = count_words(req.prompt)
        problem = self._by_prompt.get(req.prompt)
        if problem is not None:
            texts = [problem.samples[j % len(problem.samples)] for j in range(req.n)]
        else:
            rule = next((r for r in self._rules if req.prompt.endswith(r.after)), None)
            if rule is not None:
                s = req.seed or 0
                texts = [rule.texts[(s + j) % len(rule.texts)] for j in range(req.n)]
            elif self.script.default_continuation is not None:
                texts = [self.script.default_continuation] * req.n
            else:
                tail = req.prompt[-60:]
                return GenerationResult(
                    [], prompt_tokens, error=f"fake script has no rule for a prompt ending {tail!r}"
                )
        return GenerationResult([self._finish(t, req) for t in texts], prompt_tokens)

    @staticmethod
    def _finish(scripted: str | ScriptedText, req: GenerationRequest) -> Sample:
        text, reason = (scripted, "stop") if isinstance(scripted, str) else (scripted.text, scripted.finish_reason)
        finish: FinishReason = reason
        cuts = [i for i in (text.find(s) for s in req.stop if s) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        if count_words(text) > req.max_tokens:
            text, finish = _first_words(text, req.max_tokens), "length"
        return Sample(text=text, num_tokens=count_words(text), finish_reason=finish)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"score needs as many prompts as continuations ({len(prompts)} != {len(continuations)})")
        out = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            rule = next(
                (r for r in self.script.scores if r.continuation == cont and prompt.endswith(r.prompt_endswith)),
                None,
            )
            out.append(rule.logprob if rule else self.script.default_logprob)
        return out

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        replies = []
        for conv in conversations:
            last_user = next((m["content"] for m in reversed(conv) if m.get("role") == "user"), "")
            rule = next((r for r in self.script.chat if r.contains in last_user), None)
            replies.append(_first_words(rule.reply if rule else self.script.default_reply, max_tokens))
        return replies

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [count_words(t) for t in texts]

    def close(self) -> None:
        pass
