"""Prefect tasks for the data factory: read shards -> call ckptdpo -> write shards.

Every stage is planned the same way (`plan_stage`): its key is a content hash of the stage's config, the
fingerprints of its input stages and the model revision. A stage whose manifest carries that key is done and
is skipped whole; otherwise one task run per input shard writes one output shard, skipping shards that an
interrupted run already wrote (they are complete by construction), and `finalize_stage` writes the manifest
last and the stage's section of stats.json.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from ckptdpo import summary
from ckptdpo.backends.base import GenerationRequest
from ckptdpo.checkpoints import count_paragraphs, locate_checkpoints
from ckptdpo.configs import (
    BackendConfig,
    CheckpointConfig,
    GenerateConfig,
    ProblemsConfig,
    ResampleConfig,
    backend_config,
)
from ckptdpo.problems import load_problems
from ckptdpo.resample import (
    attempt_rows,
    build_pairs,
    build_requests,
    draws_this_round,
    plan_slots,
    slot_key,
    stable_seed,
)
from ckptdpo.schemas import ATTEMPTS, CHECKPOINTS, PAIRS, PROBLEMS, SAMPLES, VERDICTS, make_table
from ckptdpo.shards import (
    content_id,
    list_shards,
    prepare_stage,
    read_manifest,
    read_shard,
    shard_path,
    stage_fingerprint,
    update_stats,
    write_manifest,
    write_shard,
)
from ckptdpo.verify import verify_batch
from tasks.backends import backend_session
from tasks.common import content_cache_key, content_key
from tasks.environment import hub_offline

RETRY = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_jitter_factor": 0.5}


@dataclass
class StagePlan:
    """What a stage has to do: its directory, content key, and one job per shard still to write."""

    stage: str
    run_dir: str
    key: str
    done: bool
    indices: list[int] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def directory(self) -> Path:
        return Path(self.run_dir) / self.stage


def plan_stage(run_dir: str, stage: str, inputs: dict[str, str], *key_parts: Any, shards_of: str) -> StagePlan:
    """Key the stage by content; clear it if it was written under another key; list the shards to write."""
    key = content_key(stage, inputs, *key_parts)[:16]
    plan = StagePlan(stage=stage, run_dir=run_dir, key=key, done=False, inputs=inputs)
    plan.done = prepare_stage(plan.directory, key)
    if not plan.done:
        plan.indices = list(range(len(list_shards(Path(run_dir) / shards_of))))
    return plan


def fingerprints(run_dir: str, *stages: str) -> dict[str, str]:
    return {s: stage_fingerprint(Path(run_dir) / s) for s in stages}


def shard_exists(run_dir: str, stage: str, index: int) -> bool:
    return shard_path(Path(run_dir) / stage, index).exists()


def _read(run_dir: str, stage: str, index: int, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return read_shard(shard_path(Path(run_dir) / stage, index), columns=columns).to_pylist()


def _read_all(run_dir: str, stage: str, columns: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in list_shards(Path(run_dir) / stage):
        rows.extend(read_shard(p, columns=columns).to_pylist())
    return rows


# --- problems ------------------------------------------------------------------------------------------------------


@task(name="load_problems", **RETRY)
def load_problems_stage(run_dir: str, problems: dict, shard_size: int, base_dir: str) -> dict[str, Any]:
    """Load and validate the problem source; write problem shards when their content changed."""
    cfg = ProblemsConfig(**problems)
    problem_set = load_problems(cfg, base_dir=Path(base_dir), offline=hub_offline())
    rows = problem_set.rows
    key = content_key("problems", [(r["problem_id"], r["problem"], r["answer"]) for r in rows])[:16]
    stage = Path(run_dir) / "problems"
    if not prepare_stage(stage, key):
        for i in range(0, len(rows), shard_size):
            write_shard(stage, i // shard_size, make_table(rows[i : i + shard_size], PROBLEMS))
        stats = {"num_problems": len(rows), "num_invalid": problem_set.num_invalid, "source": problem_set.source}
        write_manifest(stage, config_hash=key, stats=stats)
        update_stats(run_dir, "problems", stats)
    return read_manifest(stage)["stats"]


# --- generate ------------------------------------------------------------------------------------------------------


@task(name="generate_samples", cache_key_fn=content_cache_key, persist_result=True, **RETRY)
def generate_shard(run_dir: str, index: int, stage_key: str, generate: dict, backend: dict) -> dict[str, float]:
    """Sample `num_samples` trajectories per problem of one shard."""
    if shard_exists(run_dir, "generate", index):
        return {"generate_s": 0.0}
    cfg, bcfg = GenerateConfig(**generate), backend_config(**backend)
    problems = _read(run_dir, "problems", index)
    with backend_session(bcfg) as b:
        prompts = [b.chat_prompt(p["problem"]) for p in problems]
        requests = [
            GenerationRequest(
                prompt=prompt,
                n=cfg.num_samples,
                seed=stable_seed(p["problem_id"], cfg.seed),
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                stop=tuple(cfg.stop),
                route_key=p["problem_id"],
            )
            for p, prompt in zip(problems, prompts, strict=True)
        ]
        t0 = time.perf_counter()
        results = b.generate(requests)
        elapsed = time.perf_counter() - t0
        model = b.model_id
    rows = []
    for p, req, res in zip(problems, requests, results, strict=True):
        prompt_tokens = res.prompt_tokens
        samples = res.samples or []
        if res.error:
            get_run_logger().warning("problem %s: generation failed: %s", p["problem_id"], res.error)
        for j, s in enumerate(samples):
            rows.append(
                {
                    "sample_id": content_id("sample", p["problem_id"], req.prompt, req.seed, j, model),
                    "problem_id": p["problem_id"],
                    "sample_index": j,
                    "seed": req.seed,
                    "prompt": req.prompt,
                    "completion": s.text,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": s.num_tokens,
                    "finish_reason": s.finish_reason,
                    "model": model,
                }
            )
    write_shard(Path(run_dir) / "generate", index, make_table(rows, SAMPLES))
    return {"generate_s": elapsed}


# --- verify --------------------------------------------------------------------------------------------------------


@task(name="verify_samples", cache_key_fn=content_cache_key, persist_result=True, **RETRY)
def verify_shard(run_dir: str, index: int, stage_key: str, timeout_s: float, workers: int | None) -> dict[str, float]:
    """Verdicts for one shard of samples against the gold answers of the same problem shard."""
    if shard_exists(run_dir, "verify", index):
        return {"verify_s": 0.0}
    gold = {p["problem_id"]: p["answer"] for p in _read(run_dir, "problems", index, ["problem_id", "answer"])}
    samples = _read(run_dir, "generate", index, ["sample_id", "problem_id", "completion"])
    t0 = time.perf_counter()
    verdicts = verify_batch(
        [(gold[s["problem_id"]], s["completion"]) for s in samples], timeout_s=timeout_s, workers=workers
    )
    elapsed = time.perf_counter() - t0
    rows = [
        {
            "sample_id": s["sample_id"],
            "problem_id": s["problem_id"],
            "status": v.status,
            "is_correct": v.is_correct,
            "extracted": v.extracted,
        }
        for s, v in zip(samples, verdicts, strict=True)
    ]
    write_shard(Path(run_dir) / "verify", index, make_table(rows, VERDICTS))
    return {"verify_s": elapsed}


# --- checkpoints ---------------------------------------------------------------------------------------------------


@task(name="locate_checkpoints", cache_key_fn=content_cache_key, persist_result=True, **RETRY)
def checkpoint_shard(run_dir: str, index: int, stage_key: str, markers: list[str]) -> dict[str, float]:
    if shard_exists(run_dir, "checkpoints", index):
        return {}
    samples = _read(run_dir, "generate", index, ["sample_id", "problem_id", "completion", "completion_tokens"])
    verdicts = {v["sample_id"]: v["is_correct"] for v in _read(run_dir, "verify", index, ["sample_id", "is_correct"])}
    rows = []
    for s in samples:
        cps = locate_checkpoints(s["completion"], markers)
        rows.append(
            {
                "sample_id": s["sample_id"],
                "problem_id": s["problem_id"],
                "is_correct": verdicts[s["sample_id"]],
                "completion_tokens": s["completion_tokens"],
                "num_paragraphs": count_paragraphs(s["completion"]),
                "num_checkpoints": len(cps),
                "checkpoint_chars": [c.char for c in cps],
                "checkpoint_markers": [c.marker for c in cps],
            }
        )
    write_shard(Path(run_dir) / "checkpoints", index, make_table(rows, CHECKPOINTS))
    return {}


# --- resample ------------------------------------------------------------------------------------------------------


def load_trajectories(run_dir: str, index: int) -> dict[str, dict[str, Any]]:
    """Samples of one shard joined with their verdicts, checkpoints and gold answers, keyed by sample id."""
    gold = {p["problem_id"]: p["answer"] for p in _read(run_dir, "problems", index, ["problem_id", "answer"])}
    verdicts = {v["sample_id"]: v["status"] for v in _read(run_dir, "verify", index, ["sample_id", "status"])}
    cps = {c["sample_id"]: c["checkpoint_chars"] for c in _read(run_dir, "checkpoints", index)}
    out = {}
    for s in _read(run_dir, "generate", index):
        s["status"] = verdicts[s["sample_id"]]
        s["checkpoint_chars"] = cps[s["sample_id"]]
        s["gold_answer"] = gold[s["problem_id"]]
        out[s["sample_id"]] = s
    return out


def round_dir(round_index: int) -> str:
    return f"resample/round-{round_index:02d}"


@task(name="resample_round", cache_key_fn=content_cache_key, persist_result=True, **RETRY)
def resample_shard(
    run_dir: str, index: int, stage_key: str, round_index: int, resample: dict, backend: dict, timeout_s: float
) -> dict[str, float]:
    """One resampling round over one shard: continue unsatisfied slots, verify, write the attempts."""
    stage = round_dir(round_index)
    if shard_exists(run_dir, stage, index):
        return {"generate_s": 0.0, "verify_s": 0.0}
    cfg, bcfg = ResampleConfig(**resample), backend_config(**backend)
    trajectories = load_trajectories(run_dir, index)
    history: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in range(1, round_index):
        for a in _read(run_dir, round_dir(r), index, ["source_sample_id", "checkpoint_index", "status"]):
            history[(a["source_sample_id"], a["checkpoint_index"])].append(a)
    work = []
    for t in trajectories.values():
        for slot in plan_slots(t, cfg):
            n = draws_this_round(slot, history[slot_key(slot)], cfg)
            if n:
                work.append((slot, n))
    requests = build_requests(work, trajectories, cfg, round_index)
    generate_s = verify_s = 0.0
    rows: list[dict[str, Any]] = []
    if requests:
        with backend_session(bcfg) as b:
            t0 = time.perf_counter()
            results = b.generate(requests)
            generate_s = time.perf_counter() - t0
        items, owners = [], []
        for k, ((slot, _), res) in enumerate(zip(work, results, strict=True)):
            gold = trajectories[slot.source_sample_id]["gold_answer"]
            for s in res.samples:
                items.append((gold, s.text))
                owners.append(k)
        t0 = time.perf_counter()
        verdicts = verify_batch(items, timeout_s=timeout_s)
        verify_s = time.perf_counter() - t0
        per_request: dict[int, list] = defaultdict(list)
        for k, v in zip(owners, verdicts, strict=True):
            per_request[k].append(v)
        for k, ((slot, _), req, res) in enumerate(zip(work, requests, results, strict=True)):
            rows.extend(attempt_rows(slot, req, res.samples, per_request[k], round_index))
    write_shard(Path(run_dir) / stage, index, make_table(rows, ATTEMPTS))
    return {"generate_s": generate_s, "verify_s": verify_s}


@task(name="build_pairs", cache_key_fn=content_cache_key, persist_result=True, **RETRY)
def pairs_shard(
    run_dir: str, index: int, stage_key: str, rounds: int, resample: dict, backend: dict
) -> dict[str, Any]:
    """r2w / w2r pairs of one shard from all rounds' attempts."""
    if shard_exists(run_dir, "resample/pairs", index):
        return {}
    cfg, bcfg = ResampleConfig(**resample), backend_config(**backend)
    trajectories = load_trajectories(run_dir, index)
    attempts = [a for r in range(1, rounds + 1) for a in _read(run_dir, round_dir(r), index)]
    with backend_session(bcfg) as b:
        pairs, dropped = build_pairs(trajectories, attempts, cfg, b.count_tokens, model=b.model_id)
    write_shard(Path(run_dir) / "resample/pairs", index, make_table(pairs, PAIRS))
    return {"dropped": dropped}


# --- pairs: everything that makes pairs, in one stage --------------------------------------------------------------


@task(name="collect_pairs", **RETRY)
def collect_pairs(run_dir: str, sources: list[str]) -> dict[str, Any]:
    """`<run_dir>/pairs`: the union of the pair-producing stages (resample, dto), deduplicated by pair id."""
    inputs = fingerprints(run_dir, *sources)
    key = content_key("pairs", inputs)[:16]
    stage = Path(run_dir) / "pairs"
    if prepare_stage(stage, key):
        return read_manifest(stage)["stats"]
    seen: set[str] = set()
    index = 0
    for source in sources:
        for p in list_shards(Path(run_dir) / source):
            table = read_shard(p)
            ids = table.column("pair_id").to_pylist()
            keep = [i for i, pid in enumerate(ids) if pid not in seen]
            seen.update(ids)
            if keep:
                write_shard(stage, index, table.take(pa.array(keep, type=pa.int64())))
                index += 1
    generated = sum(
        (read_manifest(Path(run_dir) / s) or {}).get("stats", {}).get("generated_tokens", 0)
        for s in ("generate", "resample")
    )
    rows = _read_all(
        run_dir,
        "pairs",
        ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens", "rejected_tokens"],
    )
    stats = summary.summarize_pairs(rows, generated)
    write_manifest(stage, config_hash=key, stats=stats, inputs=inputs)
    return stats


# --- finalizing a stage --------------------------------------------------------------------------------------------


@task(name="finalize_stage", **RETRY)
def finalize_stage(plan: StagePlan, shard_results: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict:
    """Summarize the stage, write its manifest last, and its section of stats.json; publish a table artifact."""
    stats = dict(extra or {})
    columns = {
        "generate": ["problem_id", "completion_tokens", "finish_reason"],
        "verify": ["problem_id", "status"],
        "checkpoints": ["is_correct", "num_paragraphs", "num_checkpoints", "completion_tokens"],
    }
    fns = {
        "generate": summary.summarize_generate,
        "verify": summary.summarize_verify,
        "checkpoints": summary.summarize_checkpoints,
    }
    if plan.stage in fns:
        stats.update(fns[plan.stage](_read_all(plan.run_dir, plan.stage, columns[plan.stage])))
    elif plan.stage.startswith("resample/round-"):
        cols = ["direction", "source_sample_id", "checkpoint_index", "status", "finish_reason", "completion_tokens"]
        stats.update(summary.summarize_round(_read_all(plan.run_dir, plan.stage, cols)))
    if plan.stage == "generate":
        stats["generated_tokens"] = stats["completion_tokens"]
    for name in ("generate_s", "verify_s"):
        total = sum(r.get(name, 0.0) for r in shard_results)
        if total:
            stats[name] = round(total, 3)
    stats["wall_s"] = round(time.time() - plan.started, 3)
    write_manifest(plan.directory, config_hash=plan.key, stats=stats, inputs=plan.inputs)
    update_stats(plan.run_dir, plan.stage, stats)
    publish_table(plan.stage, stats)
    return stats


@task(name="finalize_resample", **RETRY)
def finalize_resample(plan: StagePlan, round_stats: list[dict[str, Any]], pair_results: list[dict[str, Any]]) -> dict:
    """The resample stage's manifest and stats: every round's outcomes, pairs by type, yield per 1k tokens."""
    rounds = [{"round": i, **s} for i, s in enumerate(round_stats, 1)]
    generated = sum(r["tokens"] for r in rounds)
    base = (read_manifest(Path(plan.run_dir) / "generate") or {}).get("stats", {}).get("generated_tokens", 0)
    rows = _read_all(
        plan.run_dir,
        "resample/pairs",
        ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens", "rejected_tokens"],
    )
    stats = {
        "rounds": rounds,
        "generated_tokens": generated,
        "dropped": dict(sum((Counter(r.get("dropped", {})) for r in pair_results), Counter())),
        "pairs": summary.summarize_pairs(rows, generated + base),
        "wall_s": round(time.time() - plan.started, 3),
    }
    for name in ("generate_s", "verify_s"):
        stats[name] = round(sum(r.get(name, 0.0) for r in rounds), 3)
    write_manifest(plan.directory, config_hash=plan.key, stats=stats, inputs=plan.inputs)
    update_stats(plan.run_dir, "resample", stats)
    publish_table("resample", {k: v for k, v in stats.items() if k != "rounds"})
    return stats


def publish_table(stage: str, stats: dict[str, Any]) -> None:
    """A flat key/value table artifact of a stage's statistics, for the Prefect UI."""
    rows = [{"metric": k, "value": str(v)} for k, v in _flatten(stats).items()]
    key = f"{stage.replace('/', '-').replace('_', '-')}-summary"
    create_table_artifact(table=rows, key=key, description=f"ckptdpo {stage} statistics")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(v) <= 12:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def backend_key(cfg: BackendConfig) -> dict[str, Any]:
    """The backend settings that change what is generated (not how fast)."""
    return cfg.model_dump(include={"kind", "model", "dtype", "loop_guard", "loop_min_repeats", "loop_ngram", "script"})


def checkpoint_config(markers: list[str]) -> dict[str, Any]:
    return CheckpointConfig(markers=markers).model_dump()
