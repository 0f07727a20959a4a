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


@dataclass
class TokenCounts:
    """Real and padded tokens per optimizer step, summed over ranks; the pending counts of this rank's step."""

    steps: list[list[int]] = field(default_factory=list)  # [step, real_tokens, padded_tokens]
    pending: list[int] = field(default_factory=lambda: [0, 0])

    def add_batch(self, inputs: dict[str, Any]) -> None:
        real, padded = count_batch_tokens(inputs)
        self.pending[0] += real
        self.pending[1] += padded

    def close_step(self, step: int, real: int, padded: int) -> None:
        """Record a finished step with its counts over all ranks; the pending counts start again."""
        self.steps = [s for s in self.steps if s[0] < step] + [[step, int(real), int(padded)]]
        self.pending = [0, 0]

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
        "per_step": [{"step": s[0], "real_tokens": s[1], "padded_tokens": s[2]} for s in steps],
    }


def summarize_run(state: dict[str, Any], counts: TokenCounts, start_step: int, runtime: float) -> dict[str, Any]:
    """The step, loss and token part of the summary, from a trainer state dict and the token counts.

    `tokens` counts every trained token of the whole run (also the steps before a resume), so it matches an
    uninterrupted run; the speed uses only the tokens this session trained.
    """
    steps = summarize_steps(state.get("log_history", []))
    padding = padding_figures(counts.steps)
    this_session = sum(s[1] for s in counts.steps if s[0] > start_step)
    return {
        "global_step": int(state.get("global_step") or 0),
        "start_step": start_step,
        "steps_run": int(state.get("global_step") or 0) - start_step,
        "final_loss": steps[-1]["loss"] if steps else None,
        "steps": steps,
        "tokens": padding["real_tokens"],
        "tokens_estimated": False,
        "tokens_this_session": this_session,
        # The Trainer's own non-padding count (DPO; CPOTrainer's batches have no input_ids for it to count).
        "num_input_tokens_seen": int(state.get("num_input_tokens_seen") or 0),
        "padding": padding,
        "train_runtime_s": runtime,
        "tokens_per_s": this_session / runtime if runtime > 0 else None,
    }
