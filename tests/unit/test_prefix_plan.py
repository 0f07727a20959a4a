"""Batch planning for prefix reuse: requests of one route key stay in one batch, plain requests keep length order."""

from __future__ import annotations

from ckptdpo.backends.base import GenerationRequest, GenerationResult
from ckptdpo.backends.decode import Prepared, common_prefix_len, plan_batches


def prep(index: int, prompt_len: int, route_key: str | None, n: int = 1) -> Prepared:
    req = GenerationRequest((1,) * prompt_len, n=n, max_tokens=10, route_key=route_key)
    return Prepared(index, [1] * prompt_len, 10, req)


def batch_indices(batches) -> list[list[int]]:
    return [[u.prep.index for u in b] for b in batches]


def test_route_groups_stay_together_and_plain_requests_keep_length_order() -> None:
    # Two trajectories' checkpoints (lengths interleave) and two plain prompts.
    prepared = [prep(0, 50, "t1"), prep(1, 60, "t2"), prep(2, 100, "t1"), prep(3, 110, "t2"), prep(4, 20, None)]
    prepared.append(prep(5, 105, None))
    grouped = plan_batches(prepared, budget=10_000, max_rows=4, group_by_route=True)
    assert batch_indices(grouped) == [[4, 0, 2, 5], [1, 3]]  # a group is placed by its longest prompt
    # Without grouping: plain length order, which splits t2's checkpoints over two batches.
    assert batch_indices(plan_batches(prepared, budget=10_000, max_rows=4)) == [[4, 0, 1, 2], [5, 3]]
    best = grouped
    assert plan_batches(prepared, budget=10_000, max_rows=4, group_by_route=True) == best  # deterministic


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([2], [1]) == 0


def test_results_carry_prompt_token_accounting_defaults() -> None:
    res = GenerationResult(samples=[], prompt_tokens=5)
    assert (res.prompt_tokens_requested, res.prompt_tokens_computed) == (0, 0)  # 0: the backend does not know


def test_reserved_kv_layer_matches_concatenation_and_grows() -> None:
    import torch
    from transformers.cache_utils import DynamicLayer

    from ckptdpo.backends.decode import reserved_layer

    gen = torch.Generator().manual_seed(0)
    plain = DynamicLayer()
    plain.update(torch.randn(3, 2, 5, 4, generator=gen), torch.randn(3, 2, 5, 4, generator=gen))
    reserved = reserved_layer(plain, capacity=7)  # room for 2 more; the third step must grow the buffer
    for step in range(4):
        rows = plain.keys.shape[0]
        k, v = torch.randn(rows, 2, 1, 4, generator=gen), torch.randn(rows, 2, 1, 4, generator=gen)
        want, got = plain.update(k, v), reserved.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert reserved.get_seq_length() == plain.get_seq_length() == 6 + step
        if step == 1:
            keep = torch.tensor([2, 0])
            plain.batch_select_indices(keep)
            reserved.batch_select_indices(keep)
    assert reserved.keys.shape == (2, 2, 9, 4)
