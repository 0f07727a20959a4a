"""The training run, in the steps TRL's `scripts/dpo.py` takes: load, build datasets, build arguments, build the
trainer, train, save, summarize. Every rank runs all of it; rank 0 writes the summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ckptdpo.errors import UserError
from ckptdpo.train.arguments import build_peft_config, build_training_kwargs, make_arguments, reference_dtype
from ckptdpo.train.job import ADAPTER_DIR, DATA_DIR, MODEL_DIR, RANKS_DIR, SUMMARY, TrainJob, load_job
from ckptdpo.train.pairs import build_pair_rows, dataset_dir, materialize_dataset, read_pairs
from ckptdpo.train.progress import (
    TokenCounts,
    checkpoint_step,
    latest_checkpoint,
    read_trainer_state,
    remove_incomplete_checkpoints,
    summarize_run,
)
from ckptdpo.train.trainer import AlreadyAtMaxSteps, build_callbacks, trainer_class

log = logging.getLogger(__name__)


def load_tokenizer(model: str) -> Any:
    """The base model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model {model}: cannot load its tokenizer ({e}); set backend.model to a model directory."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_liger(requested: bool, *, use_cpu: bool) -> bool:
    """Liger's kernels are Triton (GPU) kernels: used when asked for, installed and on a GPU."""
    import importlib.util

    if requested and (use_cpu or importlib.util.find_spec("liger_kernel") is None):
        log.warning("train.use_liger_kernel: liger-kernel is not installed or there is no GPU; training without")
        return False
    return requested


def build_datasets(train_rows: list[dict], eval_rows: list[dict], out: Path, args: Any):
    """Train and eval datasets backed by files under `out/data`, written once by the main process.

    Every rank reads the same files, so TRL's caches derived from them (tokenization, precomputed reference
    log-probs) have one path that all ranks, on all machines sharing `out`, can read.
    """
    with args.main_process_first(local=False, desc="pair datasets"):
        train_ds = materialize_dataset(train_rows, dataset_dir(out / DATA_DIR, "train", train_rows))
        eval_ds = materialize_dataset(eval_rows, dataset_dir(out / DATA_DIR, "eval", eval_rows)) if eval_rows else None
    return train_ds, eval_ds


def prepare_resume(out: Path, args: Any) -> Path | None:
    """The newest complete checkpoint to resume from, after rank 0 cleared what a killed run left half written."""
    from accelerate import PartialState

    if args.should_save:
        removed = remove_incomplete_checkpoints(out)
        if removed:
            log.warning("removed incomplete checkpoints: %s", ", ".join(removed))
        shutil.rmtree(out / RANKS_DIR, ignore_errors=True)  # rank files of an earlier run
    PartialState().wait_for_everyone()
    resume = latest_checkpoint(out)
    if resume is not None:
        log.info("resuming from %s (step %d)", resume.name, checkpoint_step(resume))
    return resume


def load_reference(job: TrainJob, args: Any) -> Any | None:
    """DPO's reference model in the training precision when it only runs inference (`reference_dtype`); None
    leaves it to TRL (a copy in the policy's dtype, the base under LoRA, none with precomputed log-probs)."""
    dtype = reference_dtype(job.train, deepspeed=args.deepspeed_plugin is not None)
    if dtype is None:
        return None
    from trl.trainer.utils import create_model_from_path

    return create_model_from_path(job.model, **{**args.model_init_kwargs, "dtype": dtype})


def build_trainer(job: TrainJob, args: Any, datasets: tuple, tokenizer: Any, resume_state: dict):
    """The DPO or SimPO (CPOTrainer) trainer, counting tokens from where the resumed checkpoint left off."""
    extra: dict[str, Any] = {}
    if job.train.loss == "dpo":
        from trl import DPOTrainer as base

        extra["ref_model"] = load_reference(job, args)
    else:
        from trl.experimental.cpo import CPOTrainer as base
    counter, callbacks = build_callbacks(job)
    trainer = trainer_class(base, job)(
        model=job.model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=tokenizer,
        peft_config=build_peft_config(job.train),
        callbacks=callbacks,
        token_counts=TokenCounts.from_trainer_state(resume_state),
        **extra,
    )
    counter.trainer = trainer
    return trainer, counter


def train(trainer: Any, resume: Path | None) -> float:
    """Train (resuming from `resume`); the seconds this session trained, 0 when the checkpoint was the last step."""
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except AlreadyAtMaxSteps as done:
        log.info("checkpoint at step %s is the last one; nothing left to train", done.args[0])
        return 0.0
    return float(output.metrics.get("train_runtime") or 0.0)


def save(trainer: Any, job: TrainJob, args: Any) -> Path:
    """Save the trained weights (the LoRA adapter, merged later in one process) and the tokenizer."""
    return save_weights(trainer, Path(job.output_dir), lora=job.train.lora, args=args)


def save_weights(trainer: Any, out: Path, *, lora: bool, args: Any) -> Path:
    """`out/model` (or `out/adapter` for LoRA) from the trainer; every rank calls it, rank 0 writes."""
    target = out / (ADAPTER_DIR if lora else MODEL_DIR)
    # Collective under ZeRO-3 (gathers the 16-bit weights), so every rank calls it; rank 0 writes.
    trainer.save_model(str(target))
    if args.should_save and not any(target.glob("*.safetensors")):
        raise RuntimeError(
            f"{target}: no safetensors were written; with ZeRO-3 set stage3_gather_16bit_weights_on_model_save."
        )
    return target


def write_rank_info(trainer: Any, counter: Any, out: Path) -> None:
    """Every rank records what it was and did in `ranks/rank-N.json`; they agree after synchronized steps."""
    import torch.distributed as dist

    from ckptdpo.shards import atomic_write_bytes

    args = trainer.args
    zero3 = _zero_stage(trainer) == 3
    info = {
        "rank": args.process_index,
        "local_rank": args.local_process_index,
        "world_size": args.world_size,
        "pid": os.getpid(),
        "device": str(args.device),
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "deepspeed": trainer.is_deepspeed_enabled,
        "steps_run": counter.steps_run,
        "peak_memory": peak_memory(),
        # Replicated parameters must agree across ranks after a synchronized step (not under ZeRO-3 sharding).
        "param_checksum": None
        if zero3
        else float(sum(p.detach().double().sum().item() for p in trainer.model.parameters())),
    }
    atomic_write_bytes(out / RANKS_DIR / f"rank-{args.process_index}.json", json.dumps(info, indent=2).encode())
    trainer.accelerator.wait_for_everyone()


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: GPU memory allocated since `run_job` began, or on CPU the process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    # Linux reports ru_maxrss in KiB.
    return {"kind": "cpu_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _zero_stage(trainer: Any) -> int:
    return trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0


def summarize(job: TrainJob, trainer: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the summary of the whole run (also of the steps before a resume), written to summary.json."""
    from ckptdpo.shards import atomic_write_bytes

    cfg, out, args = job.train, Path(job.output_dir), trainer.args
    state = dataclasses.asdict(trainer.state)
    ranks = sorted((json.loads(p.read_text()) for p in (out / RANKS_DIR).glob("rank-*.json")), key=lambda r: r["rank"])
    run = summarize_run(state, trainer.token_counts, facts["start_step"], facts["runtime"])
    timing = {k: run.pop(k) for k in ("train_steps_s", "step_seconds", "step_cpu_seconds")} | facts["timing"]
    ref = getattr(trainer, "ref_model", None)
    summary = {
        "loss": cfg.loss,
        "loss_type": cfg.loss_type if cfg.loss == "dpo" else "simpo",
        "model": job.model,
        "model_dir": str(out / MODEL_DIR),
        "lora": cfg.lora,
        "merged": not cfg.lora,
        # TRL turns the dtype name into a torch.dtype in place.
        "policy_dtype": str(args.model_init_kwargs.get("dtype")).removeprefix("torch."),
        "reference_dtype": str(next(ref.parameters()).dtype).removeprefix("torch.") if ref is not None else None,
        "liger_kernel": bool(args.use_liger_kernel),
        "group_by_length": cfg.group_by_length,
        "prefix_sharing": bool(trainer.prefix_sharing),
        "prefix_sharing_off": None if trainer.prefix_sharing or not cfg.prefix_sharing else trainer.prefix_sharing_off,
        "zero_stage": _zero_stage(trainer),
        "world_size": args.world_size,
        "ranks": ranks,
        "resumed_from": facts["resumed_from"],
        **run,
        "timing": timing,
        "peak_memory": max((r["peak_memory"] for r in ranks), key=lambda m: m["bytes"], default=peak_memory()),
        "mfu": estimate_mfu(trainer, run["steady_state"], reference=_reference_runs(trainer)),
        "eval": {k: v for k, v in facts["eval"].items() if isinstance(v, int | float)},
        "pairs": facts["report"],
        "wall_time_s": time.monotonic() - facts["started"],
    }
    timing["wall_time_s"] = summary["wall_time_s"]
    atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
    log.info(
        "trained to step %d (from %d), final loss %s, steady state %s tokens/s, %s pairs/s; summary at %s",
        summary["global_step"],
        summary["start_step"],
        summary["final_loss"],
        f"{summary['tokens_per_s']:.0f}" if summary["tokens_per_s"] else "-",
        f"{summary['pairs_per_s']:.3f}" if summary["pairs_per_s"] else "-",
        out / SUMMARY,
    )
    return summary


def _reference_runs(trainer: Any) -> bool:
    """Whether each DPO step runs a reference forward: a reference model, or the base under LoRA (adapter off);
    not with precomputed reference log-probs, and never for SimPO."""
    if getattr(trainer, "ref_model", None) is not None:
        return True
    return hasattr(trainer, "ref_model") and not trainer.precompute_ref_logps


# Dense bf16 peak of one GPU, by a fragment of `torch.cuda.get_device_name()`.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
MFU_FORMULA = (
    "(6 * params * computed_tokens + 12 * layers * heads * head_dim * attended_pairs) "
    "/ (steady_seconds * world_size * peak_flops)"
)
MFU_REFERENCE_TERM = "numerator + 2 * params * computed_tokens + 4 * layers * heads * head_dim * attended_pairs"


def estimate_mfu(trainer: Any, steady: dict[str, Any] | None, *, reference: bool) -> dict[str, Any] | None:
    """Model FLOPs utilization over the steady-state steps, on a GPU of known bf16 peak training in bf16.

    Counts the tokens the model computed (each shared prompt once) and the query-key pairs attention needs (causal;
    rejected never over chosen), not what kernels spend on masked blocks, padding or recomputation. `mfu` is the
    policy's training; `mfu_with_reference` adds the reference forward when one runs every step.
    """
    import torch

    if steady is None or not torch.cuda.is_available() or not trainer.args.bf16:
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    from ckptdpo.train.prefix import base_module

    model = base_module(trainer.model)
    config = model.config.get_text_config()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * config.num_attention_heads * head_dim * steady["attended_pairs"]
    budget = steady["seconds"] * trainer.args.world_size * peak
    policy = 6 * params * steady["computed_tokens"] + 12 * attention
    with_reference = policy + (2 * params * steady["computed_tokens"] + 4 * attention if reference else 0)
    return {
        "mfu": policy / budget,
        "mfu_with_reference": with_reference / budget,
        "formula": MFU_FORMULA,
        "reference_term": MFU_REFERENCE_TERM if reference else None,
        "params": params,
        "peak_flops": peak,
        "device": name,
    }


def run_job(job: TrainJob, *, started: float, save_model: bool = True) -> dict[str, Any] | None:
    """Train; every rank returns, rank 0 returns the summary (also written to output_dir/summary.json).

    `save_model=False` leaves out `model/` (benchmarks that measure training only).
    """
    import datasets
    import torch
    import transformers

    cfg, out = job.train, Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    use_cpu = not torch.cuda.is_available()
    if not use_cpu:
        torch.cuda.reset_peak_memory_stats()
    # load
    tokenizer = load_tokenizer(job.model)
    rows = read_pairs(job.pairs_dirs)
    train_rows, eval_rows, report = build_pair_rows(rows, tokenizer, cfg, ", ".join(job.pairs_dirs))
    # build arguments (this also starts the distributed state), then the datasets every rank shares
    if use_cpu:
        _skip_deepspeed_shm_comm()
    kwargs = build_training_kwargs(cfg, out, use_cpu=use_cpu, liger=use_liger(cfg.use_liger_kernel, use_cpu=use_cpu))
    args = make_arguments(cfg, kwargs)
    if use_cpu and args.deepspeed_plugin is not None:
        _start_deepspeed_comm()
    if args.process_index != 0:
        transformers.logging.set_verbosity_warning()
    data = build_datasets(train_rows, eval_rows, out, args)
    # build the trainer, train, save
    resume = prepare_resume(out, args)
    trainer, counter = build_trainer(job, args, data, tokenizer, read_trainer_state(resume))
    runtime = train(trainer, resume)
    trained = time.monotonic()
    eval_metrics = trainer.evaluate() if data[1] is not None else {}
    evaluated = time.monotonic()
    if save_model:
        save(trainer, job, args)
    saved = time.monotonic()
    write_rank_info(trainer, counter, out)
    if not args.should_save:
        return None
    # summarize
    facts = {
        "resumed_from": resume.name if resume else None,
        "start_step": checkpoint_step(resume) if resume else 0,
        "runtime": runtime,
        "eval": eval_metrics,
        "report": report,
        "started": started,
        "timing": {
            # Loading and tokenizing, the models, the reference log-probs when precomputed: all before step 1.
            "startup_s": (counter.train_began or trained) - started,
            **counter.times,
            "eval_s": evaluated - trained,
            "final_save_s": saved - evaluated,
        },
    }
    return summarize(job, trainer, facts)


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


def _start_deepspeed_comm() -> None:
    """On CPU the arguments start torch's gloo group but not DeepSpeed's comm layer, whose world size is then 1;
    ZeRO-3 loads the model under `zero.Init`, which reads it. DeepSpeed adopts the group torch already has."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def merge_adapter(job: TrainJob) -> dict[str, Any]:
    """One plain process after the run: fold the LoRA adapter into a float32 copy of the base model, save it.

    Never inside the distributed run: with ZeRO-3 configured there, loading the base goes through `zero.Init`, a
    collective the other ranks would have to join (they wait elsewhere, so the run hangs).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ckptdpo.shards import atomic_write_bytes

    out = Path(job.output_dir)
    summary_path, adapter_dir, model_dir = out / SUMMARY, out / ADAPTER_DIR, out / MODEL_DIR
    if not summary_path.is_file() or not any(adapter_dir.glob("*.safetensors")):
        raise RuntimeError(f"{out}: no finished LoRA run to merge (summary.json and adapter/ come from training)")
    base = AutoModelForCausalLM.from_pretrained(job.model, dtype="float32")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    shutil.rmtree(model_dir, ignore_errors=True)
    merged.save_pretrained(str(model_dir), safe_serialization=True)
    load_tokenizer(job.model).save_pretrained(str(model_dir))
    summary = {**json.loads(summary_path.read_text()), "merged": True}
    atomic_write_bytes(summary_path, json.dumps(summary, indent=2, sort_keys=True).encode())
    log.info("merged %s into %s", adapter_dir, model_dir)
    return summary


def make_parser(
    prog: str = "python -m ckptdpo.train",
    description: str = "DPO / SimPO on pair shards (TRL).",
    job: str = "train job YAML (a TrainJob)",
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help=job)
    p.add_argument("--merge", action="store_true", help="after a LoRA run: merge the adapter into model/ (1 process)")
    return p


def run_entry(argv: list[str] | None, parser: argparse.ArgumentParser, load: Any, run: Any) -> int:
    """A job entry point: load the job (`load(path)`), run it (`run(job, started=...)`) or merge its adapter; a user
    error is one `error: ...` line and exit status 2."""
    started = time.monotonic()
    args = parser.parse_args(argv)
    # Timestamped, so the per-step lines (`step N/M: ...`) also give the rate between any two steps.
    logging.basicConfig(level=logging.INFO, format="[pid %(process)d] %(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = load(args.config)
        if args.merge:
            merge_adapter(job)
        else:
            run(job, started=started)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, make_parser(), load_job, run_job)
