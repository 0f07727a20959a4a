"""Pair rows for TRL: selection, token-prefix alignment, the length policy, the train/eval split, datasets on disk.

Pairs are fed to TRL as plain text: `prompt` already holds the chat-templated problem and the trajectory prefix. No
row is silently truncated or dropped. A prompt over its limit (`max_prompt_length`, or what `max_length` leaves
after the longer completion) is cut by `truncation`: `keep_problem_and_end` (the default) keeps the templated
problem and the end of the prefix, next to the checkpoint, with `TRUNCATION_MARKER` where the middle was cut;
`keep_end` cuts the start of the prompt; `drop` drops the row. Every cut and drop is counted. Rows whose prompt does
not tokenize as a prefix of prompt + chosen and prompt + rejected (BPE merges across the boundary, e.g. SmolLM2
encodes a prompt ending in "\\n\\n" as one token but "\\n\\nWait" as three) get the boundary moved back to the
nearest token boundary shared by both sides, moving the same few characters to the front of both completions; rows
where no such boundary exists are dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptdpo.configs import INSTRUCTION, TrainConfig
from ckptdpo.errors import UserError

PAIR_COLUMNS = ["pair_id", "pair_type", "problem_id", "prompt", "chosen", "rejected"]
# over_max_length: too long even with the prompt cut to what truncation keeps; no_problem_end: keep_problem_and_end
# found no end of the templated problem in the prompt.
DROP_REASONS = ("empty", "identical", "prompt_not_prefix", "over_max_length", "no_problem_end")
# Stands where keep_problem_and_end cut the middle of a prompt.
TRUNCATION_MARKER = "\n\n[...]\n\n"
# Where the assistant's turn starts in common chat formats (ChatML, DeepSeek-R1, Llama 3, Zephyr): the end of the
# templated problem when the tokenizer has no chat template of its own to derive it from.
_GENERATION_HEADERS = (
    "<|im_start|>assistant\n",
    "<｜Assistant｜>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|assistant|>\n",
)
# Realignment tries at most this many earlier token boundaries before giving up on a row.
_MAX_REALIGN_TRIES = 8
# Encode, realign and cut at most this many times per row (a cut can merge tokens across its edges).
_MAX_FITS = 4
_ENCODE_CHUNK = 256


@dataclass
class _Enc:
    ids: list[int]
    offsets: list[tuple[int, int]] | None


def _encoder(tokenizer: Any, add_special_tokens: bool):
    """Batch encoder returning ids and character offsets (offsets only from fast tokenizers)."""
    with_offsets = bool(getattr(tokenizer, "is_fast", False))

    def encode(texts: list[str]) -> list[_Enc]:
        out = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
        offs = out["offset_mapping"] if with_offsets else [None] * len(texts)
        return [
            _Enc(list(ids), [tuple(o) for o in off] if off is not None else None)
            for ids, off in zip(out["input_ids"], offs, strict=True)
        ]

    return encode


def _is_prefix(short: list[int], full: list[int]) -> bool:
    return len(short) <= len(full) and full[: len(short)] == short


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _realign(encode, prompt: str, c: _Enc, r: _Enc) -> tuple[int, _Enc] | None:
    """The largest char index < len(prompt) ending a token shared by both full sequences whose prompt[:i] encodes
    as a prefix of both; None when there is none (or no offsets to find one)."""
    if c.offsets is None:
        return None
    common = _common_prefix(c.ids, r.ids)
    ends = sorted({e for s, e in c.offsets[:common] if s < e < len(prompt)}, reverse=True)
    for end in ends[:_MAX_REALIGN_TRIES]:
        (q,) = encode([prompt[:end]])
        if q.ids and _is_prefix(q.ids, c.ids) and _is_prefix(q.ids, r.ids):
            return end, q
    return None


def _prompt_token_starts(c: _Enc, prompt_len: int) -> list[int] | None:
    """Char index where each prompt token starts, from the encoding of prompt + completion (None: no offsets)."""
    if c.offsets is None:
        return None
    return [s for s, e in c.offsets if s < e <= prompt_len]


def _cut_start(c: _Enc, prompt_len: int, k: int) -> int | None:
    """Char index where the prompt starts after dropping its first k tokens; None if the prompt is too short."""
    starts = _prompt_token_starts(c, prompt_len)
    return starts[k] if starts is not None and 0 < k < len(starts) else None


def _cut_middle(c: _Enc, prompt: str, head_end: int, k: int, marker: str) -> str | None:
    """The prompt with its first k tokens after `head_end` (a char index) replaced by `marker`; None when nothing
    of the prompt after the head would be left."""
    starts = _prompt_token_starts(c, len(prompt))
    if starts is None:
        return None
    first = next((i for i, s in enumerate(starts) if s >= head_end), len(starts))
    if first + k >= len(starts):
        return None
    return prompt[:head_end] + marker + prompt[starts[first + k] :]


def problem_end_finder(tokenizer: Any):
    """A function giving the char index where a prompt's templated problem ends (its reasoning prefix starts), or
    None when it cannot tell.

    The end is the last generation header in the prompt: the text the tokenizer's chat template puts after a user
    message to open the assistant's turn (common headers when it has no template), else the end of the reasoning
    instruction every problem message carries.
    """
    header = _template_header(tokenizer)
    headers = [header] if header else list(_GENERATION_HEADERS)

    def problem_end(prompt: str) -> int | None:
        ends = [prompt.rfind(h) + len(h) for h in headers if h in prompt]
        if ends:
            return max(ends)
        at = prompt.rfind(INSTRUCTION)
        return at + len(INSTRUCTION) if at >= 0 else None

    return problem_end


def _template_header(tokenizer: Any) -> str | None:
    """What the chat template writes after a user message when it opens the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "\u2063ckptdpo-problem\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
    )
    at = text.find(sentinel)
    return (text[at + len(sentinel) :] or None) if at >= 0 else None


def prepare_pairs(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Select pair types, append EOS, align the prompt to a token prefix and apply the length policy; count all.

    Returns (kept rows with `prompt`/`chosen`/`rejected` rewritten and `num_tokens` added, report). The report
    counts the pairs kept (`num_kept`, also `num_pairs_used`), those of them whose prompt was cut (`num_truncated`)
    and those dropped (`num_dropped`, by reason in `dropped`). Token counts follow the trainer's own tokenization:
    DPOTrainer encodes with the tokenizer's special tokens, CPOTrainer without them and prepends BOS when the
    tokenizer has one and the prompt lacks it.
    """
    eos = tokenizer.eos_token
    if not eos:
        raise UserError("the model's tokenizer has no eos_token; set one in its tokenizer_config.json.")
    special = cfg.loss == "dpo"
    bos_id = getattr(tokenizer, "bos_token_id", None) if cfg.loss == "simpo" else None
    encode = _encoder(tokenizer, special)
    # A chat template that writes BOS itself (R1-Distill's does), encoded by a tokenizer that adds BOS too, would
    # start every sequence with two BOS tokens; the written one goes.
    written_bos = _added_bos(tokenizer) if special else None
    candidates, not_selected, dropped, counts = _select(rows, cfg, eos, written_bos)
    policy = _LengthPolicy(
        cfg,
        extra=lambda ids: 1 if bos_id is not None and (not ids or ids[0] != bos_id) else 0,
        problem_end=problem_end_finder(tokenizer) if cfg.truncation == "keep_problem_and_end" else None,
        marker_tokens=len(tokenizer(TRUNCATION_MARKER, add_special_tokens=False)["input_ids"]),
    )

    kept: list[dict] = []
    for start in range(0, len(candidates), _ENCODE_CHUNK):
        chunk = candidates[start : start + _ENCODE_CHUNK]
        texts = []
        for row, chosen, rejected in chunk:
            texts += [row["prompt"], row["prompt"] + chosen, row["prompt"] + rejected]
        encs = encode(texts)
        for i, (row, chosen, rejected) in enumerate(chunk):
            fitted, reason = _fit(encode, row, chosen, rejected, encs[3 * i : 3 * i + 3], policy)
            if fitted is None:
                dropped[reason] += 1
                continue
            counts["num_realigned"] += fitted.pop("_realigned")
            cut = fitted.pop("_cut")
            counts["num_truncated"] += cut is not None
            counts["num_cut_keep_end"] += cut == "keep_end"
            kept.append(fitted)
    report = {
        "num_pairs_total": len(rows),
        "num_pairs_selected": len(rows) - sum(not_selected.values()),
        "num_pairs_used": len(kept),
        "num_kept": len(kept),
        "num_dropped": sum(dropped.values()),
        "dropped": dict(dropped),
        "not_selected": dict(not_selected),
        "truncation": cfg.truncation,
        **counts,
    }
    return kept, report


def _select(rows: Sequence[dict[str, Any]], cfg: TrainConfig, eos: str, written_bos: str | None):
    """Rows of the selected pair types that are usable at all, with EOS appended; the counts of the others."""
    not_selected: Counter[str] = Counter()
    dropped: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
    counts = {"num_realigned": 0, "num_truncated": 0, "num_cut_keep_end": 0, "num_bos_deduplicated": 0}
    candidates = []
    for row in rows:
        if row["pair_type"] not in cfg.pair_types:
            not_selected[row["pair_type"]] += 1
        elif not row["prompt"] or not row["chosen"] or not row["rejected"]:
            dropped["empty"] += 1
        elif row["chosen"] == row["rejected"]:
            dropped["identical"] += 1
        else:
            chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
            rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
            if written_bos and row["prompt"].startswith(written_bos):
                row = {**row, "prompt": row["prompt"][len(written_bos) :]}
                counts["num_bos_deduplicated"] += 1
            candidates.append((row, chosen, rejected))
    return candidates, not_selected, dropped, counts


@dataclass
class _LengthPolicy:
    """The length limits of one run and what truncation needs: `extra` tokens the trainer adds to a sequence (BOS),
    where a prompt's problem ends, and the marker's token count."""

    cfg: TrainConfig
    extra: Any
    problem_end: Any
    marker_tokens: int

    def excess(self, p: _Enc, c: _Enc, r: _Enc) -> tuple[int, int]:
        """(prompt tokens over the limits, tokens of the longer sequence beyond its prompt)."""
        longest = max(len(c.ids) + self.extra(c.ids), len(r.ids) + self.extra(r.ids))
        prompt = len(p.ids) + self.extra(p.ids)
        over = longest - self.cfg.max_length
        if self.cfg.max_prompt_length is not None:
            over = max(over, prompt - self.cfg.max_prompt_length)
        return max(over, 0), longest - prompt


def _fit(encode, row: dict, chosen: str, rejected: str, encs: list[_Enc], policy: _LengthPolicy):
    """Align one row's prompt to a token prefix and apply the length policy: (kept row, None) or (None, reason)."""
    p, c, r = encs
    prompt, cfg = row["prompt"], policy.cfg
    realigned, cut, head = False, None, None
    for _ in range(_MAX_FITS):
        if p is None:
            p, c, r = encode([prompt, prompt + chosen, prompt + rejected])
        if not (_is_prefix(p.ids, c.ids) and _is_prefix(p.ids, r.ids)):
            found = _realign(encode, prompt, c, r)
            if found is None:
                return None, "prompt_not_prefix"
            end, p = found
            # prompt + chosen is the same text as before, so c and r stay valid.
            chosen, rejected, prompt = prompt[end:] + chosen, prompt[end:] + rejected, prompt[:end]
            realigned = True
        over, completion = policy.excess(p, c, r)
        if not over:
            return {
                "pair_id": row["pair_id"],
                "pair_type": row["pair_type"],
                "problem_id": row["problem_id"],
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "num_tokens": len(c.ids) + policy.extra(c.ids) + len(r.ids) + policy.extra(r.ids),
                "_realigned": realigned,
                "_cut": cut,
            }, None
        if cfg.truncation == "drop" or completion >= cfg.max_length:
            break
        if cfg.truncation == "keep_end":
            new_start = _cut_start(c, len(prompt), over)
            if new_start is None:
                break
            prompt, cut = prompt[new_start:], "keep_end"
        else:
            if head is None:  # the first cut keeps the problem and puts the marker after it
                end = policy.problem_end(prompt)
                if end is None:
                    return None, "no_problem_end"
                new_prompt = _cut_middle(c, prompt, end, over + policy.marker_tokens, TRUNCATION_MARKER)
                head = end + len(TRUNCATION_MARKER)
            else:  # tokens merged across the cut: cut a little more after the marker
                new_prompt = _cut_middle(c, prompt, head, over, "")
            if new_prompt is None:
                break
            prompt, cut = new_prompt, "keep_problem_and_end"
        p = None
    return None, "over_max_length"


def _added_bos(tokenizer: Any) -> str | None:
    """The BOS text when encoding with special tokens prepends BOS, else None."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos_id else None


def split_pairs(rows: Sequence[dict[str, Any]], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split by a hash of problem_id, so pairs of one problem never straddle the split."""
    train, evals = [], []
    for row in rows:
        h = int(hashlib.sha256(row["problem_id"].encode()).hexdigest()[:12], 16) / float(1 << 48)
        (evals if h < eval_fraction else train).append(row)
    return train, evals


def read_pairs(pairs_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """All pair rows of the given completed stages (refuses a stage without a manifest)."""
    from ckptdpo.shards import read_stage

    rows: list[dict[str, Any]] = []
    for d in pairs_dirs:
        if not Path(d).is_dir():
            raise UserError(f"{d}: pair stage directory not found; run the stage that writes the pairs first.")
        rows += read_stage(d, columns=PAIR_COLUMNS).to_pylist()
    return rows


def build_pair_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: TrainConfig, source: str
) -> tuple[list[dict], list[dict], dict]:
    """Prepared train and eval rows and the report of what was kept; no usable training row is a UserError."""
    kept, report = prepare_pairs(rows, tokenizer, cfg)
    train_rows, eval_rows = split_pairs(kept, cfg.eval_fraction)
    report.update(num_train=len(train_rows), num_eval=len(eval_rows))
    if not train_rows:
        raise UserError(
            f"{source}: no usable training pairs ({json.dumps(report, sort_keys=True)}); "
            "check train.pair_types, train.max_length and train.eval_fraction."
        )
    return train_rows, eval_rows, report


TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def dataset_dir(data_root: str | Path, name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """Where a split's dataset lives: named by its content, so a rerun with the same rows finds it again."""
    text = json.dumps([[r[k] for k in TEXT_COLUMNS] for r in rows], ensure_ascii=False)
    return Path(data_root) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def materialize_dataset(rows: Sequence[dict[str, Any]], directory: str | Path):
    """The rows as a `datasets.Dataset` saved at `directory` and memory-mapped from there.

    A dataset built in memory has no cache files, so `datasets` puts every derived cache (TRL's tokenization, and
    with `precompute_ref_log_probs` the reference log-probs) under a random name in a per-process temp directory
    that no other rank can read. Backed by files here, those caches are named by fingerprint next to the data, the
    same path on every rank. Written to a private name and renamed, so a process that finds it sees all of it.
    """
    import datasets

    directory = Path(directory)
    if not (directory / "state.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list([{k: r[k] for k in TEXT_COLUMNS} for r in rows]).save_to_disk(str(tmp))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process renamed the same content there first
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(directory))
