"""TRL's GRPOTrainer with what a cost-matched, resumable run needs: exact counts of the completion tokens it
generates and trains on, the per-step reward curve, the generation budget (a cap on the generation that could
overshoot it, a stop when it is spent, a learning-rate schedule over its tokens), all carried in every checkpoint's
trainer_state.json so a resumed run reports and stops like an uninterrupted one."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ckptdpo.grpo.budget import budget_spent, generation_cap, lr_factor
from ckptdpo.train.trainer import AlreadyAtMaxSteps

log = logging.getLogger(__name__)

PROGRESS_KEY = "ckptdpo_grpo_progress"
# Per-step sums over every rank: generated tokens and completions, trained tokens (prompt + completion tokens the
# policy's forward and backward passes saw), rewarded and skipped completions, the reward total, capped generations;
# and this rank's seconds generating and verifying.
_SUMS = ("generated_tokens", "completions", "trained_tokens", "scored", "skipped", "reward_sum", "capped",
         "generation_s", "reward_s")  # fmt: skip


@dataclass
class GRPOProgress:
    """What GRPO generated, trained and earned, per optimizer step; the pending sums of the step under way."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0))

    @property
    def generated_tokens(self) -> int:
        """Every completion token generated so far, the step under way included."""
        return int(sum(s["generated_tokens"] for s in self.steps) + self.pending["generated_tokens"])

    def add(self, **sums: float) -> None:
        for k, v in sums.items():
            self.pending[k] += v

    def close_step(self, step: int) -> dict[str, Any]:
        """Record the finished step (its sums and the curve's figures); the pending sums start again."""
        p = self.pending
        record = {
            "step": step,
            "generated_tokens": int(p["generated_tokens"]),
            "completions": int(p["completions"]),
            "trained_tokens": int(p["trained_tokens"]),
            "reward_mean": p["reward_sum"] / p["scored"] if p["scored"] else None,
            "skipped_share": p["skipped"] / (p["scored"] + p["skipped"]) if p["scored"] + p["skipped"] else None,
            "completion_length": p["generated_tokens"] / p["completions"] if p["completions"] else None,
            "scored": int(p["scored"]),
            "skipped": int(p["skipped"]),
            "capped": int(p["capped"]),
            "generation_s": round(p["generation_s"], 3),
            "reward_s": round(p["reward_s"], 3),
        }
        self.steps = [s for s in self.steps if s["step"] < step] + [record]
        self.pending = dict.fromkeys(_SUMS, 0)
        return record

    def to_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    @classmethod
    def from_trainer_state(cls, state: dict[str, Any]) -> GRPOProgress:
        saved = (state.get("stateful_callbacks") or {}).get(PROGRESS_KEY) or {}
        step = int(state.get("global_step") or 0)
        return cls(steps=[dict(s) for s in saved.get("steps", []) if s["step"] <= step])


def grpo_trainer_class(budget: int | None, schedule: dict[str, Any]) -> type:
    """GRPOTrainer counting what it generates and trains on, spending at most `budget` generated tokens.

    `schedule` (lr_scheduler_type, warmup_ratio, min_lr_rate) shapes the learning rate over the budget's tokens when
    there is a budget: the run stops when the budget is spent, so a schedule over steps would never finish.
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from trl import GRPOTrainer

    class BudgetedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, progress: GRPOProgress | None = None, **kwargs):
            self.progress = progress if progress is not None else GRPOProgress()
            self.budget = budget
            super().__init__(*args, **kwargs)

        def _global_sum(self, *values: float) -> list[float]:
            local = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
            return self.accelerator.reduce(local, reduction="sum").tolist()

        def _set_max_new_tokens(self, n: int) -> None:
            if self.use_vllm:
                self.vllm_generation.max_completion_length = n
            else:
                self.generation_config.max_new_tokens = n
                self.generation_kwargs["max_new_tokens"] = n

        def _generate(self, prompts):
            training = self.model.training
            cap = None
            if training and self.budget is not None:
                completions = len(prompts) * self.accelerator.num_processes
                cap = generation_cap(
                    self.budget - self.progress.generated_tokens, completions, self.max_completion_length
                )
            if cap is not None:
                log.info("generation budget: this generation is capped at %d new tokens per completion", cap)
                self._set_max_new_tokens(cap)
            started = time.perf_counter()
            try:
                out = super()._generate(prompts)
            finally:
                if cap is not None:
                    self._set_max_new_tokens(self.max_completion_length)
            if training:
                completion_ids = out[1]
                tokens, count = self._global_sum(sum(len(ids) for ids in completion_ids), len(completion_ids))
                seconds = time.perf_counter() - started
                self.progress.add(generated_tokens=tokens, completions=count, capped=int(cap is not None))
                self.progress.add(generation_s=seconds)
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            started = time.perf_counter()
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.model.training:  # gathered over every rank already
                self.progress.add(reward_s=time.perf_counter() - started)
                summed = rewards.sum(dim=1)
                skipped = torch.isnan(rewards).all(dim=1)
                scored = summed[~skipped]
                self.progress.add(scored=len(scored), skipped=int(skipped.sum()), reward_sum=float(scored.sum()))
            return rewards

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training:
                # Prompt and completion tokens the policy's forward and backward passes see (padding and masked-out
                # truncated completions excluded), this rank; summed over ranks when the step closes.
                seen = int(inputs["prompt_mask"].sum()) + int(inputs["completion_mask"].sum())
                self.progress.pending["trained_tokens"] += seen
            return super().compute_loss(model, inputs, *args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.budget is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)

            def factor(_step: int) -> float:
                return lr_factor(self.progress.generated_tokens / self.budget, **schedule)

            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, factor)
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def _save_checkpoint(self, model, trial):
            # In trainer_state.json, written last: a checkpoint that exists carries the figures up to its step.
            self.state.stateful_callbacks[PROGRESS_KEY] = self.progress.to_state()
            super()._save_checkpoint(model, trial)

    return BudgetedGRPOTrainer


def build_progress_callback(trainer_ref: dict[str, Any]) -> Any:
    """The callback that closes each step's figures (trained tokens summed over ranks) and stops training when the
    budget is spent; `trainer_ref["trainer"]` is set once the trainer exists."""
    from transformers import TrainerCallback

    class BudgetStop(TrainerCallback):
        def __init__(self) -> None:
            self.steps_run = 0
            self.stopped_by_budget = False

        def on_train_begin(self, args, state, control, **kwargs):
            # After the checkpoint is loaded: a resumed run whose budget or max_steps is already spent trains nothing.
            trainer = trainer_ref["trainer"]
            spent = trainer.budget is not None and _spent(trainer, args)
            if spent or (state.max_steps > 0 and state.global_step >= state.max_steps):
                self.stopped_by_budget = spent
                raise AlreadyAtMaxSteps(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            trainer = trainer_ref["trainer"]
            (trained,) = trainer._global_sum(trainer.progress.pending["trained_tokens"])
            trainer.progress.pending["trained_tokens"] = trained
            record = trainer.progress.close_step(state.global_step)
            log.info(
                "step %d: %d tokens generated (%d in all of %s), reward %s, skipped %s",
                state.global_step,
                record["generated_tokens"],
                trainer.progress.generated_tokens,
                trainer.budget,
                _fmt(record["reward_mean"]),
                _fmt(record["skipped_share"]),
            )
            if trainer.budget is not None and _spent(trainer, args):
                self.stopped_by_budget = True
                control.should_training_stop = True

    return BudgetStop()


def _spent(trainer: Any, args: Any) -> bool:
    return budget_spent(trainer.progress.generated_tokens, trainer.budget, args.generation_batch_size)


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
