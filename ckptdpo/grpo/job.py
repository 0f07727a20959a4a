"""The GRPO job file: the recipe's `grpo` section plus everything the subprocess needs that lives elsewhere in the
recipe or the run directory (the problems, the worked examples, the verifier's settings, the resolved budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckptdpo.configs import EvalConfig, GRPOConfig, Recipe, VerifyConfig
from ckptdpo.configs.stages import FewShotExample
from ckptdpo.grpo.budget import factory_token_sources, resolve_generation_budget
from ckptdpo.shards import read_stats
from ckptdpo.train.job import load_job

STAGE = "grpo"
# The code-sandbox settings of the eval section that the reward's code verifier uses.
SANDBOX_FIELDS = ("code_wall_s", "code_cpu_s", "code_memory_mb", "code_max_processes", "allow_unsandboxed")


class GRPOJob(BaseModel):
    """One GRPO run: the grpo config plus where the problems, the base model and the outputs are."""

    model_config = ConfigDict(extra="forbid")

    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    problems_dir: str = Field(description="the run's finished problems stage (with _manifest.json)")
    kind: Literal["math", "code", "choice"] = Field("math", description="the problems' kind (problems.kind)")
    few_shot: list[FewShotExample] = Field(default_factory=list, description="generate.few_shot: worked examples")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="the run's verifier settings")
    sandbox: EvalConfig = Field(default_factory=EvalConfig, description="code problems: eval's sandbox settings")
    model: str = Field(description="local path of the base model (and its tokenizer)")
    output_dir: str = Field(description="checkpoints, model/, summary.json go here")
    generation_budget: int | None = Field(None, ge=1, description="the budget in tokens (grpo.generation_budget)")
    budget_sources: dict[str, int] = Field(
        default_factory=dict, description="'match': the factory's generated tokens per stage (for the summary)"
    )
    fail_after_step: int | None = Field(
        None, ge=1, description="testing: exit with status 75 right after the checkpoint of this step is saved"
    )


def build_grpo_job(
    recipe: Recipe, run_dir: str | Path, model: str, stats: dict[str, Any] | None = None, source: str = "stats.json"
) -> GRPOJob:
    """The job of a run's grpo stage, its budget resolved from `stats` (default: `<run_dir>/stats.json`).

    Raises UserError when the budget is 'match' and the factory has recorded no generated tokens."""
    stats = read_stats(run_dir) if stats is None else stats
    cfg = recipe.grpo
    budget = resolve_generation_budget(cfg.generation_budget, stats, source=source)
    return GRPOJob(
        grpo=cfg,
        problems_dir=str(Path(run_dir) / "problems"),
        kind=recipe.problems.kind or "math",
        few_shot=list(recipe.generate.few_shot),
        verify=recipe.verify,
        sandbox=EvalConfig(**{f: getattr(recipe.eval, f) for f in SANDBOX_FIELDS}),
        model=model,
        output_dir=str(Path(run_dir) / STAGE),
        generation_budget=budget,
        budget_sources=factory_token_sources(stats) if cfg.generation_budget == "match" else {},
    )


def load_grpo_job(path: str | Path) -> GRPOJob:
    """Read and validate a GRPO job YAML; problems are one UserError sentence."""
    return load_job(path, GRPOJob, "grpo")
