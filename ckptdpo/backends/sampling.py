"""Per-sample random streams and batched inverse-CDF sampling with per-row temperature, top-p and top-k."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol

import torch

from ckptdpo.backends.base import GenerationRequest

# Tokens taken before sorting the whole vocabulary for top-p on a CPU (SamplingParams._nucleus).
NUCLEUS_K = 64


class HasStream(Protocol):
    """A sample being generated: its random stream and, once it has ended, why."""

    rng: random.Random
    finish: str | None


def sample_seed(seed: int, index: int) -> int:
    """The random stream of sample `index` of a request seeded with `seed`; independent of the batch it runs in."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_uniforms(rows: Sequence[HasStream], k: int, device: torch.device) -> torch.Tensor:
    """The next `k` uniforms of each row's stream, [rows, k] float32 (zeros for a row that has ended).

    A row draws one uniform per token it generates, so drawing a block ahead gives each token the number it would
    have drawn alone: the same seeds give the same tokens whatever the block. Rounded to float32 as one would be.
    """
    draws = [[r.rng.random() for _ in range(k)] if r.finish is None else [0.0] * k for r in rows]
    return torch.tensor(draws, dtype=torch.float32).to(device)


class SamplingParams:
    """Per-row temperature / top-p / top-k as tensors, so one batch can mix requests with different settings.

    Each row samples as it would alone: a row with top-p < 1 inverts its CDF over the tokens in descending order of
    probability, a row without over the tokens in id order, whatever the other rows of the batch use.
    """

    def __init__(self, requests: list[GenerationRequest], device: torch.device) -> None:
        self.temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([r.top_k if r.top_k > 0 else 0 for r in requests], dtype=torch.long, device=device)
        self._flags()

    def _flags(self) -> None:
        self.all_greedy = bool((self.temperature == 0).all())
        self.any_greedy = bool((self.temperature == 0).any())
        nucleus = self.top_p < 1
        self.any_top_p = bool(nucleus.any())
        # Rows of each kind, when the batch mixes both (found once here, not at every step).
        self.mixed_top_p = self.any_top_p and not bool(nucleus.all())
        self.nucleus_rows, self.plain_rows = nucleus.nonzero()[:, 0], (~nucleus).nonzero()[:, 0]
        self.max_top_k = int(self.top_k.max()) if self.top_k.numel() else 0

    def select(self, keep: torch.Tensor) -> SamplingParams:
        new = object.__new__(SamplingParams)
        new.temperature, new.top_p, new.top_k = self.temperature[keep], self.top_p[keep], self.top_k[keep]
        new._flags()
        return new

    def sample(self, logits: torch.Tensor, u: list[float] | torch.Tensor | None) -> torch.Tensor:
        """One token per row: argmax for temperature 0, else inverse-CDF sampling with the row's uniform `u` (a list
        or a float32 tensor of the same numbers; None only when every row is greedy)."""
        if self.all_greedy:
            return logits.argmax(-1)
        scaled = logits / self.temperature.clamp(min=1e-6)[:, None]
        vocab = scaled.shape[-1]
        if self.max_top_k > 0 and self.max_top_k < vocab:
            kth_values = torch.topk(scaled, self.max_top_k, dim=-1).values
            k = self.top_k.clamp(max=self.max_top_k)
            kth = kth_values.gather(1, (k - 1).clamp(min=0)[:, None])
            drop = (scaled < kth) & (k > 0)[:, None]
            scaled = scaled.masked_fill(drop, -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        u = (
            u.to(probs.dtype)
            if isinstance(u, torch.Tensor)
            else torch.tensor(u, dtype=probs.dtype, device=probs.device)
        )
        if self.mixed_top_p:
            picked = torch.empty(len(probs), dtype=torch.long, device=probs.device)
            rows, plain = self.nucleus_rows, self.plain_rows
            picked[rows] = self._nucleus(probs[rows], u[rows], self.top_p[rows])
            picked[plain] = _inverse_cdf(probs[plain], u[plain])
        elif self.any_top_p:
            picked = self._nucleus(probs, u, self.top_p)
        else:
            picked = _inverse_cdf(probs, u)
        if self.any_greedy:
            picked = torch.where(self.temperature == 0, logits.argmax(-1), picked)
        return picked

    @staticmethod
    def _nucleus(probs: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Top-p sampling: the inverse CDF over the probabilities in descending order, those past each row's top_p
        zeroed (the smallest prefix whose mass reaches top_p stays; the first token always does).

        On a CPU, sorting the whole vocabulary costs more than a small model's forward (2.3 s for 512 rows of 49k
        tokens on one core), while the nucleus of a trained model is mostly a few tokens: the top NUCLEUS_K are
        taken first, and only the rows whose nucleus is larger are sorted in full. Both give the inverse CDF the same
        numbers. On a GPU the sort is cheap and asking which rows fit would stall the queue, so it always sorts.
        """
        if probs.device.type == "cpu" and NUCLEUS_K < probs.shape[-1]:
            top, order = probs.topk(NUCLEUS_K, dim=-1)
            fits = (top.cumsum(-1) - top)[:, -1] >= top_p
            if bool(fits.all()):
                return _inverse_cdf(_cut(top, top_p), u, order)
            picked = torch.empty(len(probs), dtype=torch.long)
            rows, wide = fits.nonzero()[:, 0], (~fits).nonzero()[:, 0]
            picked[rows] = _inverse_cdf(_cut(top[rows], top_p[rows]), u[rows], order[rows])
            ranked, order = probs[wide].sort(dim=-1, descending=True)
            picked[wide] = _inverse_cdf(_cut(ranked, top_p[wide]), u[wide], order)
            return picked
        ranked, order = probs.sort(dim=-1, descending=True)
        return _inverse_cdf(_cut(ranked, top_p), u, order)


def _cut(ranked: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities in descending order with those after the first prefix whose mass reaches top_p zeroed."""
    return ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p[:, None], 0.0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """The column where each row's uniform falls in its (unnormalized) CDF; through `order` when given."""
    cdf = probs.cumsum(-1)
    # Slightly below the total, so rounding never points past the last token with mass.
    target = u[:, None] * cdf[:, -1:] * (1 - 1e-6)
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    if order is not None:
        picked = order.gather(1, picked)
    return picked[:, 0]


def left_pad_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (padding gets 1, as generate does)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
