"""Checkpoints, resume and the run summary, computed from what a checkpoint's trainer_state.json holds.

The summary never reads the checkpoint a run resumed from after training: `save_total_limit` may have deleted it
by then. Token and padding counts travel inside each checkpoint's trainer_state.json (`stateful_callbacks`), so a
resumed run reports the same totals as one that was never interrupted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptdpo.train.job import TRAINER_STATE

TOKEN_COUNTS_KEY = "ckptdpo_token_counts"


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete `checkpoint-N` (trainer_state.json is written last, so it marks completeness)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / TRAINER_STATE).is_file()]
    done = [p for p in done if checkpoint_step(p) >= 0]
    return max(done, key=checkpoint_step) if done else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete checkpoint dirs a killed run left without trainer_state.json, so nothing resumes from them."""
    removed = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.is_dir() and not (p / TRAINER_STATE).is_file():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def read_trainer_state(checkpoint: Path | None) -> dict[str, Any]:
    """A checkpoint's trainer_state.json as a dict; {} for no checkpoint."""
    return json.loads((checkpoint / TRAINER_STATE).read_text()) if checkpoint is not None else {}


def summarize_steps(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step loss, reward margin and accuracy from a Trainer's log_history (training entries, one per step)."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        by_step[entry["step"]] = {
            "step": entry["step"],
            "loss": entry["loss"],
            "rewards_margins": entry.get("rewards/margins"),
            "rewards_accuracies": entry.get("rewards/accuracies"),
            "learning_rate": entry.get("learning_rate"),
        }
    return [by_step[s] for s in sorted(by_step)]


def count_batch_tokens(inputs: dict[str, Any]) -> tuple[int, int]:
    """(real, padded) tokens of one micro-batch as the model sees it.

    DPOTrainer stacks chosen and rejected into one `input_ids` batch padded to the longest of all; CPOTrainer pads
    chosen and rejected separately and concatenates them padded to the longer of the two.
    """
    if "input_ids" in inputs:
        return int(inputs["attention_mask"].sum()), int(inputs["input_ids"].numel())
    chosen, rejected = inputs["chosen_input_ids"], inputs["rejected_input_ids"]
    real = int(inputs["chosen_attention_mask"].sum()) + int(inputs["rejected_attention_mask"].sum())
    return real, 2 * chosen.shape[0] * max(chosen.shape[1], rejected.shape[1])


WORK_KEYS = ("computed_tokens", "computed_padded_tokens", "pairs", "attended_pairs")


def count_batch_work(inputs: dict[str, Any]) -> tuple[int, int, int, int]:
    """(tokens computed, padded tokens computed, pairs, attended query-key pairs) of one micro-batch.

    With prefix sharing (a `packed` entry) the model computes the packed rows, each prompt once; otherwise the
    standard rows. Attended pairs count causal attention over real tokens only (what the MFU estimate counts).
    """
    packed = inputs.get("packed")
    if packed is not None:
        from ckptdpo.train.prefix import packed_counts

        computed, padded, attended = packed_counts(packed)
        return computed, padded, int(packed["input_ids"].shape[0]), attended
    real, padded = count_batch_tokens(inputs)
    if "input_ids" in inputs:
        lengths, pairs = inputs["attention_mask"].sum(dim=1), inputs["input_ids"].shape[0] // 2
    else:
        lengths = [inputs[f"{side}_attention_mask"].sum(dim=1) for side in ("chosen", "rejected")]
        lengths, pairs = lengths[0].tolist() + lengths[1].tolist(), inputs["chosen_input_ids"].shape[0]
    return real, padded, int(pairs), int(sum(int(n) * (int(n) + 1) // 2 for n in lengths))


@dataclass
class TokenCounts:
    """Real and padded tokens per optimizer step, summed over ranks; the pending counts of this rank's step.

    A step is `[step, real, padded]`, plus `{computed_tokens, computed_padded_tokens, pairs, attended_pairs,
    seconds}` when the run measured them: what the model computed (with prefix sharing, each prompt once) and how
    long the step took, start-up, logging and checkpoint saves apart.
    """

    steps: list[list] = field(default_factory=list)
    pending: list[int] = field(default_factory=lambda: [0] * (2 + len(WORK_KEYS)))

    def add_batch(self, inputs: dict[str, Any]) -> None:
        for i, n in enumerate((*count_batch_tokens(inputs), *count_batch_work(inputs))):
            self.pending[i] += n

    def close_step(self, step: int, real: int, padded: int, work: dict[str, Any] | None = None) -> None:
        """Record a finished step with its counts over all ranks; the pending counts start again."""
        entry: list = [step, int(real), int(padded)] + ([work] if work else [])
        self.steps = [s for s in self.steps if s[0] < step] + [entry]
        self.pending = [0] * (2 + len(WORK_KEYS))

    def to_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    @classmethod
    def from_trainer_state(cls, state: dict[str, Any]) -> TokenCounts:
        saved = (state.get("stateful_callbacks") or {}).get(TOKEN_COUNTS_KEY) or {}
        step = int(state.get("global_step") or 0)
        return cls(steps=[list(s) for s in saved.get("steps", []) if s[0] <= step])


def padding_figures(steps: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Totals of real vs padded tokens and the share that is padding, plus the per-step figures."""
    real = sum(s[1] for s in steps)
    padded = sum(s[2] for s in steps)
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_fraction": (padded - real) / padded if padded else None,
        "per_step": [{"step": s[0], "real_tokens": s[1], "padded_tokens": s[2], **_work(s)} for s in steps],
    }


def _work(step: Sequence) -> dict[str, Any]:
    """What the model computed in a step (not how long it took: that differs between identical runs)."""
    return {k: step[3][k] for k in WORK_KEYS} if len(step) > 3 else {}


def summarize_run(state: dict[str, Any], counts: TokenCounts, start_step: int, runtime: float) -> dict[str, Any]:
    """The step, loss and token part of the summary, from a trainer state dict and the token counts.

    `tokens` counts every trained token of the whole run (also the steps before a resume), so it matches an
    uninterrupted run; the speed uses only the tokens this session trained. Tokens are those of the pair's two
    sequences (prompt + chosen, prompt + rejected); `computed_tokens` those the model computed (fewer with prefix
    sharing). The rates are steady-state (`steady_state`) when the steps were timed, else over `runtime`.
    """
    steps = summarize_steps(state.get("log_history", []))
    padding = padding_figures(counts.steps)
    this_session = sum(s[1] for s in counts.steps if s[0] > start_step)
    steady = steady_state(counts.steps, start_step)
    session = [s[3] for s in counts.steps if s[0] > start_step and len(s) > 3]
    step_seconds = [w["seconds"] for w in session]
    computed = sum(s[3]["computed_tokens"] for s in counts.steps if len(s) > 3)
    computed_padded = sum(s[3]["computed_padded_tokens"] for s in counts.steps if len(s) > 3)
    return {
        "global_step": int(state.get("global_step") or 0),
        "start_step": start_step,
        "steps_run": int(state.get("global_step") or 0) - start_step,
        "final_loss": steps[-1]["loss"] if steps else None,
        "steps": steps,
        "tokens": padding["real_tokens"],
        "tokens_estimated": False,
        "tokens_this_session": this_session,
        "computed_tokens": computed,
        "computed_padding_fraction": (computed_padded - computed) / computed_padded if computed_padded else None,
        # The Trainer's own non-padding count (DPO; CPOTrainer's batches have no input_ids for it to count).
        "num_input_tokens_seen": int(state.get("num_input_tokens_seen") or 0),
        "padding": padding,
        "train_runtime_s": runtime,
        "steady_state": steady,
        "train_steps_s": sum(step_seconds),
        "step_seconds": step_seconds,
        "step_cpu_seconds": [w.get("cpu_seconds") for w in session],
        "tokens_per_s": steady["tokens_per_s"] if steady else (this_session / runtime if runtime > 0 else None),
        "computed_tokens_per_s": steady["computed_tokens_per_s"] if steady else None,
        "pairs_per_s": steady["pairs_per_s"] if steady else None,
    }


def steady_state(steps: Sequence[Sequence], start_step: int) -> dict[str, Any] | None:
    """Rates over this session's timed steps after its first (which pays for lazy initialization and warm-up).

    A step's time runs from the end of the previous step's bookkeeping (logging, checkpoint saves) to the end of its
    optimizer step, data loading included. None when no step of this session was timed.
    """
    timed = [s for s in steps if s[0] > start_step and len(s) > 3 and s[3].get("seconds") is not None]
    if not timed:
        return None
    window = timed[1:] or timed
    seconds = sum(s[3]["seconds"] for s in window)
    total = {k: sum(s[3][k] for s in window) for k in WORK_KEYS}
    tokens = sum(s[1] for s in window)
    cpu = [s[3].get("cpu_seconds") for s in window]

    def rate(n: float) -> float | None:
        return n / seconds if seconds > 0 else None

    return {
        "first_step": window[0][0],
        "last_step": window[-1][0],
        "num_steps": len(window),
        "seconds": seconds,
        "tokens": tokens,
        **total,
        "tokens_per_s": rate(tokens),
        "computed_tokens_per_s": rate(total["computed_tokens"]),
        "pairs_per_s": rate(total["pairs"]),
        "seconds_per_step": seconds / len(window),
        # Rank 0's CPU time: on a loaded machine, pairs per CPU second is the rate the work alone allows.
        "cpu_seconds": sum(cpu) if None not in cpu else None,
    }
