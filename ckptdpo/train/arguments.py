"""TRL trainer arguments from a TrainConfig: pure, so what the trainer gets can be checked without building one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptdpo.configs import TrainConfig
from ckptdpo.train.launch import deepspeed_config


def training_dtype(cfg: TrainConfig, *, deepspeed: bool) -> str:
    """The dtype the policy is loaded in: the one it trains in.

    bf16 under DeepSpeed: the engine keeps its own fp32 master copy in the optimizer and runs the model in bf16, so
    an fp32 load only doubles the load-time memory (and under ZeRO-3 the sharded weights). A LoRA base is frozen, so
    bf16 too. bf16 without DeepSpeed trains fp32 weights under autocast, so those load in fp32.
    """
    return "bfloat16" if cfg.bf16 and (deepspeed or cfg.lora) else "float32"


def reference_dtype(cfg: TrainConfig, *, deepspeed: bool) -> str | None:
    """The dtype to load DPO's reference model in when TRL's default (the policy's dtype) would waste memory.

    Without DeepSpeed, bf16 trains fp32 weights under autocast, and TRL loads the reference like the policy: twice
    the memory an inference-only copy needs, for the same bf16 matmuls. None when TRL's choice is right: DeepSpeed
    (bf16 already), LoRA (the reference is the base with the adapter off), precomputed log-probs (no reference held
    in training), fp32 training, SimPO (no reference).
    """
    holds_reference = cfg.loss == "dpo" and not cfg.lora and not cfg.precompute_ref_log_probs
    if holds_reference and cfg.bf16 and training_dtype(cfg, deepspeed=deepspeed) != "bfloat16":
        return "bfloat16"
    return None


def build_training_kwargs(cfg: TrainConfig, output_dir: str | Path, *, use_cpu: bool, liger: bool) -> dict[str, Any]:
    """Keyword arguments of DPOConfig / CPOConfig for this run (both take all of these)."""
    return dict(
        shared_training_kwargs(cfg, output_dir, use_cpu=use_cpu),
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        use_liger_kernel=liger,
        max_length=cfg.max_length,
        beta=cfg.beta,
    )


def shared_training_kwargs(cfg: Any, output_dir: str | Path, *, use_cpu: bool) -> dict[str, Any]:
    """The transformers TrainingArguments every ckptdpo trainer sets the same way, from a config with TrainConfig's
    batch, schedule, checkpoint, precision and launcher fields (TrainConfig, GRPOConfig)."""
    deepspeed = bool(cfg.zero_stage)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=cfg.bf16,
        fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        # DeepSpeed on CPU needs gloo named explicitly; plain DDP on CPU picks gloo by itself.
        ddp_backend="gloo" if use_cpu and deepspeed else None,
        deepspeed=deepspeed_config(cfg.zero_stage) if deepspeed else None,
        # An accelerate config with DeepSpeed is only known once the arguments exist: `make_arguments` fixes dtype.
        model_init_kwargs={"dtype": training_dtype(cfg, deepspeed=deepspeed), "device_map": None},
    )


def loss_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The loss-specific arguments: DPO's loss type and precompute, or CPOTrainer's SimPO settings."""
    if cfg.loss == "dpo":
        return dict(
            loss_type=[cfg.loss_type],
            precompute_ref_log_probs=cfg.precompute_ref_log_probs,
            include_num_input_tokens_seen="non_padding",
        )
    # TRL's simpo_gamma is the absolute target margin; SimPO's paper parametrizes it as gamma/beta.
    return dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.gamma_beta_ratio * cfg.beta)


def make_arguments(cfg: TrainConfig, kwargs: dict[str, Any]):
    """The TRL config object (DPOConfig or CPOConfig); creating it sets up the distributed state."""
    if cfg.loss == "dpo":
        from trl import DPOConfig as config_cls
    else:
        from trl.experimental.cpo import CPOConfig as config_cls
    args = config_cls(**kwargs, **loss_kwargs(cfg))
    deepspeed = args.deepspeed_plugin is not None
    args.model_init_kwargs = {**args.model_init_kwargs, "dtype": training_dtype(cfg, deepspeed=deepspeed)}
    return args


def build_peft_config(cfg: TrainConfig):
    """The LoRA config, or None for a full fine-tune."""
    if not cfg.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
