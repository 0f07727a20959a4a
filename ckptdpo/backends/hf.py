"""The Hugging Face backend: transformers on CPU or GPU with its own decode loop.

The decode loop (instead of `model.generate`) gives four things generate lacks: the `n` samples of a prompt share
one prefill (the prompt's KV cache is computed once and indexed out to `n` rows), every sample has its own random
stream, stop strings and the loop guard end single rows, and finished rows leave the batch.

Reproducibility: each sample draws its randomness from its own stream, seeded from (request seed, sample index),
one uniform number per generated token (inverse-CDF sampling). The same requests in the same batch composition give
the same outputs on the same hardware and library versions; in another composition the random numbers are still the
same, but padding changes floating-point sums, which can rarely flip a near tie between two tokens.

Prompts are taken verbatim: text is tokenized without adding special tokens (a chat prompt already carries the
template's BOS), token ids are used as given.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptdpo.backends.base import (
    BackendStats,
    GenerationRequest,
    GenerationResult,
    Sample,
    templated_problem,
    templated_prompts,
)
from ckptdpo.backends.loopguard import LoopGuard
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError
from ckptdpo.models import resolve_model

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def sample_seed(seed: int, index: int) -> int:
    """The random stream of sample `index` of a request seeded with `seed`; independent of the batch it runs in."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def local_revision(path: Path) -> str:
    """A content fingerprint of a local checkpoint: config, tokenizer files, and sampled bytes of every weight file.

    Hashing all weights of a large model takes seconds to minutes; 16 chunks of 64 KiB per weight file (the first
    holds the safetensors header) change whenever training rewrites the weights, which is what cache keys need.
    An edit confined to a few unsampled bytes would go unseen: set `backend.revision` explicitly for such models.
    """
    h = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        chunk = 1 << 16
        with f.open("rb") as fh:
            for i in range(16):
                fh.seek(max(0, (size - chunk) * i // 15))
                h.update(fh.read(chunk))
    return "sha256:" + h.hexdigest()[:16]


class _RequestError(Exception):
    """A problem with one request (not the batch): becomes GenerationResult.error."""

    def __init__(self, message: str, prompt_tokens: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


class _Detokenizer:
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
class _Prepared:
    index: int
    ids: list[int]
    max_new: int
    request: GenerationRequest


@dataclass
class _Unit:
    """Samples [start, start+count) of one request: rows that share one prefill within a batch."""

    prep: _Prepared
    start: int
    count: int

    @property
    def cost(self) -> int:
        return len(self.prep.ids) + self.prep.max_new


@dataclass
class _Row:
    prep: _Prepared
    sample_index: int
    rng: random.Random
    guard: LoopGuard | None
    detok: _Detokenizer
    ids: list[int] = field(default_factory=list)
    tail: str = ""
    finish: str | None = None


def plan_batches(prepared: list[_Prepared], budget: int, max_rows: int) -> list[list[_Unit]]:
    """Pack sample groups into batches under the row cap and the token budget (rows x longest prompt+new tokens).

    A request whose samples do not fit one batch is split into groups; each group pays its own prefill. A single
    row over the budget still runs, alone.
    """
    units: list[_Unit] = []
    for p in prepared:
        cap = max(1, min(max_rows, budget // (len(p.ids) + p.max_new)))
        units += [_Unit(p, s, min(cap, p.request.n - s)) for s in range(0, p.request.n, cap)]
    # Similar lengths together waste less on padding; the order is a function of the requests alone.
    units.sort(key=lambda u: (len(u.prep.ids), u.prep.max_new, u.prep.index, u.start))
    batches: list[list[_Unit]] = []
    cur: list[_Unit] = []
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


class HFBackend:
    """transformers causal LM, loaded once; see the module docstring for batching, sharing and seeds."""

    def __init__(self, cfg: BackendConfig, home: Path, *, offline: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        if cfg.threads:
            # On a small CPU shared with a Prefect server and verifier workers, OpenMP threads that spin-wait for
            # each other lose far more than they gain (measured: 4 tok/s with 2 threads, ~30 with 1 on 2 cores).
            torch.set_num_threads(cfg.threads)
        ref = resolve_model(cfg.model, Path(home), offline=offline)
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        revision = cfg.revision if not Path(ref).exists() else None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision)
            self.model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, revision=revision)
        except OSError as e:
            raise UserError(
                f"cannot load model '{cfg.model}' (resolved to {ref}): {' '.join(str(e).split())[:300]}; "
                "set backend.model to a local path, 'demo' (after `ckptdpo models pull-demo`), or a reachable hub id."
            ) from None
        # Half precision on CPU is slow or unsupported in places; float32 is the safe CPU default.
        if self.device.type == "cpu" and cfg.dtype == "auto" and self.model.dtype in (torch.float16, torch.bfloat16):
            self.model = self.model.float()
        self.model.to(self.device).eval()
        self.model_id = cfg.model
        if cfg.revision:
            self.revision = cfg.revision
        elif Path(ref).is_dir():
            self.revision = local_revision(Path(ref))
        else:
            self.revision = getattr(self.model.config, "_commit_hash", None) or f"hub:{ref}"
        self.stats = BackendStats()
        self.max_len = cfg.max_model_len or getattr(self.model.config, "max_position_embeddings", None) or 4096
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

    # --- generation ------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; a bad request gets `error`, the others still run."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, req in enumerate(requests):
            try:
                prepared.append(self._prepare(i, req))
            except _RequestError as e:
                results[i] = GenerationResult(samples=[], prompt_tokens=e.prompt_tokens, error=str(e))
        samples: dict[int, list[Sample | None]] = {p.index: [None] * p.request.n for p in prepared}
        computed: dict[int, int] = {p.index: 0 for p in prepared}
        for batch in plan_batches(prepared, self.cfg.batch_token_budget, self.cfg.max_batch_size):
            self._run_batch(batch, samples, computed)
        for p in prepared:
            got = samples[p.index]
            assert all(s is not None for s in got), "every sample of every request is generated"
            results[p.index] = GenerationResult(samples=got, prompt_tokens=len(p.ids))  # type: ignore[arg-type]
        for i, res in enumerate(results):
            assert res is not None
            self.stats.count(res, prompt_tokens_computed=computed.get(i, 0))
        return results  # type: ignore[return-value]

    def _prepare(self, index: int, req: GenerationRequest) -> _Prepared:
        if req.n < 1:
            raise _RequestError(f"n must be >= 1, got {req.n}")
        if req.max_tokens < 1:
            raise _RequestError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise _RequestError(f"need temperature >= 0 and 0 < top_p <= 1, got {req.temperature}, {req.top_p}")
        if isinstance(req.prompt, str):
            ids = self.tokenizer(req.prompt, add_special_tokens=False).input_ids
        else:
            ids = list(req.prompt)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise _RequestError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not ids:
            raise _RequestError("the prompt is empty")
        if len(ids) >= self.max_len:
            raise _RequestError(
                f"the prompt has {len(ids)} tokens, the model's context is {self.max_len}; shorten the prompt",
                len(ids),
            )
        return _Prepared(index, ids, min(req.max_tokens, self.max_len - len(ids)), req)

    @torch.inference_mode()
    def _run_batch(
        self, units: list[_Unit], samples: dict[int, list[Sample | None]], computed: dict[int, int]
    ) -> None:
        from transformers import DynamicCache

        # One prefill row per distinct prompt: the n samples of a request, and identical prompts, share it.
        prefill: dict[tuple[int, ...], int] = {}
        row_src: list[int] = []
        rows: list[_Row] = []
        for u in units:
            key = tuple(u.prep.ids)
            if key not in prefill:
                prefill[key] = len(prefill)
                computed[u.prep.index] += len(key)
            req = u.prep.request
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            for k in range(u.start, u.start + u.count):
                guard = None
                if self.cfg.loop_guard:
                    guard = LoopGuard(min_repeats=self.cfg.loop_min_repeats, ngram=self.cfg.loop_ngram)
                rows.append(_Row(u.prep, k, random.Random(sample_seed(seed, k)), guard, _Detokenizer(self.tokenizer)))
                row_src.append(prefill[key])

        prompts = list(prefill)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = _positions(mask)
        input_ids, mask, positions = input_ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        src = torch.tensor(row_src, device=self.device)
        cache.batch_select_indices(src)
        logits = out.logits[:, -1, :].float().index_select(0, src)
        mask = mask.index_select(0, src)
        next_pos = positions[:, -1].index_select(0, src) + 1
        del out, input_ids

        params = _SamplingParams([r.prep.request for r in rows], self.device)
        active = list(range(len(rows)))  # rows[active[j]] is batch row j
        stop_len = max((len(s) for r in rows for s in r.prep.request.stop), default=0)
        while True:
            u = [rows[i].rng.random() for i in active]
            tokens = params.sample(logits, u).tolist()
            done: list[int] = []
            for j, i in enumerate(active):
                if self._advance(rows[i], tokens[j], stop_len):
                    done.append(j)
            if len(done) == len(active):
                break
            # Finished rows keep riding along (fed a pad token) until they are a quarter of the batch: dropping a
            # row copies the whole KV cache, so it is worth doing in bulk, not row by row.
            finished = [j for j, i in enumerate(active) if rows[i].finish is not None]
            step_tokens = torch.tensor(tokens, device=self.device)
            if finished and len(finished) * 4 >= len(active):
                keep_j = [j for j, i in enumerate(active) if rows[i].finish is None]
                keep = torch.tensor(keep_j, device=self.device)
                cache.batch_select_indices(keep)
                mask, next_pos, step_tokens = mask[keep], next_pos[keep], step_tokens[keep]
                params = params.select(keep)
                active = [active[j] for j in keep_j]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(
                input_ids=step_tokens[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        del cache

        for r in rows:
            text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
            if r.finish == "stop" and r.prep.request.stop:
                hits = [text.find(s) for s in r.prep.request.stop if s in text]
                if hits:
                    text = text[: min(hits)]
            samples[r.prep.index][r.sample_index] = Sample(
                text=text, num_tokens=len(r.ids), finish_reason=r.finish, token_ids=list(r.ids)
            )

    def _advance(self, row: _Row, token: int, stop_len: int) -> bool:
        """Append a sampled token to an unfinished row and decide whether it finished; True when it is finished."""
        if row.finish is not None:
            return True
        row.ids.append(token)
        if token in self.eos_ids:
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

    # --- scoring and chat ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Summed log-probability of each continuation's tokens given its prompt.

        Prompt and continuation are tokenized separately and the ids concatenated, so the scored tokens are exactly
        the continuation's own tokenization (joint tokenization could merge characters across the boundary).
        """
        if len(prompts) != len(continuations):
            raise ValueError("score needs one continuation per prompt")
        enc = lambda texts: self.tokenizer(list(texts), add_special_tokens=False).input_ids  # noqa: E731
        pairs = list(zip(enc(prompts), enc(continuations), strict=True))
        scores = [0.0] * len(pairs)
        todo = []
        for i, (p, c) in enumerate(pairs):
            if not p:
                raise ValueError(f"score: prompt {i} is empty; a first token has no context to be scored against")
            if len(p) + len(c) > self.max_len:
                raise ValueError(f"score: prompt {i} + continuation is {len(p) + len(c)} tokens > {self.max_len}")
            if c:
                todo.append(i)
        todo.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        budget, max_rows = self.cfg.batch_token_budget, self.cfg.max_batch_size
        start = 0
        while start < len(todo):
            end = start + 1
            while end < len(todo) and end - start < max_rows:
                longest = len(pairs[todo[end]][0]) + len(pairs[todo[end]][1])
                if (end - start + 1) * longest > budget:
                    break
                end += 1
            chunk = todo[start:end]
            for i, s in zip(chunk, self._score_batch([pairs[i] for i in chunk]), strict=True):
                scores[i] = s
            start = end
        return scores

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        seqs = [p + c for p, c in pairs]
        width = max(len(s) for s in seqs)
        keep = max(len(c) for _, c in pairs) + 1
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        positions = _positions(mask)
        # Left padding puts every continuation at the end, so only the last max_len(c)+1 positions need logits.
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=keep,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, keep, V]; position t predicts token t+1
        result = []
        for i, (_, c) in enumerate(pairs):
            targets = torch.tensor(c, device=logprobs.device)
            rows = logprobs[i, keep - 1 - len(c) : keep - 1]
            result.append(float(rows.gather(1, targets[:, None]).sum()))
        return result

    def chat_prompt(self, problem: str) -> str:
        """The model's chat template around the problem and the instruction, ending where the assistant speaks."""
        return templated_problem(self.tokenizer, problem)

    def chat(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Reply text per conversation; a conversation that cannot be generated (too long) gets an empty reply."""
        prompts = templated_prompts(self.tokenizer, conversations)
        requests = [GenerationRequest(p, n=1, seed=0, max_tokens=max_tokens, temperature=temperature) for p in prompts]
        replies = []
        for res in self.generate(requests):
            if res.error:
                log.warning("chat request failed: %s", res.error)
            replies.append(res.samples[0].text if res.samples else "")
        return replies

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts under this model's tokenizer (no special tokens added)."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def close(self) -> None:
        """Free the model (and GPU memory)."""
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _SamplingParams:
    """Per-row temperature / top-p / top-k as tensors, so one batch can mix requests with different settings."""

    def __init__(self, requests: list[GenerationRequest], device: torch.device) -> None:
        self.temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([r.top_k if r.top_k > 0 else 0 for r in requests], dtype=torch.long, device=device)
        self._flags()

    def _flags(self) -> None:
        self.all_greedy = bool((self.temperature == 0).all())
        self.any_greedy = bool((self.temperature == 0).any())
        self.any_top_p = bool((self.top_p < 1).any())
        self.max_top_k = int(self.top_k.max()) if self.top_k.numel() else 0

    def select(self, keep: torch.Tensor) -> _SamplingParams:
        new = object.__new__(_SamplingParams)
        new.temperature, new.top_p, new.top_k = self.temperature[keep], self.top_p[keep], self.top_k[keep]
        new._flags()
        return new

    def sample(self, logits: torch.Tensor, u: list[float]) -> torch.Tensor:
        """One token per row: argmax for temperature 0, else inverse-CDF sampling with the row's uniform `u`."""
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
        order = None
        if self.any_top_p:
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(-1) - probs
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill(before >= self.top_p[:, None], 0.0)
        cdf = probs.cumsum(-1)
        # Slightly below the total, so rounding never points past the last token with mass.
        target = torch.tensor(u, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:] * (1 - 1e-6)
        picked = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)
        if order is not None:
            picked = order.gather(1, picked)
        picked = picked[:, 0]
        if self.any_greedy:
            picked = torch.where(self.temperature == 0, logits.argmax(-1), picked)
        return picked


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (padding gets 1, as generate does)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
