"""Prefix reuse in the hf backend on the real demo model: the checkpoints of one trajectory share their prefix."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.hf import HFBackend
from ckptdpo.checkpoints import locate_checkpoints


@contextmanager
def reuse(backend: HFBackend, on: bool, **changes):
    """Switch prefix reuse (and backend settings) for one block; the backend is shared by the session."""
    old_reuse, old_cfg = backend.prefix_reuse, backend.cfg
    backend.prefix_reuse, backend.cfg = on, old_cfg.model_copy(update=changes)
    try:
        yield
    finally:
        backend.prefix_reuse, backend.cfg = old_reuse, old_cfg


def trajectory_requests(backend: HFBackend, route_key: str, checkpoints: int = 6) -> list[GenerationRequest]:
    """One request per checkpoint of a synthetic trajectory, as the resample stage builds them (text prompts)."""
    paragraphs = [f"Step {i}: {7 * i} plus {i} is {8 * i}." if i % 2 == 0 else "Wait, check it." for i in range(12)]
    completion = "\n\n".join(paragraphs[: 2 * checkpoints])
    chars = [c.char for c in locate_checkpoints(completion)]
    assert len(chars) == checkpoints
    prompt = backend.chat_prompt("What is 8 times 5?")
    return [
        GenerationRequest(
            prompt + completion[:c],
            n=2 if k < 2 else 1,
            seed=100 + k,
            max_tokens=8,
            temperature=0.8 if k % 2 else 0.0,
            top_p=0.95,
            route_key=route_key,
        )  # fmt: skip
        for k, c in enumerate(chars)
    ]


def token_ids(results) -> list[list[list[int]]]:
    return [[s.token_ids for s in r.samples] for r in results]


@pytest.mark.slow
def test_checkpoint_prefixes_are_computed_once_with_identical_continuations(hf_backend: HFBackend) -> None:
    requests = trajectory_requests(hf_backend, "traj-a")
    lengths = hf_backend.count_tokens([r.prompt for r in requests])
    with reuse(hf_backend, False):
        plain = hf_backend.generate(requests)
    with reuse(hf_backend, True):
        before = hf_backend.stats.prompt_tokens_computed
        shared = hf_backend.generate(requests)
        counted = hf_backend.stats.prompt_tokens_computed - before
    assert token_ids(shared) == token_ids(plain)
    assert [r.prompt_tokens_requested for r in shared] == lengths == [r.prompt_tokens_requested for r in plain]
    assert [r.prompt_tokens_computed for r in plain] == lengths  # without reuse every prompt is computed in full
    computed = sum(r.prompt_tokens_computed for r in shared)
    assert counted == computed
    # Every token of the longest prompt must be computed; each other checkpoint adds at most its boundary tokens.
    assert max(lengths) <= computed <= max(lengths) + 3 * len(lengths)
    assert sum(lengths) >= 3 * computed


@pytest.mark.slow
def test_reuse_across_groups_batches_and_plain_requests(hf_backend: HFBackend) -> None:
    a, b = trajectory_requests(hf_backend, "traj-a", 3), trajectory_requests(hf_backend, "traj-b", 4)
    lone = GenerationRequest(hf_backend.chat_prompt("Name a colour."), n=2, seed=5, max_tokens=6, temperature=1.0)
    requests = [a[0], b[0], lone, *a[1:], *b[1:], a[1]]  # interleaved, and one prompt sent twice
    with reuse(hf_backend, False, max_batch_size=4):
        plain = hf_backend.generate(requests)
    with reuse(hf_backend, True, max_batch_size=4):  # groups larger than a batch are split across batches
        shared = hf_backend.generate(requests)
    assert token_ids(shared) == token_ids(plain)
    assert all(r.error is None for r in shared)
    assert sum(r.prompt_tokens_computed for r in shared) < sum(r.prompt_tokens_computed for r in plain)
