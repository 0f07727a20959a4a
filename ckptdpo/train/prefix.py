"""Shared-prefix preference training: a pair's prompt is computed once, not once per side.

TRL's DPO and SimPO (CPOTrainer) run `prompt + chosen` and `prompt + rejected` as two sequences, so a checkpoint
pair's long prompt (problem plus trajectory prefix) goes through the model twice for the policy and twice for the
reference. Here each pair becomes one sequence `[prompt | chosen | rejected]` with a block mask in which rejected
attends to the prompt and to itself but never to chosen, and its position ids restart where the prompt ends: every
token sees exactly the context it has in its own sequence, so the log-probabilities are those of the standard path
(Wang and Hegde, "Accelerating Direct Preference Optimization with Prefix Sharing", 2024).

The trainers keep their own batches, losses and metrics. The collator adds a `packed` entry to each batch; the
model's forward, given `packed`, runs the packed sequence and returns its per-token outputs laid out as the standard
batch (chosen rows, then rejected rows), so TRL's loss code reads them unchanged. Only the positions that score a
completion token go through the LM head (TRL's fused head does the same on GPUs and every position on CPU).

The shared prefix of a pair is the longest common token prefix of its two sequences: the prompt, and any leading
completion tokens both sides share. Nothing depends on where the collator put the prompt boundary.

Attention: with sdpa, each packed row runs as two causal kernel calls, prompt + chosen (causal), then rejected over
the prompt and itself (causal aligned to the end, `causal_lower_right`), so flash kernels skip the masked blocks as
they do for the standard path; no (width x width) mask is built. With eager attention the row gets the 4D mask.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

log = logging.getLogger(__name__)

# Segment ids of a packed row.
PAD, SHARED, CHOSEN, REJECTED = 0, 1, 2, 3
# Attention implementations that take an explicit 4D mask with position ids (transformers' masking_utils returns a
# 4D mask unchanged); flash attention takes none, flex attention a BlockMask.
MASKED_ATTENTION = ("sdpa", "eager")
# Decoder-only families whose attention, positions and LM head the packed forward reproduces exactly.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Per-token outputs of a policy forward (TRL's DPO metrics); a reference forward needs only the log-probs.
POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# Vocabulary tile of the chunked LM head, as in TRL's fused head.
_VOCAB_CHUNK = 32768
# What TRL's chunked log-prob function returns per scored token, in order (FusedCausalLMOutput's fields).
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Config fields of models whose LM head scales or caps its logits (the packed head does neither).
_LOGIT_SCALING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def standard_rows(batch: dict[str, Any]):
    """(ids, real, scored) of a TRL batch as rows `[chosen_0..chosen_n-1, rejected_0..rejected_n-1]`.

    `real` marks tokens (not padding), `scored` the tokens whose log-probability the loss uses. DPOTrainer's batch
    holds them as `input_ids` / `attention_mask` / `completion_mask`; CPOTrainer's as separate chosen and rejected
    tensors with `-100` labels, padded to the wider of the two like its `concatenated_inputs`.
    """
    import torch

    if "input_ids" in batch:
        return batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def side(name: str, key: str, value: int):
        t = batch[f"{name}_{key}"]
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([side("chosen", "input_ids", 0), side("rejected", "input_ids", 0)])
    real = torch.cat([side("chosen", "attention_mask", 0), side("rejected", "attention_mask", 0)]).bool()
    scored = torch.cat([side("chosen", "labels", -100), side("rejected", "labels", -100)]) != -100
    return ids, real, scored


def pack_rows(ids, real, scored, pad_id: int = 0) -> dict[str, Any]:
    """One packed row per pair from standard rows (right-padded, chosen rows then rejected rows).

    Returns tensors: `input_ids`, `position_ids`, `segments` (PAD / SHARED / CHOSEN / REJECTED) of shape
    (pairs, width); `lengths` (pairs, 3) = shared, chosen and rejected sequence lengths; `hidden_index` (the flat
    packed position whose hidden state predicts each scored token, in the row-major order of `score_mask`),
    `target_ids` (those tokens) and `score_mask` (standard rows, shifted like TRL's labels: column t-1 scores token t).
    """
    import torch

    n = ids.shape[0] // 2
    lengths = real.sum(dim=1)
    if not bool((real == (torch.arange(real.shape[1]) < lengths[:, None])).all()):
        raise ValueError("prefix sharing needs right-padded rows")
    shared, chosen_len, rejected_len, packed = [], [], [], []
    for i in range(n):
        c, r = ids[i, : lengths[i]], ids[n + i, : lengths[n + i]]
        k = min(len(c), len(r))
        differ = (c[:k] != r[:k]).nonzero()
        s = int(differ[0]) if len(differ) else k
        shared.append(s)
        chosen_len.append(len(c))
        rejected_len.append(len(r))
        packed.append((c, r[s:], s))
    width = max(len(c) + len(tail) for c, tail, _ in packed)
    input_ids = torch.full((n, width), pad_id, dtype=ids.dtype)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), PAD, dtype=torch.int8)
    for i, (c, tail, s) in enumerate(packed):
        end = len(c) + len(tail)
        input_ids[i, :end] = torch.cat([c, tail])
        position_ids[i, : len(c)] = torch.arange(len(c))
        position_ids[i, len(c) : end] = torch.arange(s, s + len(tail))
        segments[i, :s], segments[i, s : len(c)], segments[i, len(c) : end] = SHARED, CHOSEN, REJECTED
    score_mask = scored[:, 1:].clone()
    rows, cols = score_mask.nonzero(as_tuple=True)  # row-major, the order masked_scatter fills
    pair = rows % n
    s_of, c_of = torch.tensor(shared)[pair], torch.tensor(chosen_len)[pair]
    # Token t is predicted from position t-1: chosen rows are a prefix of their packed row; a rejected row's
    # positions before the shared end are the shared ones, the rest sit after chosen.
    source = torch.where((rows >= n) & (cols >= s_of), c_of + cols - s_of, cols)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segments": segments,
        "lengths": torch.tensor([shared, chosen_len, rejected_len], dtype=torch.long).T.contiguous(),
        "hidden_index": pair * width + source,
        "target_ids": ids[rows, cols + 1],
        "score_mask": score_mask,
    }


class PrefixSharingCollator:
    """A TRL collator whose batches also carry `packed`: the same pairs as one shared-prefix row each."""

    def __init__(self, base: Any, pad_id: int) -> None:
        self.base = base
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch["packed"] = pack_rows(*standard_rows(batch), pad_id=self.pad_id)
        return batch


def attention_mask(segments, implementation: str, dtype=None):
    """The 4D mask of packed rows: causal, no padding keys, rejected never sees chosen.

    Boolean (True attends) for sdpa; additive (0 / dtype minimum) for eager. A padding query may attend to the
    tokens before it (its output is never read), so no row is fully masked, which would give NaN.
    """
    import torch

    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, None, :, None], segments[:, None, None, :]
    allowed = causal & (k != PAD) & ~((q == REJECTED) & (k == CHOSEN))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    if implementation == "sdpa":
        return allowed
    dtype = dtype or torch.float32
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, blocked)


def base_module(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed / PEFT wrappers: the one whose forward TRL patches."""
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


def sharing_problem(model: Any) -> str | None:
    """Why `model` cannot take the packed forward, or None when it can."""
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    outer = extract_model_from_parallel(model)
    if is_peft_model(outer) and outer.peft_config[outer.active_adapter].is_prompt_learning:
        return "prompt-learning PEFT adds virtual tokens to every sequence"
    config = base_module(model).config
    text = config.get_text_config()
    if text is not config or config.is_encoder_decoder:
        return f"{type(base_module(model)).__name__} is not a decoder-only language model"
    if text.model_type not in MODEL_TYPES:
        return f"model type {text.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    implementation = config._attn_implementation
    if implementation not in MASKED_ATTENTION:
        return f"attention {implementation!r} takes no explicit 4D mask (sdpa and eager do)"
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
        return "sliding-window layers would ignore the window under an explicit mask"
    if getattr(text, "output_router_logits", False):
        return "mixture-of-experts router losses read the standard batch"
    scaled = [name for name in _LOGIT_SCALING if getattr(text, name, None) is not None]
    if scaled:
        return f"logit scaling ({', '.join(scaled)})"
    return None


def prefix_sdpa_attention(module, query, key, value, attention_mask, *args, packed_lengths=None, **kwargs):
    """sdpa over packed rows given `packed_lengths` (shared, chosen, rejected lengths per row); else plain sdpa.

    Per row: prompt + chosen attend causally among themselves; rejected attends to the prompt and causally to
    itself, which is causal attention aligned to the end of [prompt | rejected]. Padding positions come out zero.
    Returns (batch, width, heads, head_dim) like transformers' sdpa.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv

    if packed_lengths is None:
        return _PLAIN_SDPA[0](module, query, key, value, attention_mask, *args, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=kwargs.get("dropout", 0.0),
                             scale=kwargs.get("scaling"))  # fmt: skip
    width, rows = query.shape[2], []
    for b, (s, c, r) in enumerate(packed_lengths):
        q, k, v, tail = query[b : b + 1], key[b : b + 1], value[b : b + 1], r - s
        parts = [sdpa(q[:, :, :c], k[:, :, :c], v[:, :, :c], is_causal=True)]
        if tail:
            k_tail = torch.cat([k[:, :, :s], k[:, :, c : c + tail]], dim=2)
            v_tail = torch.cat([v[:, :, :s], v[:, :, c : c + tail]], dim=2)
            parts.append(sdpa(q[:, :, c : c + tail], k_tail, v_tail, attn_mask=causal_lower_right(tail, s + tail)))
        if c + tail < width:
            parts.append(q.new_zeros((1, q.shape[1], width - c - tail, value.shape[-1])))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


# transformers' own sdpa function, which `prefix_sdpa_attention` stands in for (set by `_register_attention`).
_PLAIN_SDPA: list = []


def _register_attention() -> None:
    """Route transformers' "sdpa" through `prefix_sdpa_attention`; calls without `packed_lengths` are unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not _PLAIN_SDPA:
        _PLAIN_SDPA.append(ALL_ATTENTION_FUNCTIONS["sdpa"])
        ALL_ATTENTION_FUNCTIONS["sdpa"] = prefix_sdpa_attention


def install_packed_forward(model: Any, outputs: tuple[str, ...]) -> None:
    """Let `model(..., packed=..., fused_lm_head=True)` run the packed forward; other calls are unchanged.

    Patches the forward of the transformers model inside the wrappers (like TRL's fused LM head, which it wraps), so
    DDP, DeepSpeed and PEFT still run it inside their own forward. Idempotent; the outputs of several callers merge.
    """
    _register_attention()
    module = base_module(model)
    if getattr(module, "_packed_outputs", None) is not None:
        module._packed_outputs = tuple(dict.fromkeys((*module._packed_outputs, *outputs)))
        return
    module._packed_outputs = tuple(outputs)
    previous = module.forward

    @functools.wraps(type(module).forward)
    def forward(self, *args, packed=None, **kwargs):
        if packed is None or not kwargs.get("fused_lm_head"):
            return previous(*args, **kwargs)
        return packed_forward(self, packed, self._packed_outputs)

    module.forward = types.MethodType(forward, module)


def packed_forward(model: Any, packed: dict[str, Any], outputs: tuple[str, ...]):
    """Per-token log-probabilities (and the requested extras) of the standard rows, from one packed forward.

    Returns TRL's `FusedCausalLMOutput` with fields of shape `score_mask` (zero where nothing is scored).
    """
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    lm_head = model.get_output_embeddings()
    ids = packed["input_ids"]
    if model.config._attn_implementation == "sdpa":
        # A 4D mask is passed through unchanged; the attention reads the layout instead (`prefix_sdpa_attention`).
        layout = {"attention_mask": ids.new_ones((ids.shape[0], 1, 1, 1), dtype=torch.bool)}
        layout["packed_lengths"] = [tuple(row) for row in packed["lengths"].tolist()]
    else:
        layout = {
            "attention_mask": attention_mask(packed["segments"], "eager", model.get_input_embeddings().weight.dtype)
        }
    hidden = model.base_model(
        input_ids=ids, position_ids=packed["position_ids"], use_cache=False, **layout
    ).last_hidden_state
    scoring = hidden.reshape(-1, hidden.shape[-1])[packed["hidden_index"]].to(lm_head.weight.device)
    weight, bias = lm_head.weight, lm_head.bias
    with maybe_gather_lm_head_ctx(weight, bias):
        per_token = ChunkedLogProbFunction.apply(
            scoring, weight, bias, packed["target_ids"], 1.0, _VOCAB_CHUNK, None, 1.0, outputs
        )
    score_mask = packed["score_mask"]
    fields = [None if x is None else x.new_zeros(score_mask.shape).masked_scatter(score_mask, x) for x in per_token]
    scored = dict(zip(_PER_TOKEN, fields, strict=True))
    loss = -scored["log_probs"].sum() / score_mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, label_mask=score_mask, aux_loss=None, **scored)


def packed_counts(packed: dict[str, Any]) -> tuple[int, int, int]:
    """(tokens computed, padded width x rows, attended query-key pairs) of a packed batch.

    The attended pairs are those the block mask allows (causal within prompt + chosen, rejected over the prompt and
    itself), the attention work an implementation that skips masked blocks would do.
    """
    s, c, r = (packed["lengths"][:, j].long() for j in range(3))
    tail = r - s
    computed = int((c + tail).sum())
    attended = int((c * (c + 1) // 2 + tail * s + tail * (tail + 1) // 2).sum())
    return computed, int(packed["input_ids"].numel()), attended
