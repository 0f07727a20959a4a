"""The TRL trainer with what a resumable, measured run needs: token and padding counts that travel in the
checkpoints, length-grouped batches, a stop at max_steps on resume, and the fault injection the resume tests use."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from ckptdpo.train.job import FAULT_EXIT_CODE, TrainJob
from ckptdpo.train.progress import TOKEN_COUNTS_KEY, TokenCounts

log = logging.getLogger(__name__)


class AlreadyAtMaxSteps(Exception):
    """Raised at train begin when the resumed checkpoint already holds the last step."""


def pair_lengths(dataset: Any) -> list[int]:
    """Padded length of each tokenized pair: prompt plus the longer completion (DPO) or the longer sequence (CPO)."""
    cols = dataset.column_names
    if "chosen_ids" in cols:  # DPOTrainer keeps prompt and completions apart
        triples = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        return [len(p) + max(len(c), len(r)) for p, c, r in triples]
    pairs = zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
    return [max(len(c), len(r)) for c, r in pairs]


def trainer_class(base: type, job: TrainJob) -> type:
    """`base` (DPOTrainer or CPOTrainer) counting tokens per step, saving the counts with each checkpoint."""

    class CountingTrainer(base):
        def __init__(self, *args, token_counts: TokenCounts | None = None, **kwargs):
            self.token_counts = token_counts if token_counts is not None else TokenCounts()
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            self.token_counts.add_batch(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def _save_checkpoint(self, model, trial):
            # In trainer_state.json, written last: a checkpoint that exists carries the counts up to its step.
            self.state.stateful_callbacks[TOKEN_COUNTS_KEY] = self.token_counts.to_state()
            super()._save_checkpoint(model, trial)

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            if self.state.global_step == job.kill_in_save_step:
                log.error("fault injection: SIGKILL while checkpoint-%d is half written", self.state.global_step)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

        def _get_train_sampler(self, train_dataset=None):
            if not job.train.group_by_length:
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=pair_lengths(dataset))

    return CountingTrainer


def build_callbacks(job: TrainJob) -> tuple[Any, list]:
    """(step counter, callbacks): per-step token reduction, the stop at max_steps, the exit-after-save fault.

    The step counter needs the trainer (its accelerator and counts): set `counter.trainer` once it is built.
    """
    import torch
    from transformers import TrainerCallback

    class StepTokens(TrainerCallback):
        """Counts optimizer steps this process ran in this session and closes each step's token counts."""

        def __init__(self) -> None:
            self.steps_run = 0
            self.trainer: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            # Runs after the checkpoint is loaded. The Trainer would run one more step before it checks max_steps.
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise AlreadyAtMaxSteps(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            trainer = self.trainer
            counts = torch.tensor(trainer.token_counts.pending, dtype=torch.long, device=args.device)
            total = trainer.accelerator.reduce(counts, reduction="sum")
            trainer.token_counts.close_step(state.global_step, int(total[0]), int(total[1]))

    counter = StepTokens()
    callbacks: list = [counter]
    if job.fail_after_step is not None:
        callbacks.append(fail_after_save(job.fail_after_step))
    return counter, callbacks


def fail_after_save(step: int) -> Any:
    """Fault injection for resume tests: a callback that dies like a killed job once checkpoint-`step` is on disk."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    class FailAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()  # every rank has written its part of the checkpoint
                log.error("fault injection: exiting after saving checkpoint-%d", state.global_step)
                logging.shutdown()
                sys.stdout.flush()
                os._exit(FAULT_EXIT_CODE)

    return FailAfterSave()
