"""Verification of final answers against gold answers in killable worker processes.

- `answers`: the final answer of a completion (last box of the answer part, or an explicit final statement).
- `normalize`: notation removed from gold and prediction alike before math-verify.
- `budget`: a cheap complexity budget that ends adversarial answers as `timeout` before math-verify runs.
- `math`: the math-verify check, run in workers.
- `pool`: the killable process pool (`run_calls`), shared with the code and choice verifiers.
- `worker`: the workers' own entry point, `python -m ckptdpo.verify.worker`.
- `code`, `choice`: the code (sandboxed tests) and multiple-choice verifiers, imported from their modules.
"""

from ckptdpo.verify.answers import ANSWER_FORMATS, EXTRACTED_FROM, extract_answer, extract_final_answer, is_cut_off
from ckptdpo.verify.batch import (
    DEFAULT_ANSWER_FORMAT,
    DEFAULT_MAX_CHARS,
    STATUSES,
    Verdict,
    clear_cache,
    verify_batch,
    verify_batch_timed,
)
from ckptdpo.verify.normalize import normalize_answer
from ckptdpo.verify.pool import WORKER_MEMORY_HEADROOM_BYTES, Pool, WorkersUnavailable, run_calls, shutdown_pool

__all__ = [
    "ANSWER_FORMATS",
    "DEFAULT_ANSWER_FORMAT",
    "DEFAULT_MAX_CHARS",
    "EXTRACTED_FROM",
    "STATUSES",
    "WORKER_MEMORY_HEADROOM_BYTES",
    "Pool",
    "Verdict",
    "WorkersUnavailable",
    "clear_cache",
    "extract_answer",
    "extract_final_answer",
    "is_cut_off",
    "normalize_answer",
    "run_calls",
    "shutdown_pool",
    "verify_batch",
    "verify_batch_timed",
]
