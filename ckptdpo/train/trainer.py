"""The TRL trainer with what a resumable, measured run needs: shared-prefix batches (`prefix`), token, padding and
timing counts that travel in the checkpoints, length-grouped batches, a stop at max_steps on resume, no optimizer
state in the final checkpoint unless asked, and the fault injection the resume tests use."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from ckptdpo.train.job import FAULT_EXIT_CODE, TrainJob
from ckptdpo.train.prefix import (
    POLICY_OUTPUTS,
    PrefixSharingCollator,
    install_packed_forward,
    sharing_problem,
)
from ckptdpo.train.progress import TOKEN_COUNTS_KEY, WORK_KEYS, TokenCounts

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
    """`base` (DPOTrainer or CPOTrainer) with shared-prefix batches, counting tokens per step, saving the counts
    with each checkpoint."""

    class CountingTrainer(base):
        def __init__(self, *args, token_counts: TokenCounts | None = None, **kwargs):
            self.token_counts = token_counts if token_counts is not None else TokenCounts()
            self.prefix_sharing: bool | None = None  # decided once the model exists (`_start_prefix_sharing`)
            self.prefix_sharing_off: str | None = None  # why not
            super().__init__(*args, **kwargs)
            self._start_prefix_sharing()

        def _start_prefix_sharing(self) -> bool:
            """Decide once whether pairs train as packed rows; if so, wrap the collator and the models' forwards.

            Called at the end of construction, or earlier by DPOTrainer's precompute of the reference log-probs,
            which runs inside its constructor (after the models and the collator exist).
            """
            if self.prefix_sharing is not None:
                return self.prefix_sharing
            self.prefix_sharing_off = self._prefix_sharing_problem()
            self.prefix_sharing = self.prefix_sharing_off is None
            if not self.prefix_sharing:
                if job.train.prefix_sharing:
                    log.warning("train.prefix_sharing: %s, so pairs train as two sequences.", self.prefix_sharing_off)
                return False
            if job.train.loss == "dpo":  # DPOTrainer's metrics and WPO weights read these per-token outputs
                outputs = POLICY_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ())
            else:
                outputs = ("log_probs", "mean_logits")
            install_packed_forward(self.model, outputs)
            if getattr(self, "ref_model", None) is not None:
                install_packed_forward(self.ref_model, ("log_probs",))
            self.data_collator = PrefixSharingCollator(self.data_collator, self.processing_class.pad_token_id)
            return True

        def _prefix_sharing_problem(self) -> str | None:
            if not job.train.prefix_sharing:
                return "off"
            if getattr(self, "_is_vision_dataset", False):
                return "vision batches are built from text on the fly"
            models = [self.model] + ([self.ref_model] if getattr(self, "ref_model", None) is not None else [])
            return next((p for p in map(sharing_problem, models) if p), None)

        def _precompute_ref_logps(self, *args, **kwargs):
            self._start_prefix_sharing()
            return super()._precompute_ref_logps(*args, **kwargs)

        def concatenated_forward(self, model, batch):
            # CPOTrainer's forward of both sides; DPOTrainer reads the packed outputs inside its own loss.
            if "packed" not in batch:
                return super().concatenated_forward(model, batch)
            return packed_cpo_forward(self, model, batch["packed"])

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


def packed_cpo_forward(trainer: Any, model: Any, packed: dict[str, Any]) -> tuple:
    """CPOTrainer's `concatenated_forward` outputs from one packed forward.

    Log-probabilities, their length normalization (SimPO, IPO) and the NLL term are the standard path's. The
    `logits/*` metrics average the mean logit over the scored tokens, where the standard path averages the full
    logits of every position (prompt and padding included): a logging difference only.
    """
    import torch

    out = model(packed=packed, fused_lm_head=True, use_cache=False)
    mask = packed["score_mask"]
    n = mask.shape[0] // 2
    logps = out.log_probs.sum(dim=-1)
    if trainer.loss_type in ("ipo", "simpo"):
        logps = logps / mask.sum(dim=-1)
    if trainer.cpo_alpha == 0:
        nll = torch.tensor(0.0, device=trainer.accelerator.device)
    else:
        nll = -out.log_probs[:n].sum() / mask[:n].sum()
    return logps[:n], logps[n:], out.mean_logits[:n][mask[:n]], out.mean_logits[n:][mask[n:]], nll


def build_callbacks(job: TrainJob) -> tuple[Any, list]:
    """(step counter, callbacks): per-step token reduction and timing, the stop at max_steps, no optimizer state at
    the end unless `train.save_optimizer_at_end`, the exit-after-save fault.

    The step counter needs the trainer (its accelerator and counts): set `counter.trainer` once it is built.
    """
    import torch
    from transformers import TrainerCallback

    class StepTokens(TrainerCallback):
        """Counts and times the optimizer steps this process ran in this session; closes each step's token counts.

        A step is timed from the end of the previous one's bookkeeping to the end of its optimizer step; logging and
        checkpoint saves are timed apart. The reduction of the counts waits for the device, so on a GPU a step's
        time is its compute, not the time to queue it.
        """

        def __init__(self) -> None:
            self.steps_run = 0
            self.trainer: Any = None
            self.train_began: float | None = None
            self.mark = self.cpu_mark = 0.0
            self.times = {"log_s": 0.0, "checkpoint_save_s": 0.0}

        def on_train_begin(self, args, state, control, **kwargs):
            # Runs after the checkpoint is loaded. The Trainer would run one more step before it checks max_steps.
            self.train_began = self.mark = time.monotonic()
            self.cpu_mark = time.process_time()
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise AlreadyAtMaxSteps(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            trainer = self.trainer
            counts = torch.tensor(trainer.token_counts.pending, dtype=torch.long, device=args.device)
            total = trainer.accelerator.reduce(counts, reduction="sum").tolist()
            now, cpu = time.monotonic(), time.process_time()
            # This process's CPU time too: on a shared machine it measures the work where wall time measures load.
            work = {**dict(zip(WORK_KEYS, total[2:], strict=True)), "seconds": now - self.mark}
            work["cpu_seconds"] = cpu - self.cpu_mark
            self.mark, self.cpu_mark = now, cpu
            trainer.token_counts.close_step(state.global_step, total[0], total[1], work)
            if args.should_log:
                log.info(
                    "step %d/%d: %.3f s, %d pairs, %d tokens, %d computed, %.0f tokens/s, %.0f computed tokens/s, "
                    "%.3f pairs/s",
                    state.global_step, state.max_steps, work["seconds"], work["pairs"], total[0],
                    work["computed_tokens"], total[0] / work["seconds"], work["computed_tokens"] / work["seconds"],
                    work["pairs"] / work["seconds"],
                )  # fmt: skip
            if state.global_step >= state.max_steps and not job.train.save_optimizer_at_end:
                # A finished run's optimizer state is of no use; `model/` is written after training.
                control.should_save = False

        def on_log(self, args, state, control, **kwargs):
            self._lap("log_s")

        def on_save(self, args, state, control, **kwargs):
            self._lap("checkpoint_save_s")

        def _lap(self, what: str) -> None:
            now = time.monotonic()
            self.times[what] += now - self.mark
            self.mark, self.cpu_mark = now, time.process_time()

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
