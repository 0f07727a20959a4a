"""One validated config model per stage; a recipe is YAML of these."""

from ckptdpo.configs.backend import (
    BACKEND_KINDS,
    BackendConfig,
    FakeBackendConfig,
    HFBackendConfig,
    OpenAIBackendConfig,
    VLLMBackendConfig,
    backend_config,
)
from ckptdpo.configs.base import ConfigError
from ckptdpo.configs.recipe import Recipe, describe_validation_error, parse_override
from ckptdpo.configs.stages import (
    INSTRUCTION,
    STAGES,
    CheckpointConfig,
    DTOConfig,
    EvalConfig,
    FailureBudgetConfig,
    GenerateConfig,
    JudgeConfig,
    ProblemsConfig,
    RefreshConfig,
    ResampleConfig,
    TaskRunnerConfig,
    TrainConfig,
    VerifyConfig,
    eval_model_name,
)

__all__ = [
    "BACKEND_KINDS",
    "INSTRUCTION",
    "STAGES",
    "BackendConfig",
    "CheckpointConfig",
    "ConfigError",
    "DTOConfig",
    "EvalConfig",
    "FailureBudgetConfig",
    "FakeBackendConfig",
    "GenerateConfig",
    "HFBackendConfig",
    "JudgeConfig",
    "OpenAIBackendConfig",
    "ProblemsConfig",
    "Recipe",
    "RefreshConfig",
    "ResampleConfig",
    "TaskRunnerConfig",
    "TrainConfig",
    "VLLMBackendConfig",
    "VerifyConfig",
    "backend_config",
    "describe_validation_error",
    "eval_model_name",
    "parse_override",
]
