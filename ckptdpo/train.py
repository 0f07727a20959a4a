"""TRL DPO / SimPO training on pair shards: `python -m ckptdpo.train --config JOB.yaml`.

The job file is a `TrainJob`: the recipe's `train` section plus the pair stage directories, the base model's local
path and the output directory. Everything the run leaves lives in the output directory: `checkpoint-*` (a rerun
resumes from the newest complete one, so a Prefect retry continues), `model/` (safetensors and tokenizer),
`ranks/rank-N.json` (one per process that took part) and `summary.json` (written last, by rank 0).

Launching (`build_launch_command`):
- one process: `python -m ckptdpo.train --config JOB`;
- with `train.accelerate_config` (GPUs): `accelerate launch --config_file recipes/accelerate/zero2.yaml
  --num_processes N --mixed_precision bf16|no -m ckptdpo.train --config JOB` (zero3.yaml gathers 16-bit weights
  on save, so `model/` holds consolidated safetensors); mixed precision follows `train.bf16`, because transformers
  refuses a DeepSpeed config whose bf16 setting disagrees with its own;
- several processes without an accelerate config (the CPU path): `torchrun --standalone --nproc_per_node N
  -m ckptdpo.train --config JOB`, over gloo on CPU, with DeepSpeed ZeRO from `train.zero_stage`. accelerate's own
  MULTI_CPU launcher needs MPI (without it, it starts one process), hence torchrun here; `recipes/accelerate/
  cpu_multi.yaml` is the accelerate alternative (plain DDP). Without a GPU the processes run on CPU by themselves:
  `use_cpu` is set when no CUDA device is visible.

Pairs are fed to TRL as plain text: `prompt` already holds the chat-templated problem and the trajectory prefix. No
row is silently truncated: rows over `max_length` are dropped and counted (or, with `truncation: keep_end`, the
start of their prompt is cut, also counted). Rows whose prompt does not tokenize as a prefix of prompt + chosen and
prompt + rejected (BPE merges across the boundary, e.g. SmolLM2 encodes a prompt ending in "\\n\\n" as one token but
"\\n\\nWait" as three) get the boundary moved back to the nearest token boundary shared by both sides, moving the
same few characters to the front of both completions; rows where no such boundary exists are dropped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ckptdpo.configs import TrainConfig, describe_validation_error
from ckptdpo.errors import UserError

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["pair_id", "pair_type", "problem_id", "prompt", "chosen", "rejected"]
DROP_REASONS = ("empty", "identical", "prompt_not_prefix", "over_max_length")
MODEL_DIR = "model"
SUMMARY = "summary.json"
RANKS_DIR = "ranks"
TRAINER_STATE = "trainer_state.json"
# Exit status of the fault injected by `TrainJob.fail_after_step` (EX_TEMPFAIL: worth retrying).
FAULT_EXIT_CODE = 75
# Realignment tries at most this many earlier token boundaries before giving up on a row.
_MAX_REALIGN_TRIES = 8
_ENCODE_CHUNK = 256


class TrainJob(BaseModel):
    """One training run: the train config plus where the pairs, the base model and the outputs are."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=TrainConfig)
    pairs_dirs: list[str] = Field(min_length=1, description="completed pair stage directories (with _manifest.json)")
    model: str = Field(description="local path of the base model (and its tokenizer)")
    output_dir: str = Field(description="checkpoints, model/, ranks/ and summary.json go here")
    fail_after_step: int | None = Field(
        None, ge=1, description="testing: exit with status 75 right after the checkpoint of this step is saved"
    )


def load_job(path: str | Path) -> TrainJob:
    """Read and validate a job YAML; problems are one UserError sentence."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: train job file not found; pass the YAML written by the train task.") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the train job ({' '.join(str(e).split())}); fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a train job must be a YAML mapping, got {type(data).__name__}.")
    try:
        return TrainJob.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, str(path))) from None


def write_job(job: TrainJob, path: str | Path) -> Path:
    """Write a job YAML atomically, for the launcher to pass by path."""
    from ckptdpo.shards import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False).encode())
    return path


# --- pairs: selection, token-prefix alignment, length policy, split ----------------------------------------------


@dataclass
class _Enc:
    ids: list[int]
    offsets: list[tuple[int, int]] | None


def _encoder(tokenizer: Any, add_special_tokens: bool):
    """Batch encoder returning ids and character offsets (offsets only from fast tokenizers)."""
    with_offsets = bool(getattr(tokenizer, "is_fast", False))

    def encode(texts: list[str]) -> list[_Enc]:
        out = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
        offs = out["offset_mapping"] if with_offsets else [None] * len(texts)
        return [
            _Enc(list(ids), [tuple(o) for o in off] if off is not None else None)
            for ids, off in zip(out["input_ids"], offs, strict=True)
        ]

    return encode


def _is_prefix(short: list[int], full: list[int]) -> bool:
    return len(short) <= len(full) and full[: len(short)] == short


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _realign(encode, prompt: str, c: _Enc, r: _Enc) -> tuple[int, _Enc] | None:
    """The largest char index < len(prompt) ending a token shared by both full sequences whose prompt[:i] encodes
    as a prefix of both; None when there is none (or no offsets to find one)."""
    if c.offsets is None:
        return None
    common = _common_prefix(c.ids, r.ids)
    ends = sorted({e for s, e in c.offsets[:common] if s < e < len(prompt)}, reverse=True)
    for end in ends[:_MAX_REALIGN_TRIES]:
        (q,) = encode([prompt[:end]])
        if q.ids and _is_prefix(q.ids, c.ids) and _is_prefix(q.ids, r.ids):
            return end, q
    return None


def _cut_start(c: _Enc, prompt_len: int, k: int) -> int | None:
    """Char index where the prompt starts after dropping its first k tokens; None if the prompt is too short."""
    if c.offsets is None:
        return None
    starts = [s for s, e in c.offsets if s < e <= prompt_len]
    return starts[k] if 0 < k < len(starts) else None


def prepare_pairs(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Select pair types, append EOS, align the prompt to a token prefix and apply the length policy; count all.

    Returns (kept rows with `prompt`/`chosen`/`rejected` rewritten and `num_tokens` added, report). Token counts
    follow the trainer's own tokenization: DPOTrainer encodes with the tokenizer's special tokens, CPOTrainer
    without them and prepends BOS when the tokenizer has one and the prompt lacks it.
    """
    eos = tokenizer.eos_token
    if not eos:
        raise UserError("the model's tokenizer has no eos_token; set one in its tokenizer_config.json.")
    special = cfg.loss == "dpo"
    bos_id = getattr(tokenizer, "bos_token_id", None) if cfg.loss == "simpo" else None
    encode = _encoder(tokenizer, special)
    # A chat template that writes BOS itself (R1-Distill's does), encoded by a tokenizer that adds BOS too, would
    # start every sequence with two BOS tokens; the written one goes.
    written_bos = _added_bos(tokenizer) if special else None

    def extra(ids: list[int]) -> int:
        return 1 if bos_id is not None and (not ids or ids[0] != bos_id) else 0

    not_selected: Counter[str] = Counter()
    dropped: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
    counts = {"num_realigned": 0, "num_cut_keep_end": 0, "num_bos_deduplicated": 0}
    candidates = []
    for row in rows:
        if row["pair_type"] not in cfg.pair_types:
            not_selected[row["pair_type"]] += 1
        elif not row["prompt"] or not row["chosen"] or not row["rejected"]:
            dropped["empty"] += 1
        elif row["chosen"] == row["rejected"]:
            dropped["identical"] += 1
        else:
            chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
            rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
            if written_bos and row["prompt"].startswith(written_bos):
                row = {**row, "prompt": row["prompt"][len(written_bos) :]}
                counts["num_bos_deduplicated"] += 1
            candidates.append((row, chosen, rejected))

    kept: list[dict] = []
    for start in range(0, len(candidates), _ENCODE_CHUNK):
        chunk = candidates[start : start + _ENCODE_CHUNK]
        texts = []
        for row, chosen, rejected in chunk:
            texts += [row["prompt"], row["prompt"] + chosen, row["prompt"] + rejected]
        encs = encode(texts)
        for i, (row, chosen, rejected) in enumerate(chunk):
            p, c, r = encs[3 * i : 3 * i + 3]
            prompt = row["prompt"]
            realigned = cut = False
            reason = "over_max_length"
            for _ in range(4):
                if p is None:
                    p, c, r = encode([prompt, prompt + chosen, prompt + rejected])
                if not (_is_prefix(p.ids, c.ids) and _is_prefix(p.ids, r.ids)):
                    found = _realign(encode, prompt, c, r)
                    if found is None:
                        reason = "prompt_not_prefix"
                        break
                    end, p = found
                    # prompt + chosen is the same text as before, so c and r stay valid.
                    chosen, rejected, prompt = prompt[end:] + chosen, prompt[end:] + rejected, prompt[:end]
                    realigned = True
                longest = max(len(c.ids) + extra(c.ids), len(r.ids) + extra(r.ids))
                if longest <= cfg.max_length:
                    reason = None
                    break
                if cfg.truncation == "drop":
                    break
                new_start = _cut_start(c, len(prompt), longest - cfg.max_length)
                if new_start is None:
                    break
                prompt, p, cut = prompt[new_start:], None, True
            if reason is not None:
                dropped[reason] += 1
                continue
            counts["num_realigned"] += realigned
            counts["num_cut_keep_end"] += cut
            kept.append(
                {
                    "pair_id": row["pair_id"],
                    "pair_type": row["pair_type"],
                    "problem_id": row["problem_id"],
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "num_tokens": len(c.ids) + extra(c.ids) + len(r.ids) + extra(r.ids),
                }
            )
    report = {
        "num_pairs_total": len(rows),
        "num_pairs_selected": len(rows) - sum(not_selected.values()),
        "num_pairs_used": len(kept),
        "num_dropped": sum(dropped.values()),
        "dropped": dict(dropped),
        "not_selected": dict(not_selected),
        **counts,
    }
    return kept, report


def _added_bos(tokenizer: Any) -> str | None:
    """The BOS text when encoding with special tokens prepends BOS, else None."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos_id else None


def split_pairs(rows: Sequence[dict[str, Any]], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split by a hash of problem_id, so pairs of one problem never straddle the split."""
    train, evals = [], []
    for row in rows:
        h = int(hashlib.sha256(row["problem_id"].encode()).hexdigest()[:12], 16) / float(1 << 48)
        (evals if h < eval_fraction else train).append(row)
    return train, evals


def read_pairs(pairs_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """All pair rows of the given completed stages (refuses a stage without a manifest)."""
    from ckptdpo.shards import read_stage

    rows: list[dict[str, Any]] = []
    for d in pairs_dirs:
        if not Path(d).is_dir():
            raise UserError(f"{d}: pair stage directory not found; run the stage that writes the pairs first.")
        rows += read_stage(d, columns=PAIR_COLUMNS).to_pylist()
    return rows


# --- checkpoints and summary ---------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete `checkpoint-N` (trainer_state.json is written last, so it marks completeness)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / TRAINER_STATE).is_file()]
    done = [p for p in done if _checkpoint_step(p) >= 0]
    return max(done, key=_checkpoint_step) if done else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete checkpoint dirs a killed run left without trainer_state.json, so nothing resumes from them."""
    removed = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.is_dir() and not (p / TRAINER_STATE).is_file():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def summarize_steps(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step loss, reward margin and accuracy from a Trainer's log_history (training entries only)."""
    steps = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        steps.append(
            {
                "step": entry["step"],
                "loss": entry["loss"],
                "rewards_margins": entry.get("rewards/margins"),
                "rewards_accuracies": entry.get("rewards/accuracies"),
                "learning_rate": entry.get("learning_rate"),
            }
        )
    return steps


def deepspeed_config(zero_stage: int) -> dict[str, Any]:
    """A DeepSpeed config for torchrun launches; 'auto' values are filled by transformers from the trainer args."""
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # The trainer's torch AdamW is fine under ZeRO-2/3; DeepSpeed only lists its own optimizers as tested.
        "zero_allow_untested_optimizer": True,
    }


def build_launch_command(job_path: str | Path, cfg: TrainConfig, *, python: str = sys.executable) -> list[str]:
    """The command that runs one training job: plain python, accelerate launch (GPUs) or torchrun (CPU ranks)."""
    entry = ["-m", "ckptdpo.train", "--config", str(job_path)]
    if cfg.accelerate_config:
        launch = [python, "-m", "accelerate.commands.launch", "--config_file", cfg.accelerate_config]
        procs = ["--num_processes", str(cfg.num_processes), "--mixed_precision", "bf16" if cfg.bf16 else "no"]
        return [*launch, *procs, *entry]
    if cfg.num_processes > 1:
        # --standalone: a private rendezvous on a free port, so concurrent jobs on one host do not collide.
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(cfg.num_processes),
            *entry,
        ]
    return [python, *entry]


# --- the run -------------------------------------------------------------------------------------------------------


def _trainer_callbacks(job: TrainJob):
    import torch.distributed as dist
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        """Counts optimizer steps this process ran in this session (resumed steps excluded)."""

        def __init__(self) -> None:
            self.steps_run = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1

    class FailAfterSave(TrainerCallback):
        """Fault injection for resume tests: die like a killed job once a given checkpoint is on disk."""

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == job.fail_after_step:
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()  # every rank has written its part of the checkpoint
                log.error("fault injection: exiting after saving checkpoint-%d", state.global_step)
                logging.shutdown()
                sys.stdout.flush()
                os._exit(FAULT_EXIT_CODE)

    counter = StepCounter()
    callbacks = [counter]
    if job.fail_after_step is not None:
        callbacks.append(FailAfterSave())
    return counter, callbacks


def _tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return int(state.get("num_input_tokens_seen") or 0)


def run_job(job: TrainJob, *, started: float) -> dict[str, Any] | None:
    """Train; every rank returns, rank 0 returns the summary (also written to output_dir/summary.json)."""
    import datasets
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptdpo.shards import atomic_write_bytes

    cfg = job.train
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    use_cpu = not torch.cuda.is_available()

    try:
        tokenizer = AutoTokenizer.from_pretrained(job.model)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model {job.model}: cannot load its tokenizer ({e}); set backend.model to a model directory."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    rows = read_pairs(job.pairs_dirs)
    kept, report = prepare_pairs(rows, tokenizer, cfg)
    train_rows, eval_rows = split_pairs(kept, cfg.eval_fraction)
    report.update(num_train=len(train_rows), num_eval=len(eval_rows))
    if not train_rows:
        raise UserError(
            f"{', '.join(job.pairs_dirs)}: no usable training pairs ({json.dumps(report, sort_keys=True)}); "
            "check train.pair_types, train.max_length and train.eval_fraction."
        )

    def to_dataset(items: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list([{k: x[k] for k in ("prompt", "chosen", "rejected")} for x in items])

    train_ds = to_dataset(train_rows)
    eval_ds = to_dataset(eval_rows) if eval_rows else None

    liger = cfg.use_liger_kernel
    if liger:
        import importlib.util

        # Liger's kernels are Triton (GPU) kernels.
        if use_cpu or importlib.util.find_spec("liger_kernel") is None:
            log.warning("train.use_liger_kernel: liger-kernel is not installed or there is no GPU; training without")
            liger = False

    # Base weights in float32 (mixed precision keeps fp32 masters); a LoRA base in bf16 when bf16 is on.
    dtype = "bfloat16" if (cfg.bf16 and cfg.lora) else "float32"
    common: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
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
        use_liger_kernel=liger,
        max_length=cfg.max_length,
        beta=cfg.beta,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        # DeepSpeed on CPU needs gloo named explicitly; plain DDP on CPU picks gloo by itself.
        ddp_backend="gloo" if use_cpu and cfg.zero_stage else None,
        deepspeed=deepspeed_config(cfg.zero_stage) if cfg.zero_stage else None,
        model_init_kwargs={"dtype": dtype, "device_map": None},
    )
    if use_cpu:
        _skip_deepspeed_shm_comm()
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    counter, callbacks = _trainer_callbacks(job)
    if cfg.loss == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **common,
            loss_type=[cfg.loss_type],
            precompute_ref_log_probs=cfg.precompute_ref_log_probs,
            include_num_input_tokens_seen="non_padding",
        )
        trainer_cls = DPOTrainer
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        # TRL's simpo_gamma is the absolute target margin; SimPO's paper parametrizes it as gamma/beta.
        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.gamma_beta_ratio * cfg.beta)
        trainer_cls = CPOTrainer
    trainer = trainer_cls(
        model=job.model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

    rank, world_size = args.process_index, args.world_size
    if rank != 0:
        transformers.logging.set_verbosity_warning()
    if args.should_save:
        removed = remove_incomplete_checkpoints(out)
        if removed:
            log.warning("removed incomplete checkpoints: %s", ", ".join(removed))
        shutil.rmtree(out / RANKS_DIR, ignore_errors=True)  # rank files of an earlier run
    trainer.accelerator.wait_for_everyone()
    resume = latest_checkpoint(out)
    start_step = _checkpoint_step(resume) if resume else 0
    if resume is not None:
        log.info("resuming from %s (step %d)", resume.name, start_step)

    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}

    model_dir = out / MODEL_DIR
    if cfg.lora:
        adapter_dir = out / "adapter"
        trainer.save_model(str(adapter_dir))
        if args.should_save:
            _merge_adapter(job.model, adapter_dir, model_dir, tokenizer, AutoModelForCausalLM)
    else:
        # Collective under ZeRO-3 (gathers the 16-bit weights), so every rank calls it; rank 0 writes.
        trainer.save_model(str(model_dir))
    if args.should_save and not any(model_dir.glob("*.safetensors")):
        raise RuntimeError(
            f"{model_dir}: no safetensors were written; with ZeRO-3 set stage3_gather_16bit_weights_on_model_save."
        )

    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0
    zero3 = zero_stage == 3
    rank_info = {
        "rank": rank,
        "local_rank": args.local_process_index,
        "world_size": world_size,
        "pid": os.getpid(),
        "device": str(args.device),
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "deepspeed": trainer.is_deepspeed_enabled,
        "steps_run": counter.steps_run,
        # Replicated parameters must agree across ranks after a synchronized step (not under ZeRO-3 sharding).
        "param_checksum": None
        if zero3
        else float(sum(p.detach().double().sum().item() for p in trainer.model.parameters())),
    }
    atomic_write_bytes(out / RANKS_DIR / f"rank-{rank}.json", json.dumps(rank_info, indent=2).encode())
    trainer.accelerator.wait_for_everyone()
    if not args.should_save:
        return None

    state = trainer.state
    runtime = float(train_output.metrics.get("train_runtime") or 0.0)
    if cfg.loss == "dpo":
        tokens = int(state.num_input_tokens_seen) - _tokens_at(resume)
        estimated = False
    else:
        # CPOTrainer's batches carry no input_ids the Trainer could count: estimate from the pairs' token counts.
        mean_pair = sum(x["num_tokens"] for x in train_rows) / len(train_rows)
        pairs_seen = counter.steps_run * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
        tokens, estimated = int(mean_pair * pairs_seen), True
    steps = summarize_steps(state.log_history)
    ranks = sorted((json.loads(p.read_text()) for p in (out / RANKS_DIR).glob("rank-*.json")), key=lambda r: r["rank"])
    summary = {
        "loss": cfg.loss,
        "loss_type": cfg.loss_type if cfg.loss == "dpo" else "simpo",
        "model": job.model,
        "model_dir": str(model_dir),
        "lora": cfg.lora,
        "zero_stage": zero_stage,
        "world_size": world_size,
        "ranks": ranks,
        "global_step": state.global_step,
        "start_step": start_step,
        "resumed_from": resume.name if resume else None,
        "steps_run": counter.steps_run,
        "final_loss": steps[-1]["loss"] if steps else None,
        "steps": steps,
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, int | float)},
        "pairs": report,
        "tokens": tokens,
        "tokens_estimated": estimated,
        "train_runtime_s": runtime,
        "tokens_per_s": tokens / runtime if runtime > 0 else None,
        "wall_time_s": time.monotonic() - started,
    }
    atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
    log.info(
        "trained %d steps (from %d), final loss %s, %.0f tokens/s; summary at %s",
        state.global_step,
        start_step,
        summary["final_loss"],
        summary["tokens_per_s"] or 0.0,
        out / SUMMARY,
    )
    return summary


def _skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory allreduce op; it then uses gloo collectives.

    The op is a C++ extension built on first use (minutes on a small machine, per fresh cache), while CPU runs
    are smoke tests and small models where gloo's allreduce is fast enough. DeepSpeed reads this table when its
    comm backend starts, and keeps edits to it.
    """
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _merge_adapter(base: str, adapter_dir: Path, model_dir: Path, tokenizer: Any, auto_cls: Any) -> None:
    """Fold the LoRA adapter into a float32 copy of the base model and save that as the trained model."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(auto_cls.from_pretrained(base, dtype="float32"), str(adapter_dir))
    merged = merged.merge_and_unload()
    merged.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ckptdpo.train", description="DPO / SimPO on pair shards (TRL).")
    p.add_argument("--config", required=True, help="train job YAML (a TrainJob)")
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pid %(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        run_job(load_job(args.config), started=started)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
