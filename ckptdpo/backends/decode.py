"""The hf backend's decode loop: batch planning, prefill (padded, or sharing prefixes), and token-by-token decoding.

Prefix sharing: the resample stage sends one request per checkpoint of a trajectory, and their prompts are nested
(the chat prompt plus the completion up to checkpoint 1, 2, ...). `prefill_shared` visits a batch's distinct prompts
in lexicographic token order, keeps one KV cache, and for each prompt crops that cache to the longest common token
prefix with the previous prompt and runs only the rest: the prompts' common parts are computed once (the order is
a depth-first walk of their token trie, which computes each trie node exactly once). Prefixes are compared as
token ids, not text, because a prefix cut before "Wait" can end in a different token than the same text followed
by more (BPE merges "\\n\\n" differently when text follows). Only the prompts of one route key are chained so
(`prefill_batch`), since a chain costs a forward per prompt; the other prompts of a batch have their common head
computed once and their rests in padded forwards of similar length.

Decoding runs in blocks of `BLOCK` steps. Within a block a step is a few tensor operations for all rows (sample with
each row's uniforms, drawn ahead from its own stream; the next forward) and nothing waits for the host: every row
takes a token at every step. After a block the host reads the new tokens once and ends each row where checking
token by token would have: EOS, a stop string, the loop guard, the length limit (`advance_block`; the tokens computed
after the end are dropped). The attention mask and the KV cache are reserved for the whole decode, so a step's
bookkeeping costs the same at token 30,000 as at token 30. With `backend.compile` the KV cache is static and the
step goes through torch.compile (`CompiledDecode`: CUDA graphs on a GPU).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.loopguard import LoopGuard
from ckptdpo.backends.sampling import SamplingParams, draw_uniforms, left_pad_positions

log = logging.getLogger(__name__)

# Prompt tokens a batch's common head must save (rows - 1 times its length) to be computed apart, once, and the
# share of padded prompt tokens a split of the other prompts by length must save: below, the extra forward costs
# more than it saves. A CPU pays for every token; a GPU mostly for every forward it launches.
HEAD_MIN_SAVING = {"cpu": 64, "other": 8192}
SPLIT_MIN_SAVING = {"cpu": 0.1, "other": 0.3}

# Decode steps between two looks of the host at the new tokens: enough to make the per-row Python of a step small,
# few enough that a row ended by a stop string or the loop guard computes little past its end.
BLOCK = 16


class TextDecoder:
    """Token ids to text exactly as `tokenizer.decode(ids, skip_special_tokens=True)` gives it, straight through the
    Rust tokenizer when that is all transformers would do (a fast tokenizer that cleans nothing up): transformers
    first checks every id in Python, which costs more than the decoding."""

    def __init__(self, tokenizer) -> None:
        from transformers import PreTrainedTokenizerFast

        fast = getattr(tokenizer, "backend_tokenizer", None)
        direct = (
            fast is not None
            and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        )
        self.tokenizer, self._fast = tokenizer, fast if direct else None

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        if self._fast is not None:
            return self._fast.decode_batch(batch, skip_special_tokens=True)
        return self.tokenizer.batch_decode(batch, skip_special_tokens=True)


class Detokenizer:
    """Incremental detokenization: decode a small window ending at the new token, emit only completed text."""

    def __init__(self, texts: TextDecoder) -> None:
        self.texts = texts
        self.prefix_offset = 0
        self.read_offset = 0
        self.cut = False  # the last window decoded ended in a cut character

    def step(self, ids: list[int], end: int | None = None) -> str:
        """The text completed by the tokens read since the last call, up to `ids[:end]` (default: all of `ids`);
        nothing while the last character is cut (its rest comes with later tokens)."""
        end = len(ids) if end is None else end
        # Decoding from one token back keeps leading spaces (sentencepiece) and joins multi-token UTF-8 characters.
        prefix = self.texts.decode(ids[self.prefix_offset : self.read_offset])
        full = self.texts.decode(ids[self.prefix_offset : end])
        self.cut = full.endswith("\ufffd")
        if len(full) > len(prefix) and not self.cut:
            self.prefix_offset, self.read_offset = self.read_offset, end
            return full[len(prefix) :]
        return ""

    def read(self, ids: list[int]) -> str:
        """The text completed by all the tokens since the last call: what `step` gives token by token, joined (a
        character cut at the end holds back only the tokens that carry it, not the text before them)."""
        end = len(ids)
        while end > self.read_offset:
            text = self.step(ids, end)
            if text or not self.cut:
                return text
            end -= 1
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
    held: bool = False  # the detokenizer holds back text (a character not yet complete) that must be read next


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


def prefill_padded(
    model, prompts: list[list[int]], pad_id: int, device: torch.device, head: Prefill | None = None
) -> Prefill:
    """One forward over all prompts, left-padded: each prompt is computed in full, or after `head` (the prefill of
    the first tokens, which every prompt starts with: `prefill_head`) only the rest of it."""
    from transformers import DynamicCache

    skip = head.mask.shape[1] if head is not None else 0
    rests = [p[skip:] for p in prompts]
    width = max(len(r) for r in rests)
    input_ids = torch.full((len(rests), width), pad_id, dtype=torch.long)
    rest_mask = torch.zeros((len(rests), width), dtype=torch.long)
    for i, r in enumerate(rests):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        rest_mask[i, width - len(r) :] = 1
    positions = left_pad_positions(rest_mask) + skip
    mask = torch.cat([torch.ones((len(rests), skip), dtype=torch.long), rest_mask], dim=1)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    if head is None:
        cache = DynamicCache(config=model.config)
    else:  # the head's one row, once per prompt
        rows = len(rests)
        kv = [(x.keys.expand(rows, -1, -1, -1), x.values.expand(rows, -1, -1, -1)) for x in head.cache.layers]
        cache = DynamicCache(ddp_cache_data=kv)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_arg(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return Prefill(cache, out.logits[:, -1, :].float(), mask, positions[:, -1] + 1, [len(r) for r in rests])


def prefill_head(model, prompt: list[int], device: torch.device) -> Prefill:
    """The prefill of one prompt's first tokens alone (no logits needed: its rest follows)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(
        input_ids=torch.tensor([prompt], device=device),
        position_ids=torch.arange(len(prompt), device=device)[None],
        **cache_arg(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    mask = torch.ones((1, len(prompt)), dtype=torch.long, device=device)
    return Prefill(cache, torch.empty(0), mask, torch.tensor([len(prompt)]), [len(prompt)])


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


def prefill_batch(
    model, prompts: list[list[int]], route_keys: list[str | None], pad_id: int, device: torch.device, *, share: bool
) -> Prefill:
    """The prefill of a batch's distinct prompts: with `share`, the prompts of one route key share their common
    prefixes (`prefill_shared`), and the others their common head; those run in padded forwards of prompts of
    similar length (`prefill_padded`, `split_by_length`)."""
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(route_keys):
        groups.setdefault(key if share and key is not None else (None, i), []).append(i)
    chains = [g for g in groups.values() if len(g) > 1]
    plain = sorted(i for g in groups.values() if len(g) == 1 for i in g)
    head, skip, kind = None, 0, "cpu" if device.type == "cpu" else "other"
    if share and len(plain) > 1:
        # The prompts' common head (a chat template's system turn, say) is computed once when that saves enough.
        ordered = sorted(prompts[i] for i in plain)
        skip = min(common_prefix_len(ordered[0], ordered[-1]), min(len(prompts[i]) for i in plain) - 1)
        if (len(plain) - 1) * skip >= HEAD_MIN_SAVING[kind]:
            head = prefill_head(model, ordered[0][:skip], device)
        else:
            skip = 0
    parts = []
    for part in split_by_length([len(prompts[i]) - skip for i in plain], min_saving=SPLIT_MIN_SAVING[kind]):
        ids = [plain[j] for j in part]
        parts.append((ids, prefill_padded(model, [prompts[i] for i in ids], pad_id, device, head)))
    parts += [(g, prefill_shared(model, [prompts[i] for i in g], device)) for g in chains]
    merged = merge_prefills(parts)
    if head is not None:
        merged.computed[plain[0]] += skip
    return merged


def split_by_length(lengths: list[int], max_parts: int = 4, min_saving: float = 0.1) -> list[list[int]]:
    """Positions of `lengths` in groups of similar length, each prefilled in its own padded forward.

    Padding every prompt to the longest computes the pad positions too; on a CPU that is compute wasted. A group is
    split (at most into `max_parts`) where the split saves at least `min_saving` of the padded tokens left.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    cuts = [0, len(order)]  # part k is order[cuts[k]:cuts[k+1]], ascending lengths, so its last is its longest
    while len(cuts) <= max_parts:
        padded = sum((b - a) * sizes[b - 1] for a, b in pairwise(cuts))
        saving, at = 0, None
        for a, b in pairwise(cuts):
            for c in range(a + 1, b):
                saved = (c - a) * (sizes[b - 1] - sizes[c - 1])
                if saved > saving:
                    saving, at = saved, c
        if at is None or saving < min_saving * padded:
            break
        cuts = sorted([*cuts, at])
    return [order[a:b] for a, b in pairwise(cuts)]


def merge_prefills(parts: list[tuple[list[int], Prefill]]) -> Prefill:
    """One prefill from parts that each hold some of the prompts (`parts[k][0]`: which), left-padded to one width."""
    from transformers import DynamicCache

    order = [i for idx, _ in parts for i in idx]
    if len(parts) == 1 and order == sorted(order):
        return parts[0][1]
    where = torch.tensor(sorted(range(len(order)), key=order.__getitem__))
    width = max(p.mask.shape[1] for _, p in parts)

    def stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        # Pad each part on the left of `dim` to the common width, join the parts, put the prompts back in order.
        padded = []
        for t in tensors:
            pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [width - t.shape[dim], 0]
            padded.append(torch.nn.functional.pad(t, pad))
        joined = torch.cat(padded)
        return joined.index_select(0, where.to(joined.device))

    pres = [p for _, p in parts]
    layers = []
    for li in range(len(pres[0].cache.layers)):
        keys = stack([p.cache.layers[li].keys for p in pres], 2)
        values = stack([p.cache.layers[li].values for p in pres], 2)
        layers.append((keys, values))
    mask = stack([p.mask for p in pres], 1)
    logits = torch.cat([p.logits for p in pres]).index_select(0, where.to(pres[0].logits.device))
    next_pos = torch.cat([p.next_pos for p in pres]).index_select(0, where.to(pres[0].next_pos.device))
    computed = [0] * len(order)
    for i, n in zip(order, [n for p in pres for n in p.computed], strict=True):
        computed[i] = n
    return Prefill(DynamicCache(ddp_cache_data=layers), logits, mask, next_pos, computed)


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


def reserved_layer(layer, capacity: int, rows: torch.Tensor | None = None):
    """A reserved copy of a filled DynamicLayer with room for `capacity` positions (of its batch rows `rows`)."""
    new = _reserved_class()()
    keys, values = layer.keys, layer.values
    if rows is not None:
        keys, values = keys.index_select(0, rows), values.index_select(0, rows)
    b, h, n, d = keys.shape
    new._k = keys.new_empty((b, h, max(capacity, n), d))
    new._v = values.new_empty((b, h, max(capacity, n), values.shape[-1]))
    new._k[:, :, :n], new._v[:, :, :n] = keys, values
    new._n, new.is_initialized, new.device = n, True, keys.device
    new._views()
    return new


def reserve(cache, extra: int, rows: torch.Tensor | None = None) -> None:
    """Give every plain full-attention layer of `cache` room for `extra` more positions, written in place; with
    `rows`, keep (and repeat) those batch rows, in that order."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = reserved_layer(layer, layer.keys.shape[-2] + extra, rows)
        elif rows is not None:
            layer.batch_select_indices(rows)


# --- the host's look at a block of new tokens ------------------------------------------------------------------


def advance_block(
    row: Row, tokens: list[int], stop_len: int, eos_ids: frozenset[int], newline_ids: frozenset[int] | None = None
) -> None:
    """Append tokens sampled for an unfinished row, and finish the row at the first token that ends it.

    Each token is checked as it would be alone, in this order: EOS ("stop"), a stop string ending in its text
    ("stop"), the loop guard ("loop"), the length limit ("length"); the tokens after the one that ended the row are
    dropped. The block's text is decoded and checked once; only when it holds a stop string or proves a paragraph
    loop is it decoded again token by token, to find the token that did. `newline_ids` (`newline_tokens`): a row
    without stop strings has its text decoded only in blocks that hold one of these, since a paragraph can only end
    there; the text in between is read with the next such block.
    """
    base = len(row.ids)
    cut = min(len(tokens), row.prep.max_new - base)
    if cut <= 0:
        return
    eos = next((i for i in range(cut) if tokens[i] in eos_ids), None)
    body = tokens[: cut if eos is None else eos]
    row.ids.extend(body)
    # (token index, rank, finish reason): the earliest token ends the row; at one token, the lowest rank.
    ends: list[tuple[int, int, str]] = []
    if eos is not None:
        ends.append((eos, 0, "stop"))
    elif base + cut >= row.prep.max_new:
        ends.append((cut - 1, 3, "length"))
    if body:
        ends += _text_ends(row, base, body, stop_len, newline_ids)
        if row.guard is not None:
            at = row.guard.add_tokens(body)
            if at is not None:
                ends.append((at, 2, "loop"))
    if ends:
        at, _, reason = min(ends)
        del row.ids[base + at + 1 :]
        if at == eos:
            row.ids.append(tokens[at])
        row.finish = reason


def _text_ends(
    row: Row, base: int, body: list[int], stop_len: int, newline_ids: frozenset[int] | None
) -> list[tuple[int, int, str]]:
    """Where the text of the row's new tokens `body` (from `base` on) ends the row: a stop string, a paragraph loop."""
    stop = row.prep.request.stop
    guard = row.guard if row.guard is not None and row.guard.check_paragraphs else None
    if not stop and guard is None:
        return []
    if not stop and newline_ids is not None and not row.held and newline_ids.isdisjoint(body):
        return []
    offsets, tail = (row.detok.prefix_offset, row.detok.read_offset), row.tail
    delta = row.detok.read(row.ids)
    row.held = row.detok.read_offset < len(row.ids)
    if not delta:
        return []
    ends: list[tuple[int, int, str]] = []
    first, pieces = 0, None  # pieces[i]: the text token first + i gives, read token by token
    if stop:
        seen = (tail + delta)[-(stop_len + len(delta)) :]
        if any(s in seen for s in stop):
            first, pieces = _pieces(row, offsets)
            ends.append((max(_stop_at(pieces, tail, stop, stop_len) + first - base, 0), 1, "stop"))
        row.tail = seen[-stop_len:]
    if guard is not None:
        state = guard.text_state()
        if guard.update(None, delta):
            if pieces is None:
                first, pieces = _pieces(row, offsets)
            guard.restore_text(state)
            at = next((i for i, p in enumerate(pieces) if p and guard.update(None, p)), None)
            if at is None:  # a tokenizer whose pieces do not join to the block's text: the block's last token
                guard.reason, at = "paragraph", len(pieces) - 1
            ends.append((max(at + first - base, 0), 2, "loop"))
    return ends


def _pieces(row: Row, offsets: tuple[int, int]) -> tuple[int, list[str]]:
    """The text of each of the row's tokens not yet read at the detokenizer state `offsets`, decoded one by one (the
    text `Detokenizer.step` gives token by token), and the index of the first of them."""
    detok = Detokenizer(row.detok.texts)
    detok.prefix_offset, detok.read_offset = offsets
    first = detok.read_offset
    return first, [detok.step(row.ids, end) for end in range(first + 1, len(row.ids) + 1)]


def newline_tokens(tokenizer, vocab_size: int) -> frozenset[int]:
    """The ids whose text holds a line break: the only tokens that can complete a paragraph (see `advance_block`).

    Every id is decoded alone once (a second for a 150k vocabulary). A "\\n" is one byte, whole in any byte-level or
    byte-fallback token, so a token that gives one in context gives one alone.
    """
    ids = [[i] for i in range(min(vocab_size, len(tokenizer)))]
    fast = getattr(tokenizer, "backend_tokenizer", None)
    texts = fast.decode_batch(ids, skip_special_tokens=False) if fast is not None else tokenizer.batch_decode(ids)
    return frozenset(i for i, text in enumerate(texts) if "\n" in text)


def _stop_at(pieces: list[str], tail: str, stop: tuple[str, ...], stop_len: int) -> int:
    """The index of the piece whose text completes a stop string (the last one when none does)."""
    for i, piece in enumerate(pieces):
        if piece:
            tail = (tail + piece)[-(stop_len + len(piece)) :]
            if any(s in tail for s in stop):
                return i
            tail = tail[-stop_len:]
    return len(pieces) - 1


# --- the decode loop ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def decode_rows(
    model,
    pre: Prefill,
    rows: list[Row],
    row_src: list[int],
    eos_ids: frozenset[int],
    device: torch.device,
    *,
    compiled: CompiledDecode | None = None,
    newline_ids: frozenset[int] | None = None,
    block: int | None = None,
) -> None:
    """Sample every row to its end; row j starts from prompt `row_src[j]` of the prefill (see the module docstring).

    `newline_ids`: see `advance_block`. `block`: decode steps between two looks of the host at the new tokens
    (default `BLOCK`).
    """
    block = block or BLOCK
    src = torch.tensor(row_src, device=device)
    longest = max(r.prep.max_new for r in rows)
    steps = compiled.steps(pre, src, longest) if compiled is not None else None
    if steps is None:
        steps = _ReservedSteps(model, pre, src, longest)
    pre.cache = None  # its rows are copied into the decode's cache
    logits, pos = pre.logits.index_select(0, src), pre.next_pos.index_select(0, src)
    params = SamplingParams([r.prep.request for r in rows], device)
    stop_len = max((len(s) for r in rows for s in r.prep.request.stop), default=0)
    # On a CPU, asking after each step whether every row has ended costs nothing and saves the rest of the block;
    # on a GPU it would stall the queue of launched steps, so the block runs out (its extra tokens are dropped).
    is_eos = None
    if device.type == "cpu":
        is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool)
        is_eos[[t for t in eos_ids if 0 <= t < logits.shape[-1]]] = True
    active = list(range(len(rows)))  # rows[active[j]] is batch row j
    while True:
        # Each step appends a token to every row; `advance_block` keeps those of a row up to its end.
        room = [rows[i].prep.max_new - len(rows[i].ids) if rows[i].finish is None else 0 for i in active]
        k = min(block, max(room))
        uniforms = None if params.all_greedy else draw_uniforms([rows[i] for i in active], k, device)
        out = torch.empty((len(active), k), dtype=torch.long, device=device)
        if is_eos is not None:
            done = torch.zeros(len(active), dtype=torch.bool)
            out_of_room = torch.tensor(room)[None, :] <= torch.arange(1, k + 1)[:, None]  # [step, row]
        for t in range(k):
            tokens = params.sample(logits, None if uniforms is None else uniforms[:, t])
            out[:, t] = tokens
            if t + 1 == k:
                break
            if is_eos is not None:
                done |= is_eos[tokens]
                if bool((done | out_of_room[t]).all()):
                    out = out[:, : t + 1]
                    break
            logits = steps.forward(tokens, pos)
            pos += 1
        for j, seq in enumerate(out.tolist()):
            row = rows[active[j]]
            if row.finish is None:
                advance_block(row, seq, stop_len, eos_ids, newline_ids)
        keep_j = [j for j, i in enumerate(active) if rows[i].finish is None]
        if not keep_j:
            break
        # Ended rows ride along until they are a quarter of the batch: dropping rows copies the whole KV cache, so
        # it is done in bulk, not row by row (and never on a static cache).
        if len(keep_j) * 4 <= len(active) * 3 and steps.select(keep := torch.tensor(keep_j, device=device)):
            tokens, pos = tokens[keep], pos[keep]
            params = params.select(keep)
            active = [active[j] for j in keep_j]
        logits = steps.forward(tokens, pos)
        pos += 1


class _ReservedSteps:
    """Decode steps on the prefill's cache, reserved for the whole decode, with an attention mask reserved too."""

    def __init__(self, model, pre: Prefill, src: torch.Tensor, longest: int) -> None:
        self.model, self.cache = model, pre.cache
        # For one new token under sdpa with full attention only, the attention mask is the padding mask itself: it
        # is handed over as a view of the reserved one, and transformers builds none (a copy of rows x length).
        self.direct = getattr(model.config, "_attn_implementation", None) == "sdpa" and supports_prefix_sharing(model)
        reserve(self.cache, longest, src)
        width = pre.mask.shape[1]
        self.mask = torch.ones((len(src), width + longest), dtype=torch.bool, device=pre.mask.device)
        self.mask[:, :width] = pre.mask.index_select(0, src).bool()
        self.length = width

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The next logits [rows, V] (float32) after feeding each row its token at its position."""
        self.length += 1
        if self.length > self.mask.shape[1]:  # never on the planned path; see _Reserved.update
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask)], dim=1)
        mask = self.mask[:, None, None, : self.length] if self.direct else self.mask[:, : self.length]
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            **cache_arg(self.model, self.cache),
            use_cache=True,
        )
        return out.logits[:, -1, :].float()

    def select(self, keep: torch.Tensor) -> bool:
        """Keep only the batch rows `keep`; True (a reserved cache can drop rows)."""
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        return True


class CompiledDecode:
    """`backend.compile`: decode steps on a static KV cache through `torch.compile` (CUDA graphs on a GPU).

    One per backend: the compiled step and the last static cache are kept for the next batch of the same shape (the
    cache's length is rounded up to a power of two, so nearby lengths share one compiled step). A static cache
    keeps its rows to the end of a batch. When the model cannot be compiled, this says so once in the log and the
    backend decodes without it.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.failure: str | None = None  # why compiling failed, once it did
        self.compiled_steps = 0  # steps that ran compiled (a benchmark reports it)
        self._fn = None
        self._cache = None
        self._cache_key: tuple | None = None
        if not supports_prefix_sharing(model):
            self._fail("its KV cache has layers other than full attention (sliding window or recurrent)")

    def _fail(self, why: str) -> None:
        self.failure, self._fn = why, None
        log.warning("backend.compile: cannot compile the decode step (%s); decoding without compile", why)

    def steps(self, pre: Prefill, src: torch.Tensor, longest: int) -> _StaticSteps | None:
        """Decode steps for this batch on a static cache holding its rows, or None when compiling failed."""
        if self.failure is not None:
            return None
        from transformers import StaticCache

        layers = pre.cache.layers
        width = pre.mask.shape[1]
        capacity = max(256, 1 << (width + longest - 1).bit_length())
        key = (len(src), capacity, layers[0].keys.dtype, layers[0].keys.device)
        if self._cache_key != key:
            self._cache, self._cache_key = None, None  # free the old one first
            self._cache, self._cache_key = StaticCache(config=self.model.config, max_cache_len=capacity), key
        else:
            for layer in self._cache.layers:
                layer.reset()
        for layer, filled in zip(self._cache.layers, layers, strict=True):
            layer.update(filled.keys.index_select(0, src), filled.values.index_select(0, src))
        mask = torch.ones((len(src), capacity), dtype=torch.bool, device=pre.mask.device)
        mask[:, :width] = pre.mask.index_select(0, src).bool()
        if self._fn is None:
            mode = "reduce-overhead" if mask.device.type == "cuda" else None
            try:
                self._fn = torch.compile(self.model.__call__, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - compiling is an option; decoding goes on without it
                self._fail(_describe(e))
        return _StaticSteps(self, self._cache, mask, width)

    def forward(self, cache, length: int, **inputs) -> torch.Tensor:
        """One step through the compiled model (eager once compiling failed)."""
        if self._fn is not None:
            try:
                if inputs["input_ids"].device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                out = self._fn(**inputs, **cache_arg(self.model, cache), use_cache=True)
                self.compiled_steps += 1
                # A copy: a CUDA graph's outputs are overwritten by its next replay.
                return out.logits[:, -1, :].to(torch.float32, copy=True)
            except Exception as e:  # noqa: BLE001 - any failure to compile or replay falls back to eager steps
                self._fail(_describe(e))
                for layer in cache.layers:  # undo a partial step, if any: the eager step writes the same position
                    layer.cumulative_length.fill_(length)
        out = self.model(**inputs, **cache_arg(self.model, cache), use_cache=True)
        return out.logits[:, -1, :].float()


class _StaticSteps:
    """Decode steps of one batch on a `CompiledDecode`'s static cache."""

    def __init__(self, owner: CompiledDecode, cache, mask: torch.Tensor, width: int) -> None:
        self.owner, self.cache, self.mask, self.length = owner, cache, mask, width

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The next logits [rows, V] (float32) after feeding each row its token at its position."""
        logits = self.owner.forward(
            self.cache, self.length, input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos[:, None]
        )
        self.length += 1
        return logits

    def select(self, keep: torch.Tensor) -> bool:
        """False: a static cache keeps its rows (a new shape would compile again)."""
        return False


def _describe(e: Exception) -> str:
    """An exception in one short line, for the log."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
