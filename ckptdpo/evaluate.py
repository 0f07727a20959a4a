"""Evaluation: which models and benchmarks, EVAL_SAMPLES rows, and per-(benchmark, model) metrics streamed by shard.

Aggregation never holds a benchmark's completions: it reads only the small columns it needs, one shard at a time,
folds every problem of the shard into running sums (pass@k and cons@k per problem, token and finish counters) and
drops the shard. What stays is O(number of problems) ids plus a few numbers, whatever the number of samples.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ckptdpo.backends.base import GenerationResult, problem_message
from ckptdpo.configs import BackendConfig, EvalConfig, ProblemsConfig, eval_model_name
from ckptdpo.errors import UserError
from ckptdpo.metrics import aes, cons_at_k, efficiency_eta, pass_at_k
from ckptdpo.sandbox import SandboxLimits
from ckptdpo.shards import list_shards

# The columns aggregation reads; never `completion`.
AGG_COLUMNS = ["problem_id", "sample_index", "completion_tokens", "finish_reason", "status", "is_correct", "extracted"]
HELDOUT_BENCHMARK = "demo_heldout"
# Held-out demo problems come from the demo generator under another seed; this offset keeps it clear of the
# training seed (problems that still coincide are dropped by `exclude_training_problems`).
HELDOUT_SEED_OFFSET = 7919
TRAINED_MODEL_DIR = Path("train") / "model"
GRPO_MODEL_DIR = Path("grpo") / "model"
# The models the run itself makes: where each is saved, and the stage that saves it.
RUN_MODELS = {"trained": (TRAINED_MODEL_DIR, "train"), "grpo": (GRPO_MODEL_DIR, "grpo")}
# Every correct answer equals the gold answer, so correct samples vote together under one key, whatever LaTeX they
# wrote it in; wrong answers vote by their whitespace-normalized text.
_GOLD_VOTE = "\x00gold"
_SPACE = re.compile(r"\s+")


# --- what to evaluate ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: its name in results and the backend config that loads it."""

    name: str
    backend: BackendConfig


def resolve_models(cfg: EvalConfig, backend: BackendConfig, run_dir: Path) -> tuple[list[ModelSpec], dict[str, str]]:
    """The models to evaluate, in `cfg.models` order, and {name: reason} for those skipped.

    'base' is the recipe's backend model; 'trained' is `<run_dir>/train/model` (DPO on the factory's pairs) and
    'grpo' `<run_dir>/grpo/model` (the cost-matched GRPO baseline), each skipped while it does not exist; anything
    else is a path or hub id under the recipe's backend settings. `cfg.backends[name]` replaces the whole backend
    config of that model (an endpoint serving it, or a fake script in tests).
    """
    specs, skipped = [], {}
    for entry in cfg.models:
        name = eval_model_name(entry)
        ref = entry.split("=", 1)[1].strip() if "=" in entry else entry
        if name in cfg.backends:
            specs.append(ModelSpec(name, cfg.backends[name]))
            continue
        if ref == "base":
            specs.append(ModelSpec(name, backend))
        elif ref in RUN_MODELS:
            where, stage = RUN_MODELS[ref]
            saved = Path(run_dir) / where
            if not (saved / "config.json").is_file():
                skipped[name] = f"no {ref} model at {saved} (the {stage} stage has not run)"
                continue
            specs.append(ModelSpec(name, backend.model_copy(update={"model": str(saved), "revision": None})))
        else:
            specs.append(ModelSpec(name, backend.model_copy(update={"model": ref, "revision": None})))
    return specs, skipped


def resolve_benchmarks(
    cfg: EvalConfig, problems: ProblemsConfig, source: str = "<recipe>"
) -> dict[str, ProblemsConfig]:
    """`cfg.benchmarks`, or for a demo recipe without any, held-out demo problems (same size, another seed)."""
    if cfg.benchmarks:
        return dict(cfg.benchmarks)
    if problems.source != "demo":
        raise UserError(f"{source}: eval.benchmarks is empty; name at least one benchmark (name: problem source).")
    heldout = problems.model_copy(update={"seed": problems.seed + HELDOUT_SEED_OFFSET, "limit": None})
    return {HELDOUT_BENCHMARK: heldout}


# --- prompts and verification per benchmark kind ---------------------------------------------------------------


def kind_prompt(chat_prompt: str, message: str, kind: str) -> str:
    """The prompt of a problem of `kind` from the backend's math prompt of the same message.

    Backends template `message + "\n\n" + INSTRUCTION`; code and choice prompts carry their own instruction, so
    the math instruction is taken out of the templated text again (templates copy the user turn verbatim).
    """
    if kind == "math":
        return chat_prompt
    turn = problem_message(message)
    if turn not in chat_prompt:
        raise ValueError("the backend's chat template changed the user turn; cannot drop the math instruction")
    return chat_prompt.replace(turn, message, 1)


def code_limits(cfg: EvalConfig) -> SandboxLimits:
    return SandboxLimits(
        cpu_s=cfg.code_cpu_s,
        wall_s=cfg.code_wall_s,
        memory_bytes=cfg.code_memory_mb << 20,
        max_processes=cfg.code_max_processes,
    )


def verify_samples(
    problems: Sequence[Mapping[str, Any]],
    completions: Sequence[Sequence[str]],
    cfg: EvalConfig,
    *,
    timeout_s: float,
    workers: int | None,
    finish_reasons: Sequence[Sequence[str | None]] | None = None,
    answer_format: str | None = None,
) -> list[Any]:
    """Verdicts flat over each problem's completions in order, each problem checked by the verifier of its kind.

    Nothing is checked in the caller's process: math answers go to the verifier's killable pool, choice letters
    too (one call each), code to the sandbox. `finish_reasons` (shaped like `completions`) marks completions cut at
    their token limit: those are `no_answer` whatever they contain. `answer_format` is the math verifier's (its
    default when None).
    """
    from ckptdpo.verify import DEFAULT_ANSWER_FORMAT, Verdict, run_calls, verify_batch
    from ckptdpo.verify.answers import CUT_OFF_REASONS
    from ckptdpo.verify.choice import LETTERS, verify_choice_batch
    from ckptdpo.verify.code import verify_code_batch

    reasons = finish_reasons or [[None] * len(texts) for texts in completions]
    flat = [
        (p, c, r)
        for p, texts, why in zip(problems, completions, reasons, strict=True)
        for c, r in zip(texts, why, strict=True)
    ]
    verdicts: list[Any] = [None] * len(flat)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, (p, _, why) in enumerate(flat):
        kind = p.get("kind") or "math"
        if kind != "math" and why in CUT_OFF_REASONS:
            verdicts[i] = Verdict("no_answer", None, None)  # cut off: it never gave its final answer
        else:
            by_kind[kind].append(i)
    for kind, idx in by_kind.items():
        if kind == "math":
            items = [(flat[i][0]["answer"], flat[i][1], flat[i][2]) for i in idx]
            got = verify_batch(
                items, timeout_s=timeout_s, workers=workers, answer_format=answer_format or DEFAULT_ANSWER_FORMAT
            )
        elif kind == "choice":
            calls = [
                ([(p["answer"], c)], LETTERS[: len(p.get("choice_order") or LETTERS)])
                for p, c, _ in (flat[i] for i in idx)
            ]
            results, _ = run_calls(verify_choice_batch, calls, timeout_s=timeout_s, workers=workers)
            got = [value[0] if outcome == "ok" else Verdict(outcome, None, None) for outcome, value in results]
        elif kind == "code":
            tasks = [_code_task(*flat[i][:2]) for i in idx]
            limits, allow = code_limits(cfg), cfg.allow_unsandboxed
            got = verify_code_batch(tasks, limits=limits, workers=workers, allow_unsandboxed=allow)
        else:
            raise ValueError(f"unknown benchmark kind {kind!r}")
        for i, v in zip(idx, got, strict=True):
            verdicts[i] = v
    return verdicts


def _code_task(problem: Mapping[str, Any], completion: str) -> Any:
    from ckptdpo.verify.code import CodeTask

    cases = tuple((c["stdin"], c["expected_stdout"]) for c in problem.get("cases") or [])
    return CodeTask(completion, tests=problem.get("tests") or "", setup=problem.get("setup") or "", cases=cases)


def normalize_problem(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def exclude_problems(rows: Sequence[dict[str, str]], training: Iterable[str]) -> tuple[list[dict[str, str]], int]:
    """Benchmark rows whose (whitespace-normalized) problem text is not among the training problems; and how many
    were dropped."""
    seen = {normalize_problem(t) for t in training}
    kept = [r for r in rows if normalize_problem(r["problem"]) not in seen]
    return kept, len(rows) - len(kept)


def sample_rows(
    benchmark: str,
    model_name: str,
    model: str,
    problem_ids: Sequence[str],
    results: Sequence[GenerationResult],
    verdicts: Sequence[Any],
    num_samples: int,
) -> list[dict[str, Any]]:
    """EVAL_SAMPLES rows: `verdicts` are flat over the results' samples in order; a failed request (or one that
    returned fewer than `num_samples` samples) gets `error` rows for the missing samples, so it counts as wrong
    instead of silently shrinking the benchmark."""
    rows: list[dict[str, Any]] = []
    it = iter(verdicts)
    for pid, res in zip(problem_ids, results, strict=True):
        for j in range(num_samples):
            if j < len(res.samples):
                s, v = res.samples[j], next(it)
                text, tokens, finish = s.text, s.num_tokens, s.finish_reason
                status, ok, extracted = v.status, v.is_correct, v.extracted
            else:
                text, tokens, finish, status, ok, extracted = "", 0, "error", "error", None, None
            rows.append(
                {
                    "benchmark": benchmark,
                    "model_name": model_name,
                    "model": model,
                    "problem_id": pid,
                    "sample_index": j,
                    "completion": text,
                    "completion_tokens": tokens,
                    "finish_reason": finish,
                    "status": status,
                    "is_correct": ok,
                    "extracted": extracted,
                }
            )
    if next(it, None) is not None:
        raise ValueError("more verdicts than generated samples")
    return rows


# --- streaming aggregation -------------------------------------------------------------------------------------------


def curve_ks(num_samples: int, ks: Sequence[int]) -> list[int]:
    """The k of the pass@k curve: every k up to 32 samples, else powers of two, the configured k and n."""
    if num_samples <= 32:
        return list(range(1, num_samples + 1))
    powers = {2**i for i in range(int(math.log2(num_samples)) + 1)}
    return sorted(powers | {k for k in ks if k <= num_samples} | {num_samples})


class EvalAggregator:
    """Folds EVAL_SAMPLES shards (AGG_COLUMNS at least) into one (benchmark, model)'s metrics, shard by shard.

    Every problem's samples must sit in one shard (eval shards are split by problem): a problem seen again in a
    later shard is a ValueError, since its pass@k cannot be computed from two halves.
    """

    def __init__(self, num_samples: int, ks: Sequence[int]) -> None:
        self.num_samples = num_samples
        self.ks = sorted(k for k in set(ks) if k <= num_samples)
        self.skipped_ks = sorted(k for k in set(ks) if k > num_samples)
        self.curve = sorted(set(curve_ks(num_samples, self.ks)) | set(self.ks))
        self.seen: set[str] = set()
        self.pass_sum: dict[int, float] = defaultdict(float)
        self.pass_count: dict[int, int] = defaultdict(int)
        self.cons_sum: dict[int, float] = defaultdict(float)
        self.cons_count: dict[int, int] = defaultdict(int)
        self.pass1_sum = 0.0
        self.samples = 0
        self.correct = 0
        self.tokens: dict[str, int] = Counter()
        self.counted: dict[str, int] = Counter()
        self.finish: Counter[str] = Counter()
        self.status: Counter[str] = Counter()
        self.max_rows_held = 0

    def add(self, shard: pa.Table | pa.RecordBatch) -> None:
        """Fold one shard; only its AGG_COLUMNS are converted to Python, and nothing of it is kept."""
        rows = shard.select(AGG_COLUMNS).to_pylist()
        self.max_rows_held = max(self.max_rows_held, len(rows))
        by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_problem[r["problem_id"]].append(r)
        again = sorted(set(by_problem) & self.seen)
        if again:
            raise ValueError(f"problem {again[0]} appears in more than one shard; eval shards must split by problem")
        self.seen.update(by_problem)
        for samples in by_problem.values():
            self._fold_problem(sorted(samples, key=lambda r: r["sample_index"]))

    def _fold_problem(self, samples: list[dict[str, Any]]) -> None:
        n = len(samples)
        flags = [r["status"] == "correct" for r in samples]
        c = sum(flags)
        self.samples += n
        self.correct += c
        self.pass1_sum += c / n
        for k in self.curve:
            if k <= n:
                self.pass_sum[k] += pass_at_k(n, c, k)
                self.pass_count[k] += 1
        votes = [_GOLD_VOTE if ok else _vote(r["extracted"]) for ok, r in zip(flags, samples, strict=True)]
        for k in self.ks:
            if k <= n:
                self.cons_sum[k] += cons_at_k(votes, flags, k)
                self.cons_count[k] += 1
        for ok, r in zip(flags, samples, strict=True):
            self.finish[r["finish_reason"]] += 1
            self.status[r["status"]] += 1
            if r["finish_reason"] == "error":
                continue  # nothing was generated: no length to count
            for group in ("all", "correct" if ok else "incorrect"):
                self.tokens[group] += r["completion_tokens"]
                self.counted[group] += 1

    def result(self) -> dict[str, Any]:
        """The metrics (JSON-ready, k keys as strings); pass@k / cons@k only where every problem has k samples."""
        problems = len(self.seen)

        def mean(total: float, count: int) -> float | None:
            return round(total / count, 6) if count else None

        def by_k(sums: Mapping[int, float], counts: Mapping[int, int], ks: Sequence[int]) -> dict[str, float]:
            return {str(k): round(sums[k] / problems, 6) for k in ks if problems and counts[k] == problems}

        return {
            "num_problems": problems,
            "num_samples": self.samples,
            "samples_per_problem": self.num_samples,
            "accuracy": mean(self.correct, self.samples),
            "pass_at_1": mean(self.pass1_sum, problems),
            "pass_at_k": by_k(self.pass_sum, self.pass_count, self.ks),
            "cons_at_k": by_k(self.cons_sum, self.cons_count, self.ks),
            "pass_at_k_curve": by_k(self.pass_sum, self.pass_count, self.curve),
            "k_skipped": self.skipped_ks,
            "mean_tokens": mean(self.tokens["all"], self.counted["all"]),
            "mean_tokens_correct": mean(self.tokens["correct"], self.counted["correct"]),
            "mean_tokens_incorrect": mean(self.tokens["incorrect"], self.counted["incorrect"]),
            "length_share": mean(self.finish["length"], self.samples),
            "loop_share": mean(self.finish["loop"], self.samples),
            "finish_reasons": dict(sorted(self.finish.items())),
            "by_status": dict(sorted(self.status.items())),
        }


def _vote(extracted: str | None) -> str | None:
    if extracted is None:
        return None
    text = _SPACE.sub(" ", extracted).strip()
    return text or None


def aggregate_shards(shards: Iterable[pa.Table | pa.RecordBatch], num_samples: int, ks: Sequence[int]) -> dict:
    """Metrics of one (benchmark, model) from an iterator of its shards, consumed one at a time."""
    agg = EvalAggregator(num_samples, ks)
    for shard in shards:
        agg.add(shard)
    return agg.result()


def iter_eval_shards(stage_dir: str | Path) -> Iterator[pa.Table]:
    """The shards of one (benchmark, model) directory, each read with AGG_COLUMNS only."""
    for path in list_shards(stage_dir):
        yield pq.read_table(path, columns=AGG_COLUMNS)


# --- comparison against the reference model -------------------------------------------------------------------------


def compare_to_reference(
    metrics: Mapping[str, Mapping[str, Any]], reference: str, alpha: float = 1.0, beta: float = 3.0, gamma: float = 5.0
) -> dict[str, dict[str, float | None]]:
    """Per model of one benchmark: DTO's eta and O1-Pruner's AES against `reference` (pass@1 as accuracy, mean
    tokens as length); None where undefined (no reference, zero reference accuracy or length)."""
    ref = metrics.get(reference)
    out: dict[str, dict[str, float | None]] = {}
    for name, m in metrics.items():
        eta = score = None
        if ref is not None and ref.get("pass_at_1") and ref.get("mean_tokens"):
            acc0, len0 = ref["pass_at_1"], ref["mean_tokens"]
            acc, length = m.get("pass_at_1"), m.get("mean_tokens")
            if acc is not None and length:
                eta = round(efficiency_eta(acc0, len0, acc, length), 6)
                score = round(aes(acc0, len0, acc, length, alpha=alpha, beta=beta, gamma=gamma), 6)
        out[name] = {"eta": eta, "aes": score}
    return out


def results_rows(section: Mapping[str, Mapping[str, Mapping[str, Any]]], reference: str) -> list[dict[str, Any]]:
    """EVAL_RESULTS rows from the eval section of stats.json ({benchmark: {model: metrics}})."""
    rows = []
    for bench, models in section.items():
        for name, m in models.items():
            rows.append(
                {
                    "benchmark": bench,
                    "model_name": name,
                    "reference_model": reference,
                    "num_problems": m["num_problems"],
                    "num_samples": m["num_samples"],
                    "pass_at_1": m["pass_at_1"],
                    "pass_at_k": [(int(k), v) for k, v in m["pass_at_k"].items()],
                    "cons_at_k": [(int(k), v) for k, v in m["cons_at_k"].items()],
                    "mean_tokens": m["mean_tokens"],
                    "mean_tokens_correct": m["mean_tokens_correct"],
                    "mean_tokens_incorrect": m["mean_tokens_incorrect"],
                    "length_share": m["length_share"],
                    "loop_share": m["loop_share"],
                    "eta": m.get("eta"),
                    "aes": m.get("aes"),
                }
            )
    return rows
