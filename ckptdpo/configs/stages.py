"""One validated config model per stage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ckptdpo.configs.backend import BackendConfig
from ckptdpo.configs.base import (
    MAX_COUNT,
    MAX_PROCESSES,
    MAX_SAMPLES,
    MAX_SHARD_ITEMS,
    MAX_SHARD_TOKENS,
    MAX_TOKENS,
    Unused,
    _Config,
    recipe_error,
)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _vllm_temperature(value: float, n: int | None = None, n_field: str = "") -> float:
    """Refuse at recipe load the temperatures `vllm serve` refuses per request (so no stage fails on them later)."""
    if value > 2:
        raise ValueError("must be at most 2 (vLLM refuses temperatures above 2)")
    if value == 0 and n is not None and n > 1:
        raise ValueError(
            f"0 decodes greedily, so {n_field}: {n} would be {n} copies of one sample (vLLM refuses n > 1 at "
            f"temperature 0); set it above 0 or {n_field}: 1"
        )
    return value


def temperature_check(n_field: str | None = None, field: str = "temperature"):
    """The validator of a config's sampling temperature, whose requests ask for `n_field` samples each (vLLM's n)."""

    def check(cls, v: float, info: ValidationInfo) -> float:
        return _vllm_temperature(v, info.data.get(n_field) if n_field else None, n_field or "")

    return field_validator(field)(check)


def check_shard_text(shard_size: int, num_samples: int, max_tokens: int) -> None:
    """Refuse a shard whose planned text is absurd: one shard task holds shard_size x num_samples samples of up to
    max_tokens tokens, so memory follows the shard, never the whole stage, only while this stays bounded."""
    tokens = shard_size * num_samples * max_tokens
    if tokens > MAX_SHARD_TOKENS:
        fit = max(1, MAX_SHARD_TOKENS // (num_samples * max_tokens))
        raise recipe_error(
            f"one shard would hold {{at}}shard_size x {{at}}num_samples x {{at}}max_tokens = {tokens:,} tokens of "
            f"text (at most {MAX_SHARD_TOKENS:,}); set {{at}}shard_size to {fit} or less"
        )


class ProblemsConfig(_Config):
    """Where the problems come from."""

    source: Literal["demo", "file", "hf", "humaneval", "mbpp", "livecodebench", "gpqa", "arc"] = Field(
        "demo",
        description="demo generator, a local file, a HF dataset (math); humaneval, mbpp, livecodebench (code); "
        "gpqa, arc (multiple choice)",
    )
    kind: Literal["math", "code", "choice"] | None = Field(
        None, description="task kind; follows from the source (code and choice sources), else math"
    )
    path: str | None = Field(None, description="JSONL/Parquet file, HF dataset name or local dataset directory")
    split: str = Field("train", description="dataset split for source=hf")
    subset: str | None = Field(None, description="dataset config name for source=hf (e.g. 'main' for openai/gsm8k)")
    id_field: str | None = Field("id", description="column holding a stable id; content hash when absent")
    problem_field: str = Field("problem", description="column holding the problem text")
    answer_field: str = Field("answer", description="column holding the gold answer")
    answer_format: Literal["plain", "gsm8k"] = Field("plain", description="gsm8k: gold is the text after '####'")
    limit: int | None = Field(None, ge=1, description="keep only the first N problems")
    skip_invalid: bool = Field(False, description="count and skip rows with a missing problem or answer")
    num_problems: int = Field(64, ge=1, le=MAX_COUNT, description="demo generator: number of problems")
    seed: int = Field(0, description="demo generator seed")
    demo_mix: dict[int, float] | None = Field(None, description="demo generator: level (1-5) -> weight; calibrated")
    shuffle_choices: bool = Field(True, description="choice sources: shuffle the choices (seeded by seed and id)")

    @field_validator("demo_mix")
    @classmethod
    def _mix_levels(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is not None and (any(k not in range(1, 6) or w < 0 for k, w in v.items()) or sum(v.values()) <= 0):
            raise ValueError("demo_mix must map levels 1-5 to weights >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> ProblemsConfig:
        if self.source in ("file", "hf", "mbpp", "gpqa", "arc") and not self.path:
            raise ValueError(f"problems.path is required when problems.source is {self.source!r}")
        implied = _SOURCE_KINDS.get(self.source, "math")
        if self.kind is None:
            object.__setattr__(self, "kind", implied)
        elif self.kind != implied:
            raise ValueError(f"problems.kind {self.kind!r} does not fit source {self.source!r} (it is {implied!r})")
        return self


_SOURCE_KINDS = {"humaneval": "code", "mbpp": "code", "livecodebench": "code", "gpqa": "choice", "arc": "choice"}
_TABLE_FIELDS = {"path", "id_field", "problem_field", "answer_field", "answer_format", "limit", "skip_invalid"}
# The settings each problem source reads (besides source and kind); any other one set to a value would do nothing.
SOURCE_SETTINGS: dict[str, set[str]] = {
    "demo": {"num_problems", "seed", "demo_mix", "limit"},
    "file": _TABLE_FIELDS,
    "hf": _TABLE_FIELDS | {"split", "subset"},
    "humaneval": {"path", "limit"},
    "mbpp": {"path", "split", "limit"},
    "livecodebench": {"path", "subset", "limit"},
    "gpqa": {"path", "seed", "shuffle_choices", "limit"},
    "arc": {"path", "seed", "shuffle_choices", "limit"},
}
ProblemsConfig.UNUSED = tuple(
    Unused("source", source, tuple(n for n in ProblemsConfig.model_fields if n not in {*read, "source", "kind"}),
           ", which never reads it", "set {at}source to one that reads it (file or hf for {at}path), or remove NAME")
    for source, read in SOURCE_SETTINGS.items()
)  # fmt: skip


class FewShotExample(_Config):
    """One worked example shown before every problem, as an earlier user/assistant exchange of the chat."""

    problem: str = Field(..., min_length=1, description="the example's problem (the instruction is appended)")
    solution: str = Field(..., min_length=1, description="the assistant's worked solution, ending in \\boxed{}")


class GenerateConfig(_Config):
    """Sampling trajectories from the policy."""

    num_samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="samples per problem (vLLM's n)")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(-1, description="-1 disables top-k")
    max_tokens: int = Field(32768, ge=1, le=MAX_TOKENS, description="max new tokens per sample")
    seed: int = Field(0, description="base seed; per-request seeds derive from it and the content")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    shard_size: int = Field(256, ge=1, le=MAX_SHARD_ITEMS, description="problems per shard (one task run per shard)")
    few_shot: list[FewShotExample] = Field(
        default_factory=list, description="worked examples shown before each problem (chat turns); none by default"
    )

    def few_shot_pairs(self) -> list[tuple[str, str]]:
        """The worked examples as (problem, solution) pairs, for `ckptdpo.backends.base.problem_messages`."""
        return [(e.problem, e.solution) for e in self.few_shot]

    _temperature = temperature_check("num_samples")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("must not contain an empty string (vLLM refuses one)")
        return v

    @model_validator(mode="after")
    def _planned_shard(self) -> GenerateConfig:
        check_shard_text(self.shard_size, self.num_samples, self.max_tokens)
        return self


class VerifyConfig(_Config):
    """Answer extraction and math-verify in a killable process pool."""

    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per item")
    workers: int | None = Field(None, ge=1, le=MAX_PROCESSES, description="worker processes; default: CPU count")
    answer_format: Literal["boxed", "boxed_or_final_statement"] = Field(
        "boxed_or_final_statement",
        description="boxed: only the last \\boxed{} counts; boxed_or_final_statement: else an explicit final "
        "statement at the end ('the answer is X'); every verdict records which in extracted_from",
    )


class CheckpointConfig(_Config):
    """Checkpoint location inside trajectories."""

    markers: list[str] = Field(default_factory=lambda: ["Wait", "Alternatively", "But"])

    @field_validator("markers")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() or m != m.strip() for m in v):
            raise ValueError("markers must be a non-empty list of words without surrounding spaces")
        return v


class ResampleConfig(_Config):
    """Resampling from checkpoints into r2w / w2r pairs."""

    policy: Literal["seed", "uniform", "all", "decile", "front", "value"] = Field(
        "seed",
        description="checkpoint schedule; value: where the values stage's estimates say (the critical region, the "
        "widest intervals), the seed schedule for a trajectory without values",
    )
    r2w: bool = Field(True, description="build Right-to-Wrong pairs from correct trajectories")
    w2r: bool = Field(True, description="build Wrong-to-Right pairs from wrong trajectories")
    max_rounds: int = Field(3, ge=1, le=MAX_COUNT, description="resampling rounds")
    token_budget: int | None = Field(None, ge=1, description="stop after this many generated tokens in total")
    max_attempts: int = Field(
        8, ge=1, le=MAX_SAMPLES, description="draws per (trajectory, checkpoint) over all rounds"
    )
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(32768, ge=1, le=MAX_TOKENS, description="max new tokens per continuation")
    seed: int = Field(1, description="base seed for continuations")
    max_pair_tokens: int | None = Field(None, ge=1, description="drop pairs whose prompt+longer side exceed this")
    prefer_fitting_prefixes: bool = Field(True, description="skip checkpoints whose prefix cannot fit a pair")
    max_length_ratio: float | None = Field(None, gt=1, description="drop pairs with chosen/rejected token ratio over")

    # A checkpoint's draws are one request with n = its draws (up to max_attempts).
    _temperature = temperature_check("max_attempts")

    @model_validator(mode="after")
    def _builds_pairs(self) -> ResampleConfig:
        if not (self.r2w or self.w2r):
            raise recipe_error("{at}r2w and {at}w2r are both false, so resampling would build nothing; enable one")
        return self

    @model_validator(mode="before")
    @classmethod
    def _drop_dead_shard_size(cls, data: Any) -> Any:
        # Resample shards follow the generate shards; `shard_size` here was never read. Older recipes that set it
        # still load, and it no longer enters the cache key.
        if isinstance(data, dict) and "shard_size" in data:
            data = {k: v for k, v in data.items() if k != "shard_size"}
        return data


class JudgeConfig(_Config):
    """The judge LLM used by DTO pruning."""

    backend: BackendConfig | None = Field(None, description="judge backend; default: the policy backend")
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0)
    max_segments: int = Field(64, ge=1, le=MAX_COUNT, description="judge at most this many segments per trajectory")
    max_context_chars: int = Field(8000, ge=0, description="preceding reasoning shown to the judge (its tail)")
    reply_format: Literal["json", "yes_no"] = Field(
        "json", description="json: three yes/no keys in one object; yes_no: one word, for small judges"
    )

    _temperature = temperature_check()


class DTOConfig(_Config):
    """Dynamic Thinking pattern Optimization: exit probing, truncation, judge pruning."""

    probe: Literal["sample", "likelihood"] = Field("likelihood", description="how to estimate exit probability")
    threshold: float = Field(0.5, ge=0, le=1, description="exit at the first checkpoint at or above this")
    probe_samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="probe=sample: continuations per checkpoint")
    probe_max_tokens: int = Field(32, ge=1, le=MAX_TOKENS)
    probe_temperature: float = Field(0.6, ge=0, description="probe=sample: sampling temperature")
    probe_top_p: float = Field(0.95, gt=0, le=1, description="probe=sample: nucleus sampling")
    max_probes: int = Field(
        64, ge=1, le=MAX_COUNT, description="probe at most this many positions per trajectory (spread)"
    )
    seed: int = Field(2, description="base seed for sampled probes")
    min_checkpoints: int = Field(2, ge=0, description="use paragraph breaks when fewer checkpoints than this")
    exit_must_shorten: bool = Field(
        False, description="no exit where closing the text there (exit sentence + answer) would not shorten it"
    )
    prune: bool = Field(True, description="run judge pruning after truncation")
    prune_without_exit: bool = Field(
        False, description="also judge-prune trajectories with no exit (kept only if the pruned text still verifies)"
    )
    on_reverify_fail: Literal["truncated", "drop"] = Field("truncated", description="pruned text fails: fall back")
    rejected: Literal["longest", "longest_correct"] = Field("longest", description="rejected side of DTO pairs")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    _temperature = temperature_check("probe_samples", "probe_temperature")

    UNUSED = (
        Unused("probe", "likelihood", ("probe_samples", "probe_max_tokens", "probe_temperature", "probe_top_p",
               "seed"), " (it scores the answer, samples nothing)", "set {at}probe: sample to sample, or remove NAME"),
        Unused("prune", False, ("judge", "prune_without_exit", "on_reverify_fail"), " (no judge runs)",
               "set {at}prune: true to prune with the judge, or remove NAME"),
    )  # fmt: skip


class TrainingRun(_Config):
    """What the training stages share (train, grpo): LoRA, precision, and where and how the job is launched."""

    SECTION: ClassVar[str] = "train"
    lora: bool = Field(False, description="train a LoRA adapter (merged into the saved model) instead of all weights")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field("all-linear")
    gradient_checkpointing: bool = Field(False)
    bf16: bool = Field(False)
    accelerate_config: str | None = Field(None, description="accelerate config file (GPU); none: python/torchrun")
    num_processes: int = Field(
        1, ge=1, le=MAX_PROCESSES, description="processes per machine (GPUs, or CPU ranks under torchrun)"
    )
    num_machines: int = Field(1, ge=1, description="machines (nodes) taking part; each runs the job with its rank")
    machine_rank: int = Field(0, ge=0, description="this machine's rank, 0 .. num_machines-1 (0 is the main one)")
    main_process_ip: str | None = Field(None, description="address of machine 0, reachable from every machine")
    main_process_port: int = Field(29500, ge=1, le=65535, description="rendezvous port on machine 0")
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage when not launched by accelerate")
    save_steps: int = Field(50, ge=1, description="a checkpoint every this many steps (a retry resumes from it)")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept in the output directory")
    logging_steps: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_launch(self) -> TrainingRun:
        at = self.SECTION
        if self.accelerate_config and self.zero_stage:
            raise ValueError(
                f"{at}.zero_stage must be 0 when {at}.accelerate_config is set (the accelerate config carries the "
                "DeepSpeed settings)"
            )
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"{at}.machine_rank {self.machine_rank} must be below {at}.num_machines")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(f"{at}.num_machines > 1 needs {at}.main_process_ip (the address of machine 0)")
        return self

    UNUSED = (
        Unused("lora", False, ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), "",
               "set {at}lora: true to train an adapter, or remove NAME"),
    )  # fmt: skip


class TrainConfig(TrainingRun):
    """TRL DPO / SimPO training on pair shards."""

    loss: Literal["dpo", "simpo"] = Field("dpo", description="dpo: TRL DPOTrainer; simpo: CPOTrainer simpo")
    loss_type: str = Field("sigmoid", description="DPOTrainer loss_type (sigmoid, ipo, hinge, ...); loss=dpo only")
    pair_types: list[Literal["r2w", "w2r", "critical", "dto"]] = Field(default_factory=lambda: ["r2w", "w2r"])
    beta: float = Field(0.1, gt=0)
    gamma_beta_ratio: float = Field(0.5, ge=0, description="SimPO gamma/beta; TRL gets simpo_gamma=ratio*beta")
    learning_rate: float = Field(5e-7, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: epochs decide")
    per_device_train_batch_size: int = Field(1, ge=1, le=MAX_SAMPLES)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(
        4096, ge=8, le=MAX_TOKENS, description="tokens of prompt + longer completion; never silently cut"
    )
    max_prompt_length: int | None = Field(
        None,
        ge=8,
        le=MAX_TOKENS,
        description="tokens of the prompt (problem + prefix); longer prompts are cut by `truncation`",
    )
    truncation: Literal["keep_problem_and_end", "keep_end", "drop"] = Field(
        "keep_problem_and_end",
        description="a prompt over its limit (max_prompt_length, or what max_length leaves after the longer "
        "completion): keep_problem_and_end keeps the problem and the end of the prefix next to the checkpoint with "
        "a marker where text was cut; keep_end cuts the start of the prompt; drop drops the pair (all counted)",
    )
    prefix_sharing: bool = Field(
        True,
        description="one sequence [prompt | chosen | rejected] per pair, so the prompt is computed once for the "
        "policy and once for the reference (same log-probs); models that cannot take the mask train as before",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of problems held out (split by problem_id)")
    seed: int = Field(0)
    precompute_ref_log_probs: bool = Field(False, description="dpo: reference log-probs computed once, up front")
    use_liger_kernel: bool = Field(
        False, description="GPU: Liger's layer kernels (RMSNorm, RoPE, SwiGLU); TRL 1.16 has no Liger DPO loss"
    )
    group_by_length: bool = Field(False, description="batch pairs of similar length together, so less is padding")
    save_optimizer_at_end: bool = Field(
        False, description="also write a full checkpoint (optimizer state) at the last step, to continue training"
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> TrainConfig:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"train.max_prompt_length {self.max_prompt_length} must be below train.max_length {self.max_length}"
            )
        return self

    UNUSED = TrainingRun.UNUSED + (
        Unused("loss", "simpo", ("loss_type", "precompute_ref_log_probs"), " (no reference model)",
               "set {at}loss: dpo to use it, or remove NAME"),
        Unused("loss", "dpo", ("gamma_beta_ratio",), "", "set {at}loss: simpo to use it, or remove NAME"),
    )  # fmt: skip


class EvalConfig(_Config):
    """Benchmarks: n samples per problem, pass@k, cons@k, tokens, efficiency."""

    benchmarks: dict[str, ProblemsConfig] = Field(
        default_factory=dict, description="name -> problem source; empty: held-out demo problems (demo recipes)"
    )
    models: list[str] = Field(
        default_factory=lambda: ["base", "trained", "grpo"],
        description="'base', 'trained' (the DPO model), 'grpo' (the cost-matched GRPO baseline), a path or "
        "'name=path'; the first is the reference for eta and AES",
    )
    backends: dict[str, BackendConfig] = Field(
        default_factory=dict, description="model name -> its whole backend config, when not the recipe's backend"
    )
    num_samples: int = Field(16, ge=1, le=MAX_SAMPLES, description="samples per problem")
    k: list[int] = Field(default_factory=lambda: [1, 4, 8, 16], description="pass@k / cons@k; k > num_samples skipped")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(32768, ge=1, le=MAX_TOKENS)
    seed: int = Field(1234)
    shard_size: int = Field(64, ge=1, le=MAX_SHARD_ITEMS, description="problems per eval shard")
    exclude_training_problems: bool = Field(True, description="drop benchmark problems the run trained on")
    aes_alpha: float = Field(1.0, ge=0, description="AES weight of the relative length reduction")
    aes_beta: float = Field(3.0, ge=0, description="AES weight of a relative accuracy gain")
    aes_gamma: float = Field(5.0, ge=0, description="AES weight of a relative accuracy drop")
    code_wall_s: float = Field(20.0, gt=0, description="code benchmarks: wall-clock limit per candidate (all tests)")
    code_cpu_s: int = Field(10, ge=1, description="code benchmarks: CPU-time limit per candidate")
    code_memory_mb: int = Field(1024, ge=64, description="code benchmarks: address-space limit per candidate")
    code_max_processes: int = Field(32, ge=1, description="code benchmarks: processes and threads per candidate")
    allow_unsandboxed: bool = Field(
        False, description="run model-written code even where no network/mount isolation is possible (limits only)"
    )

    _temperature = temperature_check("num_samples")

    @field_validator("benchmarks")
    @classmethod
    def _benchmark_names(cls, v: dict[str, ProblemsConfig]) -> dict[str, ProblemsConfig]:
        bad = [name for name in v if not _SAFE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"benchmark names {bad} must be letters, digits, '.', '_' or '-' (they name directories)")
        return v

    @field_validator("k")
    @classmethod
    def _positive_k(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("k must be a non-empty list of integers >= 1")
        return sorted(set(v))

    @model_validator(mode="after")
    def _model_names(self) -> EvalConfig:
        names = [eval_model_name(m) for m in self.models]
        bad = [n for n in names if not _SAFE_NAME.fullmatch(n) or n.startswith("_")]
        if bad:
            raise ValueError(f"model names {bad} must be letters, digits, '.', '_' or '-'; use 'name=path' entries")
        if len(set(names)) != len(names):
            raise ValueError(f"models name the same model twice ({names}); give them distinct 'name=path' names")
        unknown = sorted(set(self.backends) - set(names))
        if unknown:
            raise ValueError(f"backends names models {unknown} that are not in models {names}")
        check_shard_text(self.shard_size, self.num_samples, self.max_tokens)
        return self


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def eval_model_name(entry: str) -> str:
    """The name of an `eval.models` entry: 'base', 'trained', the part before '=', or the path's last component."""
    if "=" in entry:
        return entry.split("=", 1)[0].strip()
    if entry in ("base", "trained", "grpo"):
        return entry
    return Path(entry.rstrip("/")).name or entry


class RefreshConfig(_Config):
    """The (nightly) incremental refresh: when it also trains."""

    train_threshold: int | None = Field(
        None, ge=1, description="train once this many new pairs (of train.pair_types) arrived since the last training"
    )
    train_deployment: str | None = Field(
        None, description="'flow/deployment' to trigger for training (e.g. 'stage/train'); none: train in the refresh"
    )


class FailureBudgetConfig(_Config):
    """How many failed rows a stage tolerates after its retries (default none); never part of a cache key.

    Tolerated failures are listed in the stage's manifest and retried on the next run, so none is forgotten.
    """

    generate: int = Field(0, ge=0, description="problems whose generation request failed")
    resample: int = Field(0, ge=0, description="continuation requests that failed, per shard and round")
    dto: int = Field(0, ge=0, description="exit probes that failed, per shard")
    eval: int = Field(0, ge=0, description="eval problems whose generation request failed, per shard")
    judge_unparsed_share: float = Field(
        0.5, ge=0, le=1, description="share of judge replies that may be unparseable before the DTO stage fails"
    )


class TaskRunnerConfig(_Config):
    """Where shard tasks run: threads in the flow's process, or a Dask or Ray cluster (never part of a cache key)."""

    kind: Literal["thread", "dask", "ray"] = Field(
        "thread", description="thread, dask (prefect-dask), ray (prefect-ray)"
    )
    address: str | None = Field(
        None, description="dask: 'tcp://host:8786'; ray: 'ray://host:10001' or 'auto'; none: a local cluster per flow"
    )
    max_workers: int | None = Field(
        None, ge=1, le=MAX_SHARD_ITEMS, description="thread: pool size; dask without address: local workers"
    )
    max_in_flight: int = Field(
        2, ge=1, le=MAX_SHARD_ITEMS, description="shard tasks submitted at once per stage; each holds one shard"
    )
    retries: int = Field(2, ge=0, description="retries of a failed shard task (after the backend's own retries)")
    retry_delay_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0], description="delay before each retry of a shard task (last one repeats)"
    )
    task_timeout_s: float | None = Field(None, gt=0, description="wall-clock limit of one shard task; none: no limit")

    UNUSED = (
        Unused(
            "kind", "thread", ("address",), " (no cluster)", "set {at}kind: dask or ray to reach one, or remove NAME"
        ),
        Unused("kind", "ray", ("max_workers",), " (Ray sizes its own workers)", "remove NAME"),
    )


# --- the cost-matched GRPO baseline ---------------------------------------------------------------------------------


class GRPOConfig(TrainingRun):
    """GRPO (TRL GRPOTrainer) from the same base model on the run's own problems, rewarded by the run's verifier and
    stopped when it has generated as many completion tokens as the factory did to make its pairs.

    The algorithm's defaults are open-r1's GRPO recipe for DeepSeek-R1-Distill-Qwen-1.5B
    (huggingface/open-r1, recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/config_demo.yaml): learning rate 1e-6, a cosine
    schedule down to 10% after 10% warm-up, 1,024-token completions, 16 prompts x 16 accumulation steps per device,
    seed 42; TRL 1.16's defaults for what the recipe leaves (loss dapo, beta 0, epsilon 0.2, temperature 1). The
    recipe samples 7 completions per prompt because it trains on 7 GPUs (16 x 16 x 7 is divisible by 7); 8 here keeps
    the generation batch divisible on any number of processes. bf16 and gradient checkpointing are the GPU recipe's
    choice (off by default, like `train`).
    """

    SECTION: ClassVar[str] = "grpo"

    generation_budget: Literal["match"] | int | None = Field(
        "match",
        description="stop when GRPO has generated this many completion tokens; 'match': what the factory generated "
        "(generate + resample + values + DTO probes, from stats.json); none: steps or epochs decide",
    )
    num_generations: int = Field(
        8, ge=2, le=MAX_SAMPLES, description="completions per prompt (the group); TRL's num_generations"
    )
    max_completion_length: int = Field(
        1024, ge=1, le=MAX_TOKENS, description="max new tokens per completion; a cut one gets 0"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the completions")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="TRL's loss_type (how token losses are aggregated)"
    )
    beta: float = Field(0.0, ge=0, description="KL coefficient; 0 loads no reference model (DeepSeek-R1: 0.001)")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip bound (DAPO's clip-higher); none: epsilon")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantages divided by the group's std (group), the batch's (batch) or not (none)"
    )
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut at max_completion_length out of the loss (DAPO)"
    )
    num_iterations: int = Field(
        1, ge=1, le=MAX_COUNT, description="optimization passes over each generation batch (mu)"
    )
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler_type: Literal["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine_with_min_lr",
        description="learning-rate schedule; with a generation budget it runs over the budget's tokens, not steps",
    )
    min_lr_rate: float = Field(0.1, ge=0, le=1, description="cosine_with_min_lr: final rate / peak rate")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the schedule (budget or steps) in warm-up")
    max_steps: int = Field(-1, description="-1: the budget decides (else num_train_epochs); > 0: at most this many")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the problems when there is no budget")
    per_device_train_batch_size: int = Field(
        16, ge=1, le=MAX_SAMPLES, description="completions per device and micro-batch"
    )
    gradient_accumulation_steps: int = Field(16, ge=1, le=MAX_COUNT)
    seed: int = Field(42)
    use_vllm: bool = Field(False, description="generate with vLLM (GPU); off: transformers' generate in the trainer")
    vllm_mode: Literal["server", "colocate"] = Field(
        "server", description="server: a `trl vllm-serve` process on its own GPUs; colocate: vLLM in the trainer"
    )
    vllm_server_base_url: str | None = Field(None, description="server mode: its URL; none: host and port")
    vllm_server_host: str = Field("0.0.0.0", description="server mode: host of `trl vllm-serve`")
    vllm_server_port: int = Field(8000, ge=1, le=65535, description="server mode: port of `trl vllm-serve`")
    vllm_server_timeout: float = Field(240.0, gt=0, description="server mode: seconds to wait for the server")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate mode: vLLM's share of the GPU")

    @field_validator("generation_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        if v is None or v == "match" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be 'match', a number of tokens >= 1, or null (no budget)")

    _temperature = temperature_check()

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        batch *= self.num_processes * self.num_machines
        if batch % self.num_generations:
            raise ValueError(
                f"the generation batch (grpo.per_device_train_batch_size x gradient_accumulation_steps x processes = "
                f"{batch}) must be a multiple of grpo.num_generations ({self.num_generations}): it holds whole groups"
            )
        return self


class ValuesConfig(_Config):
    """Checkpoint values: the share of continuations from a checkpoint that verify, and the first checkpoint below
    a threshold (the step holding the first error), found by bisection or by probing every checkpoint."""

    rollouts: int = Field(
        8, ge=1, le=MAX_SAMPLES, description="continuations per probed checkpoint (one request, vLLM's n)"
    )
    search: Literal["binary", "exhaustive"] = Field(
        "binary",
        description="binary: bisect for the first checkpoint below threshold (about log2(n) + 1 probes, values "
        "taken as non-increasing); exhaustive: probe every checkpoint",
    )
    threshold: float = Field(0.5, gt=0, le=1, description="a checkpoint whose value is below this is bad")
    trajectories: Literal["incorrect", "correct", "all"] = Field(
        "all",
        description="which trajectories to probe: incorrect (verdict incorrect or no_answer), correct, or both; "
        "timeout and error verdicts never",
    )
    max_rollouts_per_trajectory: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT * MAX_SAMPLES,
        description="stop a trajectory's search once its next probe would pass this; none: no cap",
    )
    max_tokens: int = Field(
        32768, ge=1, le=MAX_TOKENS, description="max new tokens per continuation; one cut there never verifies"
    )
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = Field(3, description="base seed; each probe's seed derives from it, the sample and the checkpoint")
    critical_pairs: bool = Field(True, description="build `critical` pairs at each wrong trajectory's first error")
    max_pair_tokens: int | None = Field(None, ge=1, description="drop critical pairs whose prompt+longer side exceed")
    max_length_ratio: float | None = Field(
        None, gt=1, description="drop critical pairs with a chosen/rejected token ratio over this"
    )

    _temperature = temperature_check("rollouts")

    @model_validator(mode="after")
    def _cap_fits_a_probe(self) -> ValuesConfig:
        cap = self.max_rollouts_per_trajectory
        if cap is not None and cap < self.rollouts:
            raise ValueError(
                f"values.max_rollouts_per_trajectory {cap} is below values.rollouts {self.rollouts}, so no checkpoint "
                "could be probed; raise it or lower rollouts"
            )
        return self


class StageSections(_Config):
    """One recipe section per pipeline stage, in pipeline order.

    The stage names a recipe's `stages` may list, and the order the pipeline runs them in, are these fields: adding a
    stage is adding its config class above and its field here (the stage registry in tasks/ finds its spec by name).
    """

    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    values: ValuesConfig = Field(default_factory=ValuesConfig)
    resample: ResampleConfig = Field(default_factory=ResampleConfig)
    dto: DTOConfig = Field(default_factory=DTOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


STAGES = tuple(StageSections.model_fields)
