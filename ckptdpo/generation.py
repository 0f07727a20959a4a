"""The generate stage's pure part: one request per problem, one SAMPLES row per sampled trajectory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ckptdpo.backends.base import GenerationRequest, GenerationResult
from ckptdpo.configs import GenerateConfig
from ckptdpo.resample import stable_seed
from ckptdpo.shards import content_id


def build_generation_requests(
    problems: Sequence[dict[str, Any]], cfg: GenerateConfig, chat_prompt: Callable[..., str]
) -> list[GenerationRequest]:
    """`num_samples` trajectories per problem (after the recipe's worked examples, when it has any), seeded by the
    problem's id, routed to one endpoint per problem."""
    few_shot = cfg.few_shot_pairs()
    return [
        GenerationRequest(
            prompt=chat_prompt(p["problem"], few_shot),
            n=cfg.num_samples,
            seed=stable_seed(p["problem_id"], cfg.seed),
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=tuple(cfg.stop),
            route_key=p["problem_id"],
        )
        for p in problems
    ]


def sample_rows(
    problems: Sequence[dict[str, Any]],
    requests: Sequence[GenerationRequest],
    results: Sequence[GenerationResult],
    model: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    """SAMPLES rows of the requests that succeeded, and the ids of the problems whose request failed."""
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for p, req, res in zip(problems, requests, results, strict=True):
        if res.error or not res.samples:
            failed.append(p["problem_id"])
            continue
        for j, s in enumerate(res.samples):
            rows.append(
                {
                    "sample_id": content_id("sample", p["problem_id"], req.prompt, req.seed, j, model),
                    "problem_id": p["problem_id"],
                    "sample_index": j,
                    "seed": req.seed,
                    "prompt": req.prompt,
                    "completion": s.text,
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": s.num_tokens,
                    "finish_reason": s.finish_reason,
                    "model": model,
                }
            )
    return rows, failed
