"""The GRPO run, in the steps of TRL's `scripts/grpo.py`: load, build the dataset and the reward, build the
arguments and the trainer, train, save, summarize. Every rank runs all of it; rank 0 writes the summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ckptdpo.configs import GRPOConfig
from ckptdpo.errors import UserError
from ckptdpo.grpo.budget import step_bound
from ckptdpo.grpo.data import prompt_rows, read_problems
from ckptdpo.grpo.job import GRPOJob, load_grpo_job
from ckptdpo.grpo.reward import VerifierReward
from ckptdpo.grpo.trainer import GRPOProgress, build_progress_callback, grpo_trainer_class
from ckptdpo.train.arguments import build_peft_config, shared_training_kwargs, training_dtype
from ckptdpo.train.job import MODEL_DIR, SUMMARY
from ckptdpo.train.launch import build_launch_command, build_merge_command
from ckptdpo.train.progress import checkpoint_step, read_trainer_state
from ckptdpo.train.run import (
    _skip_deepspeed_shm_comm,
    _start_deepspeed_comm,
    _zero_stage,
    load_tokenizer,
    prepare_resume,
    run_entry,
    save_weights,
    train,
)
from ckptdpo.train.run import make_parser as make_job_parser
from ckptdpo.train.trainer import fail_after_save

log = logging.getLogger(__name__)
MODULE = "ckptdpo.grpo"
MODULE_PROG = f"python -m {MODULE}"


def build_grpo_launch_command(job_path: str | Path, cfg: GRPOConfig, *, python: str = sys.executable) -> list[str]:
    """`python -m ckptdpo.grpo --config JOB` under the launcher cfg asks for (python, torchrun, accelerate launch)."""
    return build_launch_command(job_path, cfg, python=python, module=MODULE)


def build_grpo_merge_command(job_path: str | Path, *, python: str = sys.executable) -> list[str]:
    """After a LoRA run: fold the adapter into `model/`, in one plain process."""
    return build_merge_command(job_path, python=python, module=MODULE)


def generation_cycle(cfg: GRPOConfig) -> int:
    """Optimizer steps per generation: TRL generates every steps_per_generation x num_iterations micro-batches, and
    steps_per_generation is gradient_accumulation_steps here, so every num_iterations steps."""
    return cfg.num_iterations


# GRPOConfig fields that TRL's GRPOConfig has under the same name and meaning, passed through as they are.
PASSED_THROUGH = (
    "num_generations", "max_completion_length", "temperature", "top_p", "loss_type", "beta", "epsilon",
    "epsilon_high", "scale_rewards", "mask_truncated_completions", "num_iterations", "use_vllm", "vllm_mode",
    "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    "vllm_gpu_memory_utilization",
)  # fmt: skip


def build_grpo_kwargs(job: GRPOJob, *, use_cpu: bool, world_size: int) -> dict[str, Any]:
    """Keyword arguments of TRL's GRPOConfig for this run (pure, so what the trainer gets can be checked)."""
    cfg, budget = job.grpo, job.generation_budget
    kwargs = shared_training_kwargs(cfg, job.output_dir, use_cpu=use_cpu)
    kwargs.update(cfg.model_dump(include=set(PASSED_THROUGH)), log_completions=False)
    if budget is not None and cfg.max_steps <= 0:
        completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
        kwargs["max_steps"] = step_bound(budget, completions, generation_cycle(cfg))
    if budget is None:  # a schedule over steps; with a budget the trainer runs it over the budget's tokens
        kwargs.update(lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio)
        if cfg.lr_scheduler_type == "cosine_with_min_lr":
            kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": cfg.min_lr_rate}
    return kwargs


def make_grpo_arguments(job: GRPOJob, kwargs: dict[str, Any]):
    """TRL's GRPOConfig (creating it sets up the distributed state), with the policy's dtype fixed for DeepSpeed."""
    from trl import GRPOConfig as TRLGRPOConfig

    args = TRLGRPOConfig(**kwargs)
    deepspeed = args.deepspeed_plugin is not None
    args.model_init_kwargs = {**args.model_init_kwargs, "dtype": training_dtype(job.grpo, deepspeed=deepspeed)}
    return args


def build_dataset(job: GRPOJob, args: Any):
    """The prompts of the run's problems; at least one generation batch's worth of distinct problems."""
    from datasets import Dataset

    rows = prompt_rows(read_problems(job.problems_dir), job.kind, [(e.problem, e.solution) for e in job.few_shot])
    needed = args.generation_batch_size // job.grpo.num_generations
    if len(rows) < needed:
        raise UserError(
            f"{job.problems_dir}: {len(rows)} problems, but one GRPO generation batch takes {needed} distinct "
            "prompts; lower grpo.per_device_train_batch_size or gradient_accumulation_steps, or raise num_generations."
        )
    return Dataset.from_list(rows)


def build_grpo_trainer(job: GRPOJob, args: Any, dataset: Any, tokenizer: Any, resume_state: dict):
    """The budgeted GRPOTrainer, its reward the run's verifier, its figures continued from the checkpoint."""
    cfg = job.grpo
    schedule = {"kind": cfg.lr_scheduler_type, "warmup_ratio": cfg.warmup_ratio, "min_lr_rate": cfg.min_lr_rate}
    ref: dict[str, Any] = {}
    stop = build_progress_callback(ref)
    callbacks: list = [stop]
    if job.fail_after_step is not None:
        callbacks.append(fail_after_save(job.fail_after_step))
    reward = VerifierReward(job.verify, job.sandbox, end_ids=[])
    trainer = grpo_trainer_class(job.generation_budget, schedule)(
        model=job.model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(cfg),
        callbacks=callbacks,
        progress=GRPOProgress.from_trainer_state(resume_state),
    )
    # What ends a completion is known once the trainer read the model's generation config (TRL's own test).
    reward.end_ids = frozenset([*trainer.eos_token_ids, tokenizer.pad_token_id])
    ref["trainer"] = trainer
    return trainer, stop


def summarize_grpo(job: GRPOJob, trainer: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the run's summary (also of the steps before a resume), written to summary.json."""
    from ckptdpo.shards import atomic_write_bytes

    cfg, out, args = job.grpo, Path(job.output_dir), trainer.args
    state = dataclasses.asdict(trainer.state)
    logged = {e["step"]: e for e in state.get("log_history", []) if "loss" in e and "step" in e}
    steps = [
        {
            **s,
            "loss": logged.get(s["step"], {}).get("loss"),
            "learning_rate": logged.get(s["step"], {}).get("learning_rate"),
        }
        for s in trainer.progress.steps
    ]
    generated = sum(s["generated_tokens"] for s in steps)
    budget = job.generation_budget
    start = facts["start_step"]
    summary = {
        "method": "grpo",
        "model": job.model,
        "model_dir": str(out / MODEL_DIR),
        "lora": cfg.lora,
        "merged": not cfg.lora,
        "loss_type": cfg.loss_type,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "completions_per_step": args.generation_batch_size,
        "use_vllm": cfg.use_vllm,
        "vllm_mode": cfg.vllm_mode if cfg.use_vllm else None,
        "zero_stage": _zero_stage(trainer),
        "world_size": args.world_size,
        "generation_budget": budget,
        "budget_setting": cfg.generation_budget,
        "budget_sources": job.budget_sources,
        "generated_tokens": generated,
        "budget_share": generated / budget if budget else None,
        "trained_tokens": sum(s["trained_tokens"] for s in steps),
        "completions": sum(s["completions"] for s in steps),
        "skipped_completions": sum(s["skipped"] for s in steps),
        "capped_generations": sum(s["capped"] for s in steps),
        "stopped_by": facts["stopped_by"],
        "global_step": int(state.get("global_step") or 0),
        "start_step": start,
        "steps_run": int(state.get("global_step") or 0) - start,
        "resumed_from": facts["resumed_from"],
        "final_loss": next((s["loss"] for s in reversed(steps) if s["loss"] is not None), None),
        "steps": steps,
        "startup_s": facts["startup_s"],
        "train_runtime_s": facts["runtime"],
        "save_s": facts["save_s"],
        "wall_time_s": time.monotonic() - facts["started"],
    }
    atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
    log.info(
        "GRPO to step %d (from %d): %d of %s budget tokens generated, %d trained; summary at %s",
        summary["global_step"],
        start,
        generated,
        budget,
        summary["trained_tokens"],
        out / SUMMARY,
    )
    return summary


def run_grpo_job(job: GRPOJob, *, started: float) -> dict[str, Any] | None:
    """Train; every rank returns, rank 0 returns the summary (also written to output_dir/summary.json)."""
    import datasets
    import torch
    import transformers

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    use_cpu = not torch.cuda.is_available()
    # load
    tokenizer = load_tokenizer(job.model)
    tokenizer.padding_side = "left"  # GRPO pads prompts on the left
    # build arguments (this also starts the distributed state), then the dataset and the trainer
    if use_cpu:
        _skip_deepspeed_shm_comm()
    world = job.grpo.num_processes * job.grpo.num_machines
    args = make_grpo_arguments(job, build_grpo_kwargs(job, use_cpu=use_cpu, world_size=world))
    if use_cpu and args.deepspeed_plugin is not None:
        _start_deepspeed_comm()
    if args.process_index != 0:
        transformers.logging.set_verbosity_warning()
    dataset = build_dataset(job, args)
    resume = prepare_resume(out, args)
    trainer, stop = build_grpo_trainer(job, args, dataset, tokenizer, read_trainer_state(resume))
    # train, save
    trained_from = time.monotonic()
    runtime = train(trainer, resume)
    saving_from = time.monotonic()
    save_weights(trainer, out, lora=job.grpo.lora, args=args)
    trainer.accelerator.wait_for_everyone()
    save_s = time.monotonic() - saving_from
    if not args.should_save:
        return None
    # summarize
    if stop.stopped_by_budget:
        stopped_by = "budget"
    elif trainer.state.global_step >= args.max_steps > 0:
        stopped_by = "max_steps"
    else:
        stopped_by = "epochs"
    facts = {
        "resumed_from": resume.name if resume else None,
        "start_step": checkpoint_step(resume) if resume else 0,
        "runtime": runtime,
        "startup_s": trained_from - started,
        "save_s": save_s,
        "stopped_by": stopped_by,
        "started": started,
    }
    return summarize_grpo(job, trainer, facts)


def make_parser() -> argparse.ArgumentParser:
    return make_job_parser(MODULE_PROG, "GRPO baseline on a run's problems (TRL).", "GRPO job YAML (a GRPOJob)")


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, make_parser(), load_grpo_job, run_grpo_job)
