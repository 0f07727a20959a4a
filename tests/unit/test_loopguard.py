"""The loop guard on synthetic trajectories: paragraph loops, cycles, token loops, and text that must not trip it."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdpo.backends.loopguard import LoopGuard, find_loop, normalize_paragraph, paragraph_cycle, token_period

REASONING = (
    "First, compute the area of the triangle.\n\n"
    "The base is 6 and the height is 4, so the area is 12.\n\n"
    "Wait, the problem asks for the perimeter, not the area.\n\n"
    "The sides are 3, 4 and 5, so the perimeter is 12.\n\n"
    "But let me double-check the side lengths.\n\n"
    "Yes: 3, 4 and 5.\n\n"
    "So the answer is \\boxed{12}."
)


def feed_text(guard: LoopGuard, text: str, chunk: int = 3) -> int | None:
    """Feed text in chunks (no tokens); return the character count consumed when the guard tripped."""
    for i in range(0, len(text), chunk):
        if guard.update(None, text[i : i + chunk]):
            return i + chunk
    return None


def test_repeated_paragraph_is_a_loop_at_the_fourth_copy() -> None:
    para = "Wait, triangle AFE: same.\n\n"
    guard = LoopGuard(min_repeats=4)
    assert feed_text(guard, "Let me check.\n\n" + para * 3, chunk=1) is None
    assert not guard.looping
    assert feed_text(guard, para, chunk=1) == len(para)
    assert guard.reason == "paragraph"


def test_a_cycle_of_two_paragraphs_is_a_loop() -> None:
    block = "Wait, is AB = AC?\n\nYes, AB = AC.\n\n"
    assert find_loop(block * 3 + "Wait, is AB = AC?\n\n") is None
    assert find_loop(block * 4) == "paragraph"


def test_paragraphs_are_compared_after_normalization() -> None:
    text = "Wait,  same.\n\nwait, same.\n\n  WAIT, same. \n\nWait,\nsame.\n\n"
    assert find_loop(text) == "paragraph"
    assert normalize_paragraph("  A \n b ") == "a b"


def test_blank_line_runs_are_not_paragraphs() -> None:
    assert find_loop("A\n\n\n\n\n\n\n\nB\n\n" * 2) is None
    assert paragraph_cycle(["", "", "", ""], 4, 8) is None


def test_honest_reasoning_does_not_trip_the_guard() -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(3000)]
    assert find_loop(REASONING, tokens) is None


def test_chunking_does_not_change_where_a_paragraph_loop_is_seen() -> None:
    para = "Hmm, same as before.\n\n"
    text = REASONING + "\n\n" + para * 5
    fourth_break_end = len(REASONING) + 2 + 4 * len(para)
    for chunk in (1, 2, 5, 17, 1000):
        end = feed_text(LoopGuard(), text, chunk)
        # Seen in the chunk that completes the 4th copy's paragraph break, whatever the chunking.
        assert end is not None and end - chunk < fourth_break_end <= end


def test_token_loop_needs_the_whole_span() -> None:
    rng = random.Random(1)
    prefix = [rng.randrange(1000, 2000) for _ in range(50)]
    block = [7, 8, 9, 10, 11]
    guard = LoopGuard(min_repeats=4, ngram=32)
    stream = prefix + block * 40
    tripped = next(i for i, t in enumerate(stream, 1) if guard.update(t))
    # span = ngram * min_repeats = 128 periodic tokens after the prefix
    assert tripped == len(prefix) + 128
    assert guard.reason == "ngram"


def test_long_period_token_loop() -> None:
    rng = random.Random(2)
    block = [rng.randrange(100) for _ in range(40)]
    guard = LoopGuard(min_repeats=4, ngram=32)
    stream = block * 6
    tripped = next(i for i, t in enumerate(stream, 1) if guard.update(t))
    assert tripped == 4 * 40  # a period over the n-gram size needs min_repeats copies of the period


def test_token_check_can_be_switched_off() -> None:
    guard = LoopGuard(check_tokens=False)
    assert not guard.feed([5] * 500)
    assert LoopGuard().feed([5] * 500)


def test_token_period() -> None:
    assert token_period([1, 2] * 8, 2, 4, 4)
    assert not token_period([1, 2] * 7 + [1, 3], 2, 4, 4)
    assert not token_period([1, 2] * 3, 2, 4, 4)  # shorter than the span


def brute_force_loop(tokens: list[int], min_repeats: int, ngram: int, max_period: int) -> bool:
    return any(token_period(tokens, p, min_repeats, ngram) for p in range(1, max_period + 1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=300),
    st.integers(2, 4),
    st.integers(4, 8),
)
def test_token_loop_is_only_reported_when_the_tail_is_periodic(tokens: list[int], repeats: int, ngram: int) -> None:
    guard = LoopGuard(min_repeats=repeats, ngram=ngram, check_paragraphs=False)
    for i, t in enumerate(tokens, 1):
        if guard.update(t):
            assert brute_force_loop(tokens[:i], repeats, ngram, guard.max_token_period)
            return


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=0, max_size=60),
    st.lists(st.integers(100, 200), min_size=1, max_size=20, unique=True),
)
def test_a_pure_token_loop_is_always_caught(prefix: list[int], block: list[int]) -> None:
    guard = LoopGuard(min_repeats=3, ngram=8, check_paragraphs=False)
    stream = prefix + block * 60
    tripped = next((i for i, t in enumerate(stream, 1) if guard.update(t)), None)
    assert tripped is not None
    assert tripped <= len(prefix) + max(8, len(block)) * 3 + len(block)


def test_a_chunk_of_several_paragraphs_is_checked_after_each() -> None:
    # The fourth copy completes the loop; a fifth, different paragraph in the same chunk must not hide it.
    guard = LoopGuard(min_repeats=4)
    assert guard.update(None, "Same.\n\n" * 4 + "Other.\n\n")
    assert guard.reason == "paragraph"


def test_add_tokens_finds_the_token_update_would_stop_at() -> None:
    rng = random.Random(3)
    stream = [rng.randrange(1000) for _ in range(40)] + [7, 8, 9] * 60
    one_by_one = LoopGuard(min_repeats=3, ngram=8)
    want = next(i for i, t in enumerate(stream) if one_by_one.update(t))
    blocks = LoopGuard(min_repeats=3, ngram=8)
    seen = None
    for start in range(0, len(stream), 16):
        at = blocks.add_tokens(stream[start : start + 16])
        if at is not None:
            seen = start + at
            break
    assert seen == want and blocks.reason == "ngram"


def test_text_state_puts_the_paragraph_check_back() -> None:
    guard = LoopGuard(min_repeats=2)
    guard.update(None, "Same.\n\nSame")
    state = guard.text_state()
    assert guard.update(None, ".\n\n") and guard.reason == "paragraph"
    guard.restore_text(state)
    assert not guard.looping
    assert guard.update(None, ".\n") is False
    assert guard.update(None, "\n")  # the same loop, found again from the restored state
