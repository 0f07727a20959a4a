"""The hf backend's decode loop: batch planning, prefill (padded, or sharing prefixes), and token-by-token decoding.

Prefix sharing: the resample stage sends one request per checkpoint of a trajectory, and their prompts are nested
(the chat prompt plus the completion up to checkpoint 1, 2, ...). `prefill_shared` visits a batch's distinct prompts
in lexicographic token order, keeps one KV cache, and for each prompt crops that cache to the longest common token
prefix with the previous prompt and runs only the rest: the prompts' common parts are computed once (the order is
a depth-first walk of their token trie, which computes each trie node exactly once). Prefixes are compared as
token ids, not text, because a prefix cut before "Wait" can end in a different token than the same text followed
by more (BPE merges "\\n\\n" differently when text follows).
"""

from __future__ import annotations

import functools
import inspect
import random
from dataclasses import dataclass, field

import torch

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.loopguard import LoopGuard
from ckptdpo.backends.sampling import SamplingParams, left_pad_positions


class Detokenizer:
    """Incremental detokenization: decode a small window ending at the new token, emit only completed text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, ids: list[int]) -> str:
        # Decoding from one token back keeps leading spaces (sentencepiece) and joins multi-token UTF-8 characters.
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return full[len(prefix) :]
        return ""


@dataclass
class Prepared:
    index: int
    ids: list[int]
    max_new: int
    request: GenerationRequest


@dataclass
class Unit:
    """Samples [start, start+count) of one request: rows that share one prefill within a batch."""

    prep: Prepared
    start: int
    count: int

    @property
    def cost(self) -> int:
        return len(self.prep.ids) + self.prep.max_new


@dataclass
class Row:
    prep: Prepared
    sample_index: int
    rng: random.Random
    guard: LoopGuard | None
    detok: Detokenizer
    ids: list[int] = field(default_factory=list)
    tail: str = ""
    finish: str | None = None


def _order_key(prepared: list[Prepared], group_by_route: bool):
    """Sort key for units: similar lengths together; with `group_by_route`, a route key's requests stay adjacent.

    A group is placed by its longest prompt, so requests without a shared key keep the plain length order.
    """
    longest: dict[str, int] = {}
    first: dict[str, int] = {}
    if group_by_route:
        for p in prepared:
            key = p.request.route_key
            if key is not None:
                longest[key] = max(longest.get(key, 0), len(p.ids))
                first[key] = min(first.get(key, p.index), p.index)

    def key(u: Unit) -> tuple:
        rk = u.prep.request.route_key
        if rk in longest:
            return (longest[rk], first[rk], len(u.prep.ids), u.prep.max_new, u.prep.index, u.start)
        return (len(u.prep.ids), u.prep.index, len(u.prep.ids), u.prep.max_new, u.prep.index, u.start)

    return key


def plan_batches(
    prepared: list[Prepared], budget: int, max_rows: int, *, group_by_route: bool = False
) -> list[list[Unit]]:
    """Pack sample groups into batches under the row cap and the token budget (rows x longest prompt+new tokens).

    A request whose samples do not fit one batch is split into groups; each group pays its own prefill. A single
    row over the budget still runs, alone. With `group_by_route`, requests of one route key are kept adjacent so
    they land in the same batch and share their prefix (see the module docstring).
    """
    units: list[Unit] = []
    for p in prepared:
        cap = max(1, min(max_rows, budget // (len(p.ids) + p.max_new)))
        units += [Unit(p, s, min(cap, p.request.n - s)) for s in range(0, p.request.n, cap)]
    # The order is a function of the requests alone, so the same requests always form the same batches.
    units.sort(key=_order_key(prepared, group_by_route))
    batches: list[list[Unit]] = []
    cur: list[Unit] = []
    rows = longest = 0
    for u in units:
        new_rows, new_longest = rows + u.count, max(longest, u.cost)
        if cur and (new_rows > max_rows or new_rows * new_longest > budget):
            batches.append(cur)
            cur, new_rows, new_longest = [], u.count, u.cost
        cur.append(u)
        rows, longest = new_rows, new_longest
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Prefill:
    """The KV cache of a batch's distinct prompts, left-padded to one width, with each prompt's last logits."""

    cache: object  # transformers DynamicCache
    logits: torch.Tensor  # [P, V], float32
    mask: torch.Tensor  # [P, width]
    next_pos: torch.Tensor  # [P]: the position of each prompt's first new token
    computed: list[int]  # prompt tokens run through the model, per prompt


def prefill_padded(model, prompts: list[list[int]], pad_id: int, device: torch.device) -> Prefill:
    """One forward over all prompts, left-padded: each prompt is computed in full."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = left_pad_positions(mask)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_arg(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return Prefill(cache, out.logits[:, -1, :].float(), mask, positions[:, -1] + 1, [len(p) for p in prompts])


def cache_arg(model, cache) -> dict:
    """The KV cache as a forward keyword: `cache` from transformers 5.2x on (`past_key_values` warns, and goes in
    5.40), `past_key_values` before (where an unknown `cache` keyword would be swallowed and silently ignored)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def supports_prefix_sharing(model) -> bool:
    """Prefix sharing crops and copies plain full-attention KV layers; sliding-window or recurrent layers cannot."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.inference_mode()
def prefill_shared(model, prompts: list[list[int]], device: torch.device) -> Prefill:
    """Each prompt's KV cache, computing the common token prefixes of the prompts once (see the module docstring)."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    logits: list[torch.Tensor | None] = [None] * len(prompts)
    computed = [0] * len(prompts)
    chain = DynamicCache(config=model.config)
    prev: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        ids = prompts[i]
        # At least the last token is run, since its logits start the decoding.
        keep = min(common_prefix_len(prev, ids), len(ids) - 1)
        if chain.get_seq_length() > keep:
            chain.crop(keep - chain.get_seq_length())
        out = model(
            input_ids=torch.tensor([ids[keep:]], device=device),
            position_ids=torch.arange(keep, len(ids), device=device)[None],
            **cache_arg(model, chain),
            use_cache=True,
            logits_to_keep=1,
        )
        logits[i], computed[i], prev = out.logits[0, -1].float(), len(ids) - keep, ids
        for li, layer in enumerate(chain.layers):
            if not keys or li >= len(keys):
                shape = (len(prompts), layer.keys.shape[1], width, layer.keys.shape[3])
                keys.append(layer.keys.new_zeros(shape))
                values.append(layer.values.new_zeros(shape))
            keys[li][i, :, width - len(ids) :] = layer.keys[0]
            values[li][i, :, width - len(ids) :] = layer.values[0]
    del chain
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        mask[i, width - len(p) :] = 1
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))
    return Prefill(cache, torch.stack(logits), mask, next_pos, computed)  # type: ignore[arg-type]


class _Reserved:
    """A full-attention KV layer that writes each step in place into a buffer reserved for the whole decode.

    transformers' DynamicLayer appends with `torch.cat`, which copies the layer's whole cache every step: with long
    prefixes (the resample stage's) that copy moves more bytes than the weights themselves. Mixed into DynamicLayer
    by `reserved_layer`; its `keys` / `values` are views of the filled part, so the model reads them unchanged.
    """

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        m = key_states.shape[-2]
        if self._n + m > self._k.shape[-2]:  # past the reservation: grow by doubling (never on the planned path)
            self._k = torch.cat([self._k, torch.empty_like(self._k)], dim=-2)
            self._v = torch.cat([self._v, torch.empty_like(self._v)], dim=-2)
        self._k[:, :, self._n : self._n + m] = key_states
        self._v[:, :, self._n : self._n + m] = value_states
        self._n += m
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


@functools.cache
def _reserved_class() -> type:
    from transformers.cache_utils import DynamicLayer

    return type("ReservedLayer", (_Reserved, DynamicLayer), {})


def reserved_layer(layer, capacity: int):
    """A reserved copy of a filled DynamicLayer with room for `capacity` positions."""
    new = _reserved_class()()
    b, h, n, d = layer.keys.shape
    new._k = layer.keys.new_empty((b, h, max(capacity, n), d))
    new._v = layer.values.new_empty((b, h, max(capacity, n), layer.values.shape[-1]))
    new._k[:, :, :n], new._v[:, :, :n] = layer.keys, layer.values
    new._n, new.is_initialized, new.device = n, True, layer.keys.device
    new._views()
    return new


def reserve(cache, extra: int) -> None:
    """Give every plain full-attention layer of `cache` room for `extra` more positions, written in place."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = reserved_layer(layer, layer.keys.shape[-2] + extra)


def advance(row: Row, token: int, stop_len: int, eos_ids: frozenset[int]) -> bool:
    """Append a sampled token to an unfinished row and decide whether it finished; True when it is finished."""
    if row.finish is not None:
        return True
    row.ids.append(token)
    if token in eos_ids:
        row.finish = "stop"
        return True
    delta = row.detok.step(row.ids)
    stop = row.prep.request.stop
    if stop and delta:
        # Only a stop string that ends inside the new text can be new; keep just enough tail to see it.
        row.tail = (row.tail + delta)[-(stop_len + len(delta)) :]
        if any(s in row.tail for s in stop):
            row.finish = "stop"
            return True
        row.tail = row.tail[-stop_len:]
    if row.guard is not None and row.guard.update(token, delta):
        row.finish = "loop"
        return True
    if len(row.ids) >= row.prep.max_new:
        row.finish = "length"
        return True
    return False


@torch.inference_mode()
def decode_rows(
    model, pre: Prefill, rows: list[Row], row_src: list[int], eos_ids: frozenset[int], device: torch.device
) -> None:
    """Sample every row to its end; row j starts from prompt `row_src[j]` of the prefill."""
    cache = pre.cache
    reserve(cache, max(r.prep.max_new for r in rows))
    src = torch.tensor(row_src, device=device)
    cache.batch_select_indices(src)
    logits, mask, next_pos = pre.logits.index_select(0, src), pre.mask.index_select(0, src), pre.next_pos[src]
    params = SamplingParams([r.prep.request for r in rows], device)
    active = list(range(len(rows)))  # rows[active[j]] is batch row j
    stop_len = max((len(s) for r in rows for s in r.prep.request.stop), default=0)
    while True:
        tokens = params.sample(logits, [rows[i].rng.random() for i in active]).tolist()
        done = [j for j, i in enumerate(active) if advance(rows[i], tokens[j], stop_len, eos_ids)]
        if len(done) == len(active):
            break
        # Finished rows keep riding along (fed their last token) until they are a quarter of the batch: dropping a
        # row copies the whole KV cache, so it is worth doing in bulk, not row by row.
        step_tokens = torch.tensor(tokens, device=device)
        if done and len(done) * 4 >= len(active):
            keep_j = [j for j, i in enumerate(active) if rows[i].finish is None]
            keep = torch.tensor(keep_j, device=device)
            cache.batch_select_indices(keep)
            mask, next_pos, step_tokens = mask[keep], next_pos[keep], step_tokens[keep]
            params = params.select(keep)
            active = [active[j] for j in keep_j]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(
            input_ids=step_tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            **cache_arg(model, cache),
            use_cache=True,
        )
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
