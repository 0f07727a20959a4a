"""The Hugging Face backend: transformers on CPU or GPU with its own decode loop.

The decode loop (instead of `model.generate`) gives four things generate lacks: the `n` samples of a prompt share
one prefill (the prompt's KV cache is computed once and indexed out to `n` rows), every sample has its own random
stream, stop strings and the loop guard end single rows, and finished rows leave the batch. Requests that share a
`route_key` (the checkpoints of one trajectory) are batched together, and the common token prefixes of a batch's
prompts are computed once (`decode.prefill_shared`; `prefix_reuse = False` prefills each prompt in full); each
result reports the prompt tokens it requested and the ones it computed. The decode's KV cache and attention mask are
reserved up front and written in place, not concatenated every step, and the host looks at the new tokens once per
block of steps (`decode.decode_rows`). `backend.compile` decodes on a static cache through torch.compile.

Reproducibility: each sample draws its randomness from its own stream, seeded from (request seed, sample index),
one uniform number per generated token (inverse-CDF sampling; drawn a block of steps ahead, the same numbers). The
same requests in the same batch composition give the same outputs on the same hardware and library versions; in
another composition the random numbers are still the same, but padding changes floating-point sums, which can
rarely flip a near tie between two tokens. `backend.compile` gives the same numbers to a compiled model, whose sums
can differ in the same way.

Prompts are taken verbatim: text is tokenized without adding special tokens (a chat prompt already carries the
template's BOS), token ids are used as given.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Sequence
from pathlib import Path

import torch

from ckptdpo.backends.base import (
    BackendStats,
    GenerationRequest,
    GenerationResult,
    LocalTokenizerChat,
    Sample,
)
from ckptdpo.backends.decode import (
    CompiledDecode,
    Detokenizer,
    Prepared,
    Row,
    TextDecoder,
    Unit,
    decode_rows,
    newline_tokens,
    plan_batches,
    prefill_batch,
    supports_prefix_sharing,
)
from ckptdpo.backends.loopguard import LoopGuard
from ckptdpo.backends.sampling import SamplingParams, left_pad_positions, sample_seed
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError
from ckptdpo.models import local_revision, model_revision, resolve_model

__all__ = ["HFBackend", "SamplingParams", "local_revision", "plan_batches", "sample_seed"]

log = logging.getLogger(__name__)


class _RequestError(Exception):
    """A problem with one request (not the batch): becomes GenerationResult.error."""

    def __init__(self, message: str, prompt_tokens: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


class HFBackend(LocalTokenizerChat):
    """transformers causal LM, loaded once; see the module docstring for batching, sharing and seeds."""

    def __init__(self, cfg: BackendConfig, home: Path, *, offline: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = resolve_model(cfg.model, Path(home), offline=offline)
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        revision = cfg.revision if not Path(ref).exists() else None
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, revision=revision)
        except OSError as e:
            raise UserError(
                f"cannot load model '{cfg.model}' (resolved to {ref}): {' '.join(str(e).split())[:300]}; "
                "set backend.model to a local path, 'demo' (after `ckptdpo models pull-demo`), or a reachable hub id."
            ) from None
        revision = model_revision(cfg.revision, ref, getattr(model.config, "_commit_hash", None))
        self._adopt(cfg, model, tokenizer, revision)

    @classmethod
    def from_model(cls, cfg: BackendConfig, model, tokenizer, revision: str) -> HFBackend:
        """A backend around a model already in memory (benchmarks and tests build random ones); `cfg.model` only
        names it."""
        backend = cls.__new__(cls)
        backend._adopt(cfg, model, tokenizer, revision)
        return backend

    def _adopt(self, cfg: BackendConfig, model, tokenizer, revision: str) -> None:
        self.cfg = cfg
        if cfg.threads:
            # On a small CPU shared with a Prefect server and verifier workers, OpenMP threads that spin-wait for
            # each other lose far more than they gain (measured: 4 tok/s with 2 threads, ~30 with 1 on 2 cores).
            torch.set_num_threads(cfg.threads)
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        # Half precision on CPU is slow or unsupported in places; float32 is the safe CPU default.
        if self.device.type == "cpu" and cfg.dtype == "auto" and model.dtype in (torch.float16, torch.bfloat16):
            model = model.float()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_id = cfg.model
        self.revision = revision
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
        # Computing the common prefix of a route key's prompts once (see the module docstring); settable, so a
        # benchmark or test can compare with per-request prefill.
        self.prefix_reuse = True
        self._can_share = supports_prefix_sharing(self.model)
        self._compiled: CompiledDecode | None = None  # built at the first batch with `cfg.compile`
        self._newline_ids: frozenset[int] | None = None  # built at the first batch with the loop guard
        self._texts = TextDecoder(tokenizer)

    # --- generation ------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; a bad request gets `error`, the others still run."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prepared: list[Prepared] = []
        # Text prompts are tokenized in one call: one call per prompt cost more than a tiny model's decode step.
        texts = [r.prompt for r in requests if isinstance(r.prompt, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        for i, req in enumerate(requests):
            ids = next(encoded) if isinstance(req.prompt, str) else list(req.prompt)
            try:
                prepared.append(self._prepare(i, req, ids))
            except _RequestError as e:
                results[i] = GenerationResult(
                    samples=[], prompt_tokens=e.prompt_tokens, error=str(e), prompt_tokens_requested=e.prompt_tokens
                )
        samples: dict[int, list[Sample | None]] = {p.index: [None] * p.request.n for p in prepared}
        computed: dict[int, int] = {p.index: 0 for p in prepared}
        share = self.prefix_reuse and self._can_share
        budget, max_rows = self.cfg.batch_token_budget, self.cfg.max_batch_size
        for batch in plan_batches(prepared, budget, max_rows, group_by_route=share):
            self._run_batch(batch, samples, computed, share)
        for p in prepared:
            got = samples[p.index]
            assert all(s is not None for s in got), "every sample of every request is generated"
            results[p.index] = GenerationResult(
                samples=got,  # type: ignore[arg-type]
                prompt_tokens=len(p.ids),
                prompt_tokens_requested=len(p.ids),
                prompt_tokens_computed=computed[p.index],
            )
        for res in results:
            assert res is not None
            self.stats.count(res, prompt_tokens_computed=res.prompt_tokens_computed)
        return results  # type: ignore[return-value]

    def _prepare(self, index: int, req: GenerationRequest, ids: list[int]) -> Prepared:
        if req.n < 1:
            raise _RequestError(f"n must be >= 1, got {req.n}")
        if req.max_tokens < 1:
            raise _RequestError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise _RequestError(f"need temperature >= 0 and 0 < top_p <= 1, got {req.temperature}, {req.top_p}")
        if not isinstance(req.prompt, str) and any(not 0 <= t < self.vocab_size for t in ids):
            raise _RequestError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not ids:
            raise _RequestError("the prompt is empty")
        if len(ids) >= self.max_len:
            raise _RequestError(
                f"the prompt has {len(ids)} tokens, the model's context is {self.max_len}; shorten the prompt",
                len(ids),
            )
        return Prepared(index, ids, min(req.max_tokens, self.max_len - len(ids)), req)

    @torch.inference_mode()
    def _run_batch(
        self, units: list[Unit], samples: dict[int, list[Sample | None]], computed: dict[int, int], share: bool
    ) -> None:
        # One prefill row per distinct prompt: the n samples of a request, and identical prompts, share it.
        prefill: dict[tuple[int, ...], int] = {}
        owner: list[int] = []  # the request whose result counts the prompt's computed tokens
        route_keys: list[str | None] = []
        row_src: list[int] = []
        rows: list[Row] = []
        for u in units:
            key = tuple(u.prep.ids)
            if key not in prefill:
                prefill[key] = len(prefill)
                owner.append(u.prep.index)
                route_keys.append(u.prep.request.route_key)
            req = u.prep.request
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            for k in range(u.start, u.start + u.count):
                guard = None
                if self.cfg.loop_guard:
                    guard = LoopGuard(min_repeats=self.cfg.loop_min_repeats, ngram=self.cfg.loop_ngram)
                rows.append(_new_row(u.prep, k, seed, guard, self._texts))
                row_src.append(prefill[key])
        prompts = [list(p) for p in prefill]
        pre = prefill_batch(self.model, prompts, route_keys, self.pad_id, self.device, share=share)
        for i, n in zip(owner, pre.computed, strict=True):
            computed[i] += n
        if self.cfg.compile and self._compiled is None:
            self._compiled = CompiledDecode(self.model)
        compiled = self._compiled if self.cfg.compile else None
        if self.cfg.loop_guard and self._newline_ids is None:
            self._newline_ids = newline_tokens(self.tokenizer, self.vocab_size)
        decode_rows(
            self.model, pre, rows, row_src, self.eos_ids, self.device, compiled=compiled, newline_ids=self._newline_ids
        )
        del pre
        texts = self._texts.decode_batch([r.ids for r in rows])
        for r, text in zip(rows, texts, strict=True):
            if r.finish == "stop" and r.prep.request.stop:
                hits = [text.find(s) for s in r.prep.request.stop if s in text]
                if hits:
                    text = text[: min(hits)]
            samples[r.prep.index][r.sample_index] = Sample(
                text=text, num_tokens=len(r.ids), finish_reason=r.finish, token_ids=list(r.ids)
            )

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
        positions = left_pad_positions(mask)
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

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts under this model's tokenizer (no special tokens added)."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def compile_status(self) -> dict:
        """What `backend.compile` did so far: on or off, why compiling failed (None: it did not), compiled steps."""
        compiled = self._compiled
        return {
            "compile": bool(self.cfg.compile),
            "failure": compiled.failure if compiled is not None else None,
            "compiled_steps": compiled.compiled_steps if compiled is not None else 0,
        }

    def close(self) -> None:
        """Free the model (and GPU memory)."""
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _new_row(prep: Prepared, index: int, seed: int, guard: LoopGuard | None, texts: TextDecoder) -> Row:
    """Sample `index` of a request: its own random stream, loop guard and detokenizer."""
    return Row(prep, index, random.Random(sample_seed(seed, index)), guard, Detokenizer(texts))
