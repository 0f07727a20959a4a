"""Problem sets: JSONL/JSON/Parquet files, Hugging Face datasets, the seeded demo generator; every row validated."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptdpo.configs import ProblemsConfig
from ckptdpo.errors import UserError
from ckptdpo.shards import content_id
from ckptdpo.tablefile import read_json_records, read_table_file

MAX_LISTED = 10
# Columns that commonly hold the problem text, suggested when problem_field is missing.
PROBLEM_ALIASES = ("problem", "question", "prompt", "query", "input")
ANSWER_ALIASES = ("answer", "solution", "final_answer", "target", "output")


@dataclass
class ProblemSet:
    """Validated problems (PROBLEMS columns) plus what was skipped and why."""

    rows: list[dict[str, str]]
    source: str
    num_invalid: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (1-based row number, reason)
    num_duplicates: int = 0  # rows repeating an earlier row exactly (same id, problem and answer), dropped


def load_problems(cfg: ProblemsConfig, *, base_dir: Path | None = None, offline: bool = True) -> ProblemSet:
    """Load and validate the configured problem source; bad rows raise a UserError unless skip_invalid."""
    if cfg.source == "demo":
        rows = generate_demo_problems(cfg.num_problems, cfg.seed, mix=cfg.demo_mix)
        if cfg.limit is not None:
            rows = rows[: cfg.limit]
        return ProblemSet(rows=rows, source="demo")
    assert cfg.path is not None  # ProblemsConfig requires a path for file and hf sources
    if cfg.source == "file":
        path = _resolve(cfg.path, base_dir)
        records, where, source = _read_records(path), str(path), f"file:{cfg.path}"
    else:
        records, where, source = _read_hf(cfg, base_dir, offline)
    return map_records(records, cfg, where=where, source=source)


def map_records(records: list[dict[str, Any]], cfg: ProblemsConfig, *, where: str, source: str) -> ProblemSet:
    """Map raw records to PROBLEMS rows with cfg's field mapping; validate all, then dedupe, check ids, limit."""
    columns = {k for r in records for k in r}
    for name, col, aliases in (
        ("problem_field", cfg.problem_field, PROBLEM_ALIASES),
        ("answer_field", cfg.answer_field, ANSWER_ALIASES),
    ):
        if records and col not in columns:
            hint = next((a for a in aliases if a in columns), None)
            fix = f"set problems.{name}: {hint}" if hint else f"set problems.{name} to one of the columns"
            raise UserError(f"{where}: no column '{col}' (columns: {', '.join(sorted(columns))}); {fix}.")
    use_ids = cfg.id_field is not None and cfg.id_field in columns

    rows: list[dict[str, str]] = []
    row_numbers: list[int] = []
    invalid: list[tuple[int, str]] = []
    for number, record in enumerate(records, 1):
        problem, why_problem = _clean_text(record.get(cfg.problem_field), "problem")
        answer, why_answer = _clean_answer(record.get(cfg.answer_field), cfg.answer_format)
        reasons = [r for r in (why_problem, why_answer) if r]
        if reasons:
            invalid.append((number, "; ".join(reasons)))
            continue
        raw_id = record.get(cfg.id_field) if use_ids else None
        problem_id = _clean_id(raw_id) or content_id(problem, answer)
        rows.append({"problem_id": problem_id, "problem": problem, "answer": answer, "source": source})
        row_numbers.append(number)

    if invalid and not cfg.skip_invalid:
        raise UserError(
            f"{where}: {len(invalid)} of {len(records)} rows have no usable problem or answer "
            f"({_list_rows(invalid)}); fix those rows or set problems.skip_invalid: true to skip them."
        )
    rows, num_duplicates = _dedupe(rows, row_numbers, where)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise UserError(f"{where}: no usable problems (of {len(records)} rows); check problems.path and the fields.")
    return ProblemSet(
        rows=rows, source=source, num_invalid=len(invalid), invalid=invalid, num_duplicates=num_duplicates
    )


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a file; JSON stays plain Python so a column mixing numbers and text (27 vs "27") still loads."""
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
        return read_json_records(path)
    return read_table_file(path).to_pylist()


def _read_hf(cfg: ProblemsConfig, base_dir: Path | None, offline: bool) -> tuple[list[dict[str, Any]], str, str]:
    """Records of one split from a local dataset (save_to_disk directory, data folder or file) or a hub name."""
    assert cfg.path is not None
    local = _resolve(cfg.path, base_dir)
    source = f"hf:{cfg.path}:{cfg.split}"
    if local.is_file():
        return _read_records(local), str(local), source
    import datasets  # heavy import, only for this source

    if local.is_dir():
        where = str(local)
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(local))
            except Exception as e:  # datasets raises several types for a damaged directory
                raise UserError(f"{local}: cannot load the saved dataset ({_one_line(e)}); save it again.") from None
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise UserError(
                        f"{local}: no split '{cfg.split}' (splits: {', '.join(loaded)}); set problems.split to one."
                    )
                loaded = loaded[cfg.split]
            return loaded.to_list(), where, source
        loader: Callable[[], Any] = lambda: datasets.load_dataset(str(local), cfg.subset, split=cfg.split)  # noqa: E731
    else:
        looks_like_hub = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", cfg.path) is not None and not cfg.path.startswith(".")
        if not looks_like_hub:
            raise UserError(f"problems.path '{cfg.path}': no such file or directory ({local}); check the path.")
        if offline:
            raise UserError(
                f"problems.path '{cfg.path}' is not a local directory and the Hugging Face hub is offline; "
                "save the dataset with datasets' save_to_disk and point problems.path at that directory, "
                "or allow hub access (unset HF_HUB_OFFLINE)."
            )
        where = f"Hugging Face dataset '{cfg.path}'"
        loader = lambda: datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)  # noqa: E731
    try:
        return loader().to_list(), where, source
    except ValueError as e:  # unknown split, subset, or no loadable data files
        raise UserError(f"{where}: cannot load split '{cfg.split}' ({_one_line(e)}); check problems.split.") from None
    except Exception as e:  # network, missing dataset, malformed files
        raise UserError(f"{where}: cannot load the dataset ({_one_line(e)}); check problems.path.") from None


def _clean_text(value: Any, what: str) -> tuple[str, str | None]:
    if value is None:
        return "", f"missing {what}"
    if not isinstance(value, str):
        return "", f"{what} is a {type(value).__name__}, not text"
    value = value.strip()
    return (value, None) if value else ("", f"empty {what}")


def _clean_answer(value: Any, answer_format: str) -> tuple[str, str | None]:
    """Gold answer as a stripped string; numbers become their shortest text (27.0 -> '27')."""
    if isinstance(value, bool):
        return "", "answer is a boolean"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "", f"answer is {value}"
        value = str(int(value)) if float(value).is_integer() and abs(value) < 1e21 else repr(value)
    answer, why = _clean_text(value, "answer")
    if why or answer_format == "plain":
        return answer, why
    if "####" not in answer:
        return "", "answer has no '####' (answer_format gsm8k)"
    answer = answer.rsplit("####", 1)[1].strip()
    # GSM8K writes some answers with thousands separators ("1,450,000"); a number is compared without them.
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return (answer, None) if answer else ("", "empty answer after '####'")


def _clean_id(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _dedupe(rows: list[dict[str, str]], numbers: list[int], where: str) -> tuple[list[dict[str, str]], int]:
    """Drop exact repeats (same id, problem, answer); the same id on different content is an error."""
    first: dict[str, int] = {}
    kept: list[dict[str, str]] = []
    conflicts: list[tuple[int, str]] = []
    for row, number in zip(rows, numbers, strict=True):
        pid = row["problem_id"]
        if pid not in first:
            first[pid] = len(kept)
            kept.append(row)
        elif (kept[first[pid]]["problem"], kept[first[pid]]["answer"]) != (row["problem"], row["answer"]):
            conflicts.append((number, f"id '{pid}' already used by an earlier row with a different problem or answer"))
    if conflicts:
        raise UserError(
            f"{where}: {len(conflicts)} rows reuse an id ({_list_rows(conflicts)}); "
            "make the ids unique or set problems.id_field: null to use content hashes."
        )
    return kept, len(rows) - len(kept)


def _list_rows(items: list[tuple[int, str]]) -> str:
    shown = ", ".join(f"row {n}: {why}" for n, why in items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", and {more} more" if more > 0 else "")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# --- the demo generator ----------------------------------------------------------------------------------------------

# Share of each level in a demo set. Calibrated on the demo model SmolLM2-135M-Instruct (temperature 0.6, top_p 0.95,
# the \boxed{} instruction) so that it solves roughly 0.35-0.65 of the samples, with both right and wrong answers on
# many problems; per-level accuracies and the measurement are in benchmarks/demo_calibration.py's docstring.
DEFAULT_DEMO_MIX: dict[int, float] = {1: 0.5, 2: 0.3, 3: 0.1, 4: 0.06, 5: 0.04}

NAMES = ("Tom", "Mia", "Sam", "Ana", "Ben", "Lily", "Omar", "Zoe", "Raj", "Emma", "Leo", "Nina")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "balloons", "stamps")
CONTAINERS = ("box", "bag", "pack", "jar")


@dataclass(frozen=True)
class DemoProblem:
    """One generated problem with its structure, so its gold answer can be checked independently."""

    level: int
    kind: str  # template name, e.g. "add", "word_add_sub"
    operands: tuple[int, ...]  # the numbers in the order they appear in the text
    problem: str
    answer: int

    def row(self, problem_id: str) -> dict[str, str]:
        return {"problem_id": problem_id, "problem": self.problem, "answer": str(self.answer), "source": "demo"}


def _add(level: int, a: int, b: int, rng: random.Random) -> DemoProblem:
    text = f"What is {a} + {b}?" if rng.random() < 0.5 else f"Compute {a} + {b}."
    return DemoProblem(level, "add", (a, b), text, a + b)


def _word_add(rng: random.Random, level: int) -> DemoProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return DemoProblem(level, "word_add", (a, b), text, a + b)
    a = rng.randint(6, 20)
    b = rng.randint(1, a - 2)
    text = f"{name} had {a} {item} and gave {b} to a friend. How many {item} does {name} have left?"
    return DemoProblem(level, "word_sub", (a, b), text, a - b)


def _level1(rng: random.Random) -> DemoProblem:
    """Addition of numbers up to 5 (the demo model solves about half)."""
    return _add(1, rng.randint(1, 5), rng.randint(1, 5), rng)


def _level2(rng: random.Random) -> DemoProblem:
    """One-digit addition or multiplication."""
    if rng.random() < 0.5:
        return _add(2, rng.randint(1, 9), rng.randint(1, 9), rng)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return DemoProblem(2, "mul", (a, b), f"What is {a} × {b}?", a * b)


def _level3(rng: random.Random) -> DemoProblem:
    """Subtraction below 20, or a one-step add/subtract word problem."""
    if rng.random() < 0.5:
        a = rng.randint(5, 19)
        b = rng.randint(1, a - 1)
        return DemoProblem(3, "sub", (a, b), f"What is {a} - {b}?", a - b)
    return _word_add(rng, 3)


def _level4(rng: random.Random) -> DemoProblem:
    """A one-step multiplication word problem, or a + b × c where precedence matters."""
    if rng.random() < 0.5:
        name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
        a, b = rng.randint(2, 9), rng.randint(2, 6)
        text = f"A {box} holds {a} {item}. {name} buys {b} of them. How many {item} does {name} have?"
        return DemoProblem(4, "word_mul", (a, b), text, a * b)
    a, b, c = rng.randint(1, 9), rng.randint(2, 9), rng.randint(2, 9)
    return DemoProblem(4, "add_mul", (a, b, c), f"What is {a} + {b} × {c}?", a + b * c)


def _level5(rng: random.Random) -> DemoProblem:
    """A two-step word problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        a, b = rng.randint(3, 15), rng.randint(2, 10)
        c = rng.randint(1, a + b - 1)
        text = f"{name} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {name} have now?"
        return DemoProblem(5, "word_add_sub", (a, b, c), text, a + b - c)
    box = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    text = (
        f"{name} buys {a} {box}s with {b} {item} in each {box} and finds {c} more {item}. "
        f"How many {item} does {name} have?"
    )
    return DemoProblem(5, "word_mul_add", (a, b, c), text, a * b + c)


LEVELS: dict[int, Callable[[random.Random], DemoProblem]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}


def generate_demo_items(num_problems: int, seed: int, mix: Mapping[int, float] | None = None) -> list[DemoProblem]:
    """Seeded demo problems in graded difficulty, levels interleaved by `mix` (level -> weight); prefix-stable."""
    weights = _check_mix(DEFAULT_DEMO_MIX if mix is None else mix)
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[DemoProblem] = []
    for level in _interleave(weights, num_problems):
        # Retry on a repeat so a set holds distinct problems while the level still has unused ones (level 1 has 50).
        for _ in range(50):
            item = LEVELS[level](rng)
            if item.problem not in seen:
                break
        seen.add(item.problem)
        items.append(item)
    return items


def generate_demo_problems(num_problems: int, seed: int, mix: Mapping[int, float] | None = None) -> list[dict]:
    """Seeded demo problems as PROBLEMS rows with computed gold answers; ids `demo-<seed>-<index>`."""
    # Position ids, not content hashes: a large set may repeat a small level's problem, and ids must stay unique.
    return [item.row(f"demo-{seed}-{i}") for i, item in enumerate(generate_demo_items(num_problems, seed, mix))]


def _check_mix(mix: Mapping[int, float]) -> dict[int, float]:
    bad = [k for k in mix if k not in LEVELS]
    if bad or any(w < 0 or not math.isfinite(w) for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"demo mix must map levels {sorted(LEVELS)} to weights >= 0 with a positive sum, got {mix}")
    return {k: float(w) for k, w in sorted(mix.items()) if w > 0}


def _interleave(weights: dict[int, float], n: int) -> list[int]:
    """Smooth weighted round robin: every prefix follows the weights as closely as whole counts allow."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0.0)
    order = []
    for _ in range(n):
        for k, w in weights.items():
            current[k] += w
        pick = max(current, key=lambda k: (current[k], -k))
        current[pick] -= total
        order.append(pick)
    return order
