"""The GRPO reward: the run's own verifier (math, code in the sandbox, choice), one verdict per completion.

- correct: 1; incorrect or no answer: 0;
- a completion cut off at max_completion_length (its last token is not an end token) gets 0 and is never verified:
  it never gave its final answer (the verifier's own rule for a `length` finish);
- a verifier failure (math-verify timed out or could not parse the gold answer, a worker died, a code problem with
  nothing to test against) is None: TRL leaves that completion out of its group's mean and gives it no advantage, so
  it neither scores 0 nor moves the policy. A code candidate that runs past its limit is the candidate's failure,
  not the verifier's: 0.

Verification never runs in the trainer's process: `ckptdpo.evaluate.verify_samples` sends math answers and choice
letters to the verifier's killable process pool (one pool, started on first use and kept for the whole run) and
code to the sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptdpo.configs import EvalConfig, VerifyConfig

CORRECT, WRONG = 1.0, 0.0
# Dataset columns the verifiers of each kind read (besides `answer` and `kind`).
KIND_COLUMNS = ("tests", "setup", "cases", "choice_order")


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, or the assistant message(s) of a conversation."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, Mapping))


def finish_reason(ids: Sequence[int], end_ids: frozenset[int]) -> str:
    """`stop` when the completion ended with an end token (EOS or pad, TRL's own test), else `length` (cut off)."""
    return "stop" if ids and ids[-1] in end_ids else "length"


def reward_of(verdict: Any, kind: str, reason: str) -> float | None:
    """The reward of one verdict (see the module docstring); None means 'skip this sample'."""
    if reason == "length":
        return WRONG
    if verdict.status == "correct":
        return CORRECT
    if verdict.status in ("incorrect", "no_answer") or (verdict.status == "timeout" and kind == "code"):
        return WRONG
    return None


def score_completions(
    rows: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    reasons: Sequence[str],
    verify: VerifyConfig,
    sandbox: EvalConfig,
) -> tuple[list[float | None], list[Any]]:
    """Rewards and verdicts of completions, one per row (the completion's problem: answer, kind, tests, ...).

    Cut-off completions are not sent to any verifier; their verdict is `no_answer`.
    """
    from ckptdpo.evaluate import verify_samples
    from ckptdpo.verify import Verdict

    todo = [i for i, r in enumerate(reasons) if r != "length"]
    verdicts: list[Any] = [Verdict("no_answer", None, None)] * len(texts)
    if todo:
        got = verify_samples(
            [rows[i] for i in todo],
            [[texts[i]] for i in todo],
            sandbox,
            timeout_s=verify.timeout_s,
            workers=verify.workers,
            finish_reasons=[[reasons[i]] for i in todo],
            answer_format=verify.answer_format,
        )
        for i, v in zip(todo, got, strict=True):
            verdicts[i] = v
    kinds = [r.get("kind") or "math" for r in rows]
    rewards = [reward_of(v, k, r) for v, k, r in zip(verdicts, kinds, reasons, strict=True)]
    return rewards, verdicts


class VerifierReward:
    """A TRL reward function: the run's verifier on each completion (`score_completions`).

    TRL calls it with the prompts, the completions (text or messages), their token ids and every other dataset
    column as a list (answer, kind and the kind's columns). `end_ids` are the tokens that end a completion.
    """

    __name__ = "verifier"

    def __init__(self, verify: VerifyConfig, sandbox: EvalConfig, end_ids: Sequence[int]) -> None:
        self.verify, self.sandbox, self.end_ids = verify, sandbox, frozenset(end_ids)

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float | None]:
        rows = [
            {"answer": a, "kind": k, **{c: columns[c][i] for c in KIND_COLUMNS if c in columns}}
            for i, (a, k) in enumerate(zip(columns["answer"], columns["kind"], strict=True))
        ]
        reasons = [finish_reason(ids, self.end_ids) for ids in completion_ids]
        texts = [completion_text(c) for c in completions]
        rewards, _ = score_completions(rows, texts, reasons, self.verify, self.sandbox)
        log_metric = columns.get("log_metric")
        if log_metric is not None and rewards:
            log_metric("verifier/skipped_share", sum(r is None for r in rewards) / len(rewards))
            log_metric("verifier/cut_off_share", reasons.count("length") / len(reasons))
        return rewards
