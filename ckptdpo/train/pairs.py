"""Pair rows for TRL: selection, token-prefix alignment, the length policy, the train/eval split, datasets on disk.

Pairs are fed to TRL as plain text: `prompt` already holds the chat-templated problem and the trajectory prefix. No
row is silently truncated: rows over `max_length` are dropped and counted (or, with `truncation: keep_end`, the
start of their prompt is cut, also counted). Rows whose prompt does not tokenize as a prefix of prompt + chosen and
prompt + rejected (BPE merges across the boundary, e.g. SmolLM2 encodes a prompt ending in "\\n\\n" as one token but
"\\n\\nWait" as three) get the boundary moved back to the nearest token boundary shared by both sides, moving the
same few characters to the front of both completions; rows where no such boundary exists are dropped and counted.
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

from ckptdpo.configs import TrainConfig
from ckptdpo.errors import UserError

PAIR_COLUMNS = ["pair_id", "pair_type", "problem_id", "prompt", "chosen", "rejected"]
DROP_REASONS = ("empty", "identical", "prompt_not_prefix", "over_max_length")
# Realignment tries at most this many earlier token boundaries before giving up on a row.
_MAX_REALIGN_TRIES = 8
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


def _cut_start(c: _Enc, prompt_len: int, k: int) -> int | None:
    """Char index where the prompt starts after dropping its first k tokens; None if the prompt is too short."""
    if c.offsets is None:
        return None
    starts = [s for s, e in c.offsets if s < e <= prompt_len]
    return starts[k] if 0 < k < len(starts) else None


def prepare_pairs(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Select pair types, append EOS, align the prompt to a token prefix and apply the length policy; count all.

    Returns (kept rows with `prompt`/`chosen`/`rejected` rewritten and `num_tokens` added, report). Token counts
    follow the trainer's own tokenization: DPOTrainer encodes with the tokenizer's special tokens, CPOTrainer
    without them and prepends BOS when the tokenizer has one and the prompt lacks it.
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

    def extra(ids: list[int]) -> int:
        return 1 if bos_id is not None and (not ids or ids[0] != bos_id) else 0

    kept: list[dict] = []
    for start in range(0, len(candidates), _ENCODE_CHUNK):
        chunk = candidates[start : start + _ENCODE_CHUNK]
        texts = []
        for row, chosen, rejected in chunk:
            texts += [row["prompt"], row["prompt"] + chosen, row["prompt"] + rejected]
        encs = encode(texts)
        for i, (row, chosen, rejected) in enumerate(chunk):
            fitted, reason = _fit(encode, row, chosen, rejected, encs[3 * i : 3 * i + 3], cfg, extra)
            if fitted is None:
                dropped[reason] += 1
                continue
            counts["num_realigned"] += fitted.pop("_realigned")
            counts["num_cut_keep_end"] += fitted.pop("_cut")
            kept.append(fitted)
    report = {
        "num_pairs_total": len(rows),
        "num_pairs_selected": len(rows) - sum(not_selected.values()),
        "num_pairs_used": len(kept),
        "num_dropped": sum(dropped.values()),
        "dropped": dict(dropped),
        "not_selected": dict(not_selected),
        **counts,
    }
    return kept, report


def _select(rows: Sequence[dict[str, Any]], cfg: TrainConfig, eos: str, written_bos: str | None):
    """Rows of the selected pair types that are usable at all, with EOS appended; the counts of the others."""
    not_selected: Counter[str] = Counter()
    dropped: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
    counts = {"num_realigned": 0, "num_cut_keep_end": 0, "num_bos_deduplicated": 0}
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


def _fit(encode, row: dict, chosen: str, rejected: str, encs: list[_Enc], cfg: TrainConfig, extra):
    """Align one row's prompt to a token prefix and apply the length policy: (kept row, None) or (None, reason)."""
    p, c, r = encs
    prompt = row["prompt"]
    realigned = cut = False
    for _ in range(4):
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
        longest = max(len(c.ids) + extra(c.ids), len(r.ids) + extra(r.ids))
        if longest <= cfg.max_length:
            return {
                "pair_id": row["pair_id"],
                "pair_type": row["pair_type"],
                "problem_id": row["problem_id"],
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "num_tokens": len(c.ids) + extra(c.ids) + len(r.ids) + extra(r.ids),
                "_realigned": realigned,
                "_cut": cut,
            }, None
        if cfg.truncation == "drop":
            break
        new_start = _cut_start(c, len(prompt), longest - cfg.max_length)
        if new_start is None:
            break
        prompt, p, cut = prompt[new_start:], None, True
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
