"""TRL DPO / SimPO training on pair shards: `python -m ckptdpo.train --config JOB.yaml`.

The job file is a `TrainJob`: the recipe's `train` section plus the pair stage directories, the base model's local
path and the output directory. Everything the run leaves lives in the output directory: `data/` (the pair datasets
and the caches TRL derives from them, one path for every rank), `checkpoint-*` (a rerun resumes from the newest
complete one, so a Prefect retry continues), `model/` (safetensors and tokenizer), `adapter/` (LoRA runs; merged
into `model/` by `--merge`, one plain process after the run), `ranks/rank-N.json` (one per process that took part)
and `summary.json` (written by rank 0 at the end of training).

Modules: `job` (the job file), `pairs` (pair rows and datasets), `launch` (python / torchrun / accelerate launch
commands), `arguments` (the TRL config), `trainer` (token counts, length grouping, faults), `progress`
(checkpoints, resume, summary), `run` (the steps of a run and the entry point).
"""

from ckptdpo.train.arguments import build_peft_config, build_training_kwargs, make_arguments, training_dtype
from ckptdpo.train.job import (
    ADAPTER_DIR,
    DATA_DIR,
    FAULT_EXIT_CODE,
    FAULT_FIELDS,
    MODEL_DIR,
    RANKS_DIR,
    SUMMARY,
    TRAINER_STATE,
    TrainJob,
    load_job,
    write_job,
)
from ckptdpo.train.launch import build_launch_command, build_merge_command, deepspeed_config
from ckptdpo.train.pairs import (
    DROP_REASONS,
    PAIR_COLUMNS,
    build_pair_rows,
    dataset_dir,
    materialize_dataset,
    prepare_pairs,
    read_pairs,
    split_pairs,
)
from ckptdpo.train.progress import (
    TokenCounts,
    count_batch_tokens,
    latest_checkpoint,
    padding_figures,
    read_trainer_state,
    remove_incomplete_checkpoints,
    summarize_run,
    summarize_steps,
)
from ckptdpo.train.run import main, make_parser, merge_adapter, run_job

__all__ = [
    "ADAPTER_DIR",
    "DATA_DIR",
    "DROP_REASONS",
    "FAULT_EXIT_CODE",
    "FAULT_FIELDS",
    "MODEL_DIR",
    "PAIR_COLUMNS",
    "RANKS_DIR",
    "SUMMARY",
    "TRAINER_STATE",
    "TokenCounts",
    "TrainJob",
    "build_launch_command",
    "build_merge_command",
    "build_pair_rows",
    "build_peft_config",
    "build_training_kwargs",
    "count_batch_tokens",
    "dataset_dir",
    "deepspeed_config",
    "latest_checkpoint",
    "load_job",
    "main",
    "make_arguments",
    "make_parser",
    "materialize_dataset",
    "merge_adapter",
    "padding_figures",
    "prepare_pairs",
    "read_pairs",
    "read_trainer_state",
    "remove_incomplete_checkpoints",
    "run_job",
    "split_pairs",
    "summarize_run",
    "summarize_steps",
    "training_dtype",
    "write_job",
]
