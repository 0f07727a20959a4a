"""The offline vLLM engine (`vllm.LLM`, pinned to vllm==0.22.1 in the `gpu` extra), kept thin.

- Why 0.22.1: it is the newest vLLM that installs next to Prefect 3.8 (0.23 and later pin fastapi<0.137; Prefect
  needs >=0.139), shown by `pip install --dry-run` (tests/slow/test_extras_resolve.py). Every API used here exists in
  it as in 0.33 (`LLM`, `TokensPrompt`, `SamplingParams(repetition_detection=...)`, `RequestOutput.num_cached_tokens`,
  `prompt_logprobs`). For current vLLM run `vllm serve` (docker/Dockerfile.vllm-server) and use the openai backend.

- One `LLM` per backend, built from the config: tensor_parallel_size, gpu_memory_utilization,
  enable_prefix_caching, max_model_len, dtype, revision, seed 0. `vllm` is imported here only, when the backend
  is built, so CPU installs never need it.
- Every prompt is tokenized here (no special tokens added: chat prompts carry the template's own) and submitted as
  `TokensPrompt`; prompts that already are token ids go as they are. Knowing each length before submitting lets a
  prompt that does not fit the context (`llm_engine.model_config.max_model_len`) fail alone: vLLM would raise for
  the whole `generate` call.
- One `SamplingParams` per request (n, temperature, top_p, top_k, max_tokens, seed, stop). With the loop guard on,
  vLLM's own `repetition_detection` (since 0.17) stops a sample whose output ends in `loop_min_repeats` copies of a
  block of `loop_ngram` to 2 * `loop_ngram` tokens (finish_reason "repetition" -> `loop`), so a loop costs no
  further tokens. Every cycle up to 2 * `loop_ngram` tokens long is caught (a shorter one through a multiple of it
  in that range). The range is kept narrow because vLLM runs the check in Python for every sequence at every step:
  vLLM 0.33's check on a 32k-token non-looping sequence took about 40 us per step for sizes 32..64 and 350 us for
  32..256 (on a loaded 2-core CPU), so the wide range would add ~20 ms per decode step at batch 64. Longer cycles and
  near-identical paragraphs (same modulo whitespace and case) are left to the loop guard's paragraph check, run post
  hoc on the text as in the openai backend: it labels the sample `loop` and cuts it, but saves no tokens.
- Prompt tokens computed = prompt length minus `num_cached_tokens` (prefix-cache hits), which is what the stats show.
- `score` sums `prompt_logprobs` (SamplingParams(max_tokens=1, prompt_logprobs=0)) over the continuation's
  positions of prompt ids + continuation ids, tokenized separately as in the hf backend.
- `chat` renders each conversation with the tokenizer's chat template and generates through the same path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptdpo.backends.base import (
    BackendStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    LocalTokenizerChat,
    Sample,
)
from ckptdpo.backends.loopguard import loop_cut
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError
from ckptdpo.models import model_revision, resolve_model

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "repetition": "loop", "abort": "error", "error": "error"}


class VLLMBackend(LocalTokenizerChat):
    """vllm.LLM behind the backend protocol."""

    def __init__(self, cfg: BackendConfig, home: Path, *, offline: bool = False) -> None:
        try:
            import vllm
        except ImportError:
            raise UserError(
                "backend.kind is 'vllm' but vLLM is not installed; install the gpu extra (pip install "
                "'ckptdpo[gpu]') or run `vllm serve` and set backend.kind: openai."
            ) from None
        self._vllm = vllm
        from vllm.sampling_params import RepetitionDetectionParams

        self.cfg = cfg
        ref = resolve_model(cfg.model, Path(home), offline=offline)
        engine_kwargs: dict[str, Any] = {"enable_prefix_caching": cfg.enable_prefix_caching}
        if cfg.max_model_len:
            engine_kwargs["max_model_len"] = cfg.max_model_len
        self.llm = vllm.LLM(
            ref,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            dtype=cfg.dtype,
            revision=cfg.revision if not Path(ref).exists() else None,
            seed=0,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.model_id = cfg.model
        self.revision = model_revision(cfg.revision, ref)
        self.stats = BackendStats()
        self._repetition = None
        if cfg.loop_guard:
            # Sizes n..2n cover every period up to 2n (see the module docstring for why not more).
            self._repetition = RepetitionDetectionParams(
                max_pattern_size=2 * cfg.loop_ngram, min_pattern_size=cfg.loop_ngram, min_count=cfg.loop_min_repeats
            )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts, params, slots = [], [], []
        for i, req in enumerate(requests):
            ids = list(req.prompt) if not isinstance(req.prompt, str) else self._encode(req.prompt)
            if len(ids) >= self.max_len:
                msg = f"prompt has {len(ids)} tokens; the model context (max_model_len) is {self.max_len}"
                results[i] = GenerationResult([], len(ids), error=msg)
                continue
            prompts.append(self._vllm.TokensPrompt(prompt_token_ids=ids))
            params.append(
                self._vllm.SamplingParams(
                    n=req.n,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    top_k=req.top_k,
                    max_tokens=req.max_tokens,
                    seed=req.seed,
                    stop=list(req.stop) or None,
                    repetition_detection=self._repetition,
                )
            )
            slots.append(i)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        computed: dict[int, int] = {}
        for i, out in zip(slots, outputs, strict=True):
            samples = [self._sample(c) for c in sorted(out.outputs, key=lambda c: c.index)]
            results[i] = GenerationResult(samples, len(out.prompt_token_ids))
            computed[i] = len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
        for i, res in enumerate(results):
            assert res is not None
            self.stats.count(res, prompt_tokens_computed=computed.get(i, 0))
        return results  # type: ignore[return-value]

    def _sample(self, c: Any) -> Sample:
        finish: FinishReason = _FINISH.get(c.finish_reason or "stop", "stop")  # type: ignore[assignment]
        text, token_ids = c.text, list(c.token_ids)
        if self.cfg.loop_guard and finish != "loop":
            cut = loop_cut(text, min_repeats=self.cfg.loop_min_repeats, ngram=self.cfg.loop_ngram)
            if cut is not None:
                # The cut is in characters; the kept text's own tokenization stands in for its token ids.
                text = text[:cut]
                token_ids, finish = self._encode(text), "loop"
        return Sample(text=text, num_tokens=len(token_ids), finish_reason=finish, token_ids=token_ids)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"score needs as many prompts as continuations ({len(prompts)} != {len(continuations)})")
        pairs = [(self._encode(p), self._encode(c)) for p, c in zip(prompts, continuations, strict=True)]
        for i, (p, c) in enumerate(pairs):
            if not p:
                raise ValueError(f"score: prompt {i} is empty; a first token has no context to be scored against")
            # The engine still samples one token after the scored ones, so it needs one position to spare.
            if len(p) + len(c) >= self.max_len:
                raise ValueError(f"score: prompt {i} + continuation is {len(p) + len(c)} tokens >= {self.max_len}")
        todo = [i for i, (_, c) in enumerate(pairs) if c]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        joined = [self._vllm.TokensPrompt(prompt_token_ids=pairs[i][0] + pairs[i][1]) for i in todo]
        outs = self.llm.generate(joined, params, use_tqdm=False) if todo else []
        scores = [0.0] * len(pairs)
        for i, out in zip(todo, outs, strict=True):
            p, c = pairs[i]
            ids = p + c
            # prompt_logprobs[j] holds position j's actual token (always included, whatever the top-k asked).
            scores[i] = sum(out.prompt_logprobs[j][ids[j]].logprob for j in range(len(p), len(ids)))
        return scores

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self._encode(t)) for t in texts]

    def close(self) -> None:
        # vLLM frees GPU memory when the engine is garbage-collected.
        self.llm = None  # type: ignore[assignment]
