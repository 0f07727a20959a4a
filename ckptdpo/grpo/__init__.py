"""The cost-matched GRPO baseline: `python -m ckptdpo.grpo --config JOB.yaml`.

TRL's GRPOTrainer from the run's base model on the run's own problems (the chat prompts the factory generated
from), rewarded by the run's verifier, stopped when it has generated as many completion tokens as the factory did to
make its pairs (`grpo.generation_budget: match`) or an explicit number. The job file is a `GRPOJob` (build it with
`build_grpo_job(recipe, run_dir, model)`); the launcher is the train stage's (`build_grpo_launch_command`: python,
torchrun or accelerate launch). Everything the run leaves lives in its output directory (`<run_dir>/grpo`):
`checkpoint-*` (a rerun resumes from the newest complete one), `model/` (safetensors and tokenizer; LoRA: `adapter/`,
merged into `model/` by `--merge`) and `summary.json` (rank 0, at the end): generated and trained tokens, the budget,
steps, start-up / training / saving seconds, and the reward curve per step (mean reward, share of skipped samples,
completion length).

Modules: `budget` (the factory's tokens, the cap and the stop, the schedule over tokens), `reward` (the verifier as
TRL's reward function), `data` (prompts from the problems stage), `job` (the job file), `trainer` (the budgeted
trainer and its per-step figures), `run` (the steps of a run and the entry point).
"""

from ckptdpo.grpo.budget import (
    FACTORY_SOURCES,
    budget_spent,
    factory_generated_tokens,
    factory_token_sources,
    generation_cap,
    lr_factor,
    resolve_generation_budget,
    step_bound,
)
from ckptdpo.grpo.data import prompt_rows, read_problems
from ckptdpo.grpo.job import STAGE, GRPOJob, build_grpo_job, load_grpo_job
from ckptdpo.grpo.reward import VerifierReward, finish_reason, reward_of, score_completions
from ckptdpo.grpo.run import (
    build_grpo_kwargs,
    build_grpo_launch_command,
    build_grpo_merge_command,
    main,
    make_parser,
    run_grpo_job,
)
from ckptdpo.grpo.trainer import GRPOProgress

__all__ = [
    "FACTORY_SOURCES",
    "STAGE",
    "GRPOJob",
    "GRPOProgress",
    "VerifierReward",
    "budget_spent",
    "build_grpo_job",
    "build_grpo_kwargs",
    "build_grpo_launch_command",
    "build_grpo_merge_command",
    "factory_generated_tokens",
    "factory_token_sources",
    "finish_reason",
    "generation_cap",
    "load_grpo_job",
    "lr_factor",
    "main",
    "make_parser",
    "prompt_rows",
    "read_problems",
    "resolve_generation_budget",
    "reward_of",
    "run_grpo_job",
    "score_completions",
    "step_bound",
]
