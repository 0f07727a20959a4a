"""Backend configs: one model per kind, joined as a union discriminated on `kind`, so a field of one kind (a vLLM
engine setting on an hf backend, say) is an unknown key rather than silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter

from ckptdpo.configs.base import MAX_PROCESSES, MAX_SAMPLES, MAX_TOKENS, _Config


class _BackendBase(_Config):
    """What every backend has: which model, its revision, and the loop guard."""

    model: str = Field("demo", description="local path, 'demo', or a Hugging Face hub id")
    revision: str | None = Field(None, description="model revision (part of every cache key)")
    loop_guard: bool = Field(True, description="stop a sample that repeats a paragraph or n-gram")
    loop_min_repeats: int = Field(4, ge=2, description="loop guard: repeats of a paragraph that count as a loop")
    loop_ngram: int = Field(32, ge=4, description="loop guard: n-gram size in tokens for the n-gram check")


class HFBackendConfig(_BackendBase):
    """transformers in this process (CPU or one GPU): the demo's backend."""

    kind: Literal["hf"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype")
    device: str = Field("auto", description="'cpu', 'cuda', or 'auto'")
    batch_token_budget: int = Field(16384, ge=1, le=64 * MAX_TOKENS, description="max prompt+new tokens per batch")
    max_batch_size: int = Field(16, ge=1, le=MAX_SAMPLES, description="max sequences per forward batch")
    threads: int | None = Field(
        None, ge=1, le=MAX_PROCESSES, description="torch intra-op threads on CPU (default: torch's)"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length override")
    compile: bool = Field(
        False,
        description="decode on a static KV cache through torch.compile (CUDA graphs on a GPU); the first batch of "
        "each shape pays the compilation, and a model that cannot be compiled decodes without it",
    )


class VLLMBackendConfig(_BackendBase):
    """vLLM's engine in this process (vllm==0.22.1: the newest next to Prefect; newer ones: `vllm serve` + openai)."""

    kind: Literal["vllm"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype")
    max_model_len: int | None = Field(None, ge=1, description="context length override")
    tensor_parallel_size: int = Field(1, ge=1, description="tensor parallel size")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory to use")
    enable_prefix_caching: bool = Field(True, description="automatic prefix caching")


class OpenAIBackendConfig(_BackendBase):
    """Any OpenAI-compatible server (`vllm serve`, SGLang, TGI, `transformers serve`); also the DTO judge."""

    kind: Literal["openai"] = "openai"
    base_urls: list[str] = Field(default_factory=list, description="endpoints ending in /v1, sticky by trajectory")
    api_key_env: str | None = Field(None, description="name of the env variable holding the API key")
    max_concurrency: int = Field(8, ge=1, le=MAX_PROCESSES, description="concurrent requests")
    request_timeout_s: float = Field(600.0, gt=0, description="per request timeout")
    max_retries: int = Field(5, ge=0, le=100, description="retries on 429/5xx/timeouts")


class FakeBackendConfig(_BackendBase):
    """Scripted trajectories, for tests."""

    kind: Literal["fake"] = "fake"
    script: str | None = Field(None, description="path of a JSON/YAML script of trajectories")


def _default_kind(value: Any) -> Any:
    # Recipes written before the union omit `kind` for the hf backend; the discriminator needs it.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "hf"}
    return value


BackendConfig = Annotated[
    HFBackendConfig | VLLMBackendConfig | OpenAIBackendConfig | FakeBackendConfig,
    BeforeValidator(_default_kind),
    Field(discriminator="kind"),
]
BACKEND_CLASSES = {
    c.model_fields["kind"].default: c
    for c in (HFBackendConfig, VLLMBackendConfig, OpenAIBackendConfig, FakeBackendConfig)
}
BACKEND_KINDS = tuple(BACKEND_CLASSES)
_ADAPTER: TypeAdapter = TypeAdapter(BackendConfig)


def backend_config(
    data: dict[str, Any] | None = None, /, **fields: Any
) -> HFBackendConfig | VLLMBackendConfig | OpenAIBackendConfig | FakeBackendConfig:
    """A validated backend config from a mapping and/or keyword fields (`kind` defaults to hf)."""
    return _ADAPTER.validate_python({**(data or {}), **fields})
