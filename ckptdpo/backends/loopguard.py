"""Loop guard: notice, while a sample is generated, that it repeats a paragraph or a run of tokens, so it can stop.

Degenerate trajectories repeat one paragraph hundreds of times ("Wait, triangle AFE: same."); every further token
is wasted. Two incremental checks, each cheap per generated token:

- paragraph loop: the completed paragraphs (split at blank lines, whitespace-collapsed, lower-cased) end with a
  block of `period` paragraphs repeated `min_repeats` times back to back, for a period of 1 up to
  `max_paragraph_period` (so "A A A A" and "A B A B A B A B" both count). Checked only when a paragraph completes.
- token loop: the last tokens are periodic: the tail of `max(ngram, period) * min_repeats` tokens repeats a block of
  `period` tokens, for a period up to `max_token_period`. A period is proposed only when the last `ngram` tokens
  occurred before (one dict lookup per token), so the exact comparison runs only inside suspected loops.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence

PARAGRAPH_BREAK = "\n\n"
_PRIME = (1 << 61) - 1  # n-gram hashes (LoopGuard._add_token)
_BASE = 1_000_003


def normalize_paragraph(text: str) -> str:
    """What makes two paragraphs "the same": equal after collapsing whitespace and lower-casing."""
    return " ".join(text.split()).lower()


def paragraph_cycle(paragraphs: list[str], min_repeats: int, max_period: int) -> int | None:
    """The period of a block repeated `min_repeats` times at the end of `paragraphs` (normalized), or None."""
    for period in range(1, max_period + 1):
        span = period * min_repeats
        if span > len(paragraphs):
            break
        tail = paragraphs[-span:]
        block = tail[-period:]
        if block == [""] * period:
            continue
        if all(tail[i] == block[i % period] for i in range(span)):
            return period
    return None


def token_period(tokens: list[int], period: int, min_repeats: int, ngram: int) -> bool:
    """True when the tail of `max(ngram, period) * min_repeats` tokens repeats a `period`-token block."""
    span = max(ngram, period) * min_repeats
    if period < 1 or span > len(tokens):
        return False
    # A sequence is p-periodic exactly when it equals itself shifted by p.
    return tokens[-span + period :] == tokens[-span:-period]


class LoopGuard:
    """Incremental loop detector for one sample: feed each new token and its text; `reason` is set once looping."""

    def __init__(
        self,
        *,
        min_repeats: int = 4,
        ngram: int = 32,
        max_paragraph_period: int = 8,
        max_token_period: int | None = None,
        check_tokens: bool = True,
        check_paragraphs: bool = True,
    ) -> None:
        if min_repeats < 2 or ngram < 1:
            raise ValueError("min_repeats must be >= 2 and ngram >= 1")
        self.min_repeats = min_repeats
        self.ngram = ngram
        self.max_paragraph_period = max_paragraph_period
        self.max_token_period = max_token_period if max_token_period is not None else 8 * ngram
        self.check_tokens = check_tokens
        self.check_paragraphs = check_paragraphs
        self.reason: str | None = None  # "paragraph" or "ngram" once a loop was seen
        self._tokens: list[int] = []
        # hash of each n-gram -> where it last ended; int keys and values keep this to a few MB per 32k tokens
        self._seen: dict[int, int] = {}
        # The hash of the last n-gram, rolled forward one token at a time (a polynomial modulo a prime): a tuple of
        # the n-gram hashed afresh at every token cost most of a decode step's per-row Python.
        self._rolling = 0
        self._drop = pow(_BASE, ngram - 1, _PRIME)  # what the oldest token of the n-gram weighs
        # the paragraph being written, as chunks: joining only at a paragraph break keeps long paragraphs linear
        self._chunks: list[str] = []
        self._paragraphs: deque[str] = deque(maxlen=max_paragraph_period * min_repeats)

    @property
    def looping(self) -> bool:
        return self.reason is not None

    def update(self, token_id: int | None, text: str = "") -> bool:
        """Add one generated token (None: text only) and the text it produced; True once a loop is detected."""
        if self.reason is not None:
            return True
        if token_id is not None and self.check_tokens and self._add_token(token_id):
            self.reason = "ngram"
        elif text and self.check_paragraphs and self._add_text(text):
            self.reason = "paragraph"
        return self.reason is not None

    def feed(self, tokens: Iterable[int] = (), text: str = "") -> bool:
        """Add many tokens and/or a text chunk at once (for chunked backends); True once a loop is detected."""
        for t in tokens:
            if self.update(t):
                return True
        return self.update(None, text) if text else self.looping

    def add_tokens(self, tokens: Sequence[int]) -> int | None:
        """Add tokens without their text; the index of the first that proves a token loop, or None.

        The token checks of `update`, token by token, in one call (the hf backend's decode loop hands over each
        row's tokens a block at a time, after their text): they run even when the text already proved a loop, since
        a token loop can be proven at an earlier token of the block.
        """
        if not self.check_tokens:
            return None
        seen, past, n, drop, rolling = self._seen, self._tokens, self.ngram, self._drop, self._rolling
        for i, token in enumerate(tokens):
            if len(past) >= n:
                rolling -= (past[-n] + 1) * drop
            past.append(token)
            rolling = (rolling * _BASE + token + 1) % _PRIME
            end = len(past)
            if end < n:
                continue
            prev_end = seen.get(rolling)
            seen[rolling] = end
            # A hash collision only proposes a period; token_period compares the actual tokens.
            if (
                prev_end is not None
                and end - prev_end <= self.max_token_period
                and token_period(past, end - prev_end, self.min_repeats, n)
            ):
                self._rolling, self.reason = rolling, self.reason or "ngram"
                return i
        self._rolling = rolling
        return None

    def text_state(self) -> tuple[list[str], list[str]]:
        """The paragraph check's state, to be put back by `restore_text` (a decode loop checks a block's text at
        once and, only when it proves a loop, again piece by piece to find the token that did)."""
        return list(self._chunks), list(self._paragraphs)

    def restore_text(self, state: tuple[list[str], list[str]]) -> None:
        """Put back a `text_state`, and forget a paragraph loop seen since."""
        self._chunks = list(state[0])
        self._paragraphs = deque(state[1], maxlen=self._paragraphs.maxlen)
        if self.reason == "paragraph":
            self.reason = None

    def _add_token(self, token_id: int) -> bool:
        return self.add_tokens((token_id,)) is not None

    def _add_text(self, text: str) -> bool:
        spans_break = bool(self._chunks) and self._chunks[-1].endswith("\n") and text.startswith("\n")
        self._chunks.append(text)
        if PARAGRAPH_BREAK not in text and not spans_break:
            return False
        *done, partial = "".join(self._chunks).split(PARAGRAPH_BREAK)
        self._chunks = [partial] if partial else []
        for p in done:
            norm = normalize_paragraph(p)
            if not norm:  # runs of blank lines are not paragraphs
                continue
            self._paragraphs.append(norm)
            # After each paragraph, not once per chunk: a later paragraph of the same chunk can end the cycle.
            if paragraph_cycle(list(self._paragraphs), self.min_repeats, self.max_paragraph_period) is not None:
                return True
        return False


def find_loop(text: str, token_ids: Iterable[int] = (), *, min_repeats: int = 4, ngram: int = 32) -> str | None:
    """Scan a finished text (and its token ids) in one go: "paragraph", "ngram" or None."""
    guard = LoopGuard(min_repeats=min_repeats, ngram=ngram)
    guard.feed(token_ids, text)
    return guard.reason


_WORD = re.compile(r"\s*\S+|\s+")  # a word with the whitespace before it


def loop_cut(text: str, *, min_repeats: int, ngram: int) -> int | None:
    """Where a finished text is proven to loop, as a character offset to cut at, or None.

    Runs the LoopGuard over the text with words standing in for tokens (the server's token ids are
    not at hand), so the cut falls on a word boundary; a paragraph loop is cut at the break before the paragraph
    that completed the proof.
    """
    guard = LoopGuard(min_repeats=min_repeats, ngram=ngram)
    vocab: dict[str, int] = {}
    for m in _WORD.finditer(text):
        word = m.group().lstrip()
        if guard.update(vocab.setdefault(word, len(vocab)) if word else None, m.group()):
            if guard.reason == "paragraph":
                return text.rfind(PARAGRAPH_BREAK, 0, m.end())
            return m.end()
    return None
