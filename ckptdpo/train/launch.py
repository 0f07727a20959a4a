"""How a training job is started: plain python, torchrun (CPU ranks, several machines) or accelerate launch.

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
- several machines (`train.num_machines`): every machine runs the same job with its own `train.machine_rank`;
  they meet at `main_process_ip:main_process_port` (torchrun's static rendezvous, or accelerate's own arguments).
  `output_dir` must be on a filesystem every machine shares (checkpoints, datasets and their caches live there).
- LoRA: the adapter is merged afterwards by `python -m ckptdpo.train --config JOB --merge`, one plain process
  (`build_merge_command`), never inside the distributed run: under ZeRO-3 loading a model inside the run goes
  through `zero.Init`, a collective that other ranks would have to join.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ckptdpo.configs import TrainConfig


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


def build_launch_command(
    job_path: str | Path, cfg: TrainConfig, *, python: str = sys.executable, module: str = "ckptdpo.train"
) -> list[str]:
    """The command that runs one training job: plain python, accelerate launch (GPUs) or torchrun (CPU ranks).

    `cfg` is any config with the launcher fields of TrainConfig (GRPOConfig has them too); `module` is the entry
    point (`ckptdpo.grpo` for the GRPO baseline)."""
    entry = ["-m", module, "--config", str(job_path)]
    if cfg.accelerate_config:
        launch = [python, "-m", "accelerate.commands.launch", "--config_file", cfg.accelerate_config]
        # accelerate counts processes over all machines; train.num_processes is per machine.
        total = cfg.num_processes * cfg.num_machines
        procs = ["--num_processes", str(total), "--mixed_precision", "bf16" if cfg.bf16 else "no"]
        return [*launch, *procs, *_accelerate_machines(cfg), *entry]
    if cfg.num_machines > 1:
        nodes = ["--nnodes", str(cfg.num_machines), "--node_rank", str(cfg.machine_rank)]
        rendezvous = ["--master_addr", str(cfg.main_process_ip), "--master_port", str(cfg.main_process_port)]
        per_node = ["--nproc_per_node", str(cfg.num_processes)]
        return [python, "-m", "torch.distributed.run", *nodes, *rendezvous, *per_node, *entry]
    if cfg.num_processes > 1:
        # --standalone: a private rendezvous on a free port, so concurrent jobs on one host do not collide.
        standalone = ["--standalone", "--nproc_per_node", str(cfg.num_processes)]
        return [python, "-m", "torch.distributed.run", *standalone, *entry]
    return [python, *entry]


def _accelerate_machines(cfg: TrainConfig) -> list[str]:
    """accelerate's multi-machine arguments; none for one machine, so the config file's own values stand."""
    if cfg.num_machines == 1:
        return []
    return [
        "--num_machines",
        str(cfg.num_machines),
        "--machine_rank",
        str(cfg.machine_rank),
        "--main_process_ip",
        str(cfg.main_process_ip),
        "--main_process_port",
        str(cfg.main_process_port),
    ]


def build_merge_command(
    job_path: str | Path, *, python: str = sys.executable, module: str = "ckptdpo.train"
) -> list[str]:
    """The single-process step that folds a trained LoRA adapter into the saved model (after the run)."""
    return [python, "-m", module, "--config", str(job_path), "--merge"]
