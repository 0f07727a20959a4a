"""Evaluation: metric aggregation against hand-computed values, streaming by shard, and eval_flow on a fake backend."""

from __future__ import annotations

import gc
import itertools
import json
import random
import weakref
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ckptdpo import evaluate
from ckptdpo.backends.base import GenerationResult, Sample
from ckptdpo.backends.fake import count_words
from ckptdpo.configs import ConfigError, EvalConfig, ProblemsConfig, Recipe, backend_config
from ckptdpo.errors import UserError
from ckptdpo.schemas import EVAL_RESULTS, EVAL_SAMPLES, PROBLEMS, make_table
from ckptdpo.shards import read_stage, read_stats, write_manifest, write_shard
from ckptdpo.verify import Verdict


def row(pid: str, j: int, status: str, extracted: str | None, tokens: int, finish: str = "stop") -> dict:
    ok = {"correct": True, "incorrect": False}.get(status)
    return {
        "benchmark": "b",
        "model_name": "m",
        "model": "m",
        "problem_id": pid,
        "sample_index": j,
        "completion": "x " * tokens,
        "completion_tokens": tokens,
        "finish_reason": finish,
        "status": status,
        "is_correct": ok,
        "extracted": extracted,
    }


# p1: one correct of four; p2: two correct of four. Answers in sample order (G = the gold answer):
#   p1: G, "7", none, none      p2: " 3", G, G, "4"
HAND = [
    row("p1", 0, "correct", "2", 10),
    row("p1", 1, "incorrect", "7", 30),
    row("p1", 2, "no_answer", None, 50, "length"),
    row("p1", 3, "no_answer", None, 50, "length"),
    row("p2", 0, "incorrect", " 3", 40, "loop"),
    row("p2", 1, "correct", "6", 20),
    row("p2", 2, "correct", "6.0", 20),
    row("p2", 3, "incorrect", "4", 60),
]


def test_aggregation_matches_hand_computed_values():
    rows = HAND[:]
    random.Random(0).shuffle(rows)  # sample order must come from sample_index, not row order
    m = evaluate.aggregate_shards([make_table(rows, EVAL_SAMPLES)], num_samples=4, ks=[1, 2, 3, 4, 8])
    assert m["num_problems"] == 2 and m["num_samples"] == 8
    assert m["pass_at_1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    # pass@2: p1 1 - C(3,2)/C(4,2) = 1/2, p2 1 - C(2,2)/C(4,2) = 5/6; pass@3: p1 1 - C(3,3)/C(4,3) = 3/4, p2 1.
    assert m["pass_at_k"] == pytest.approx({"1": 0.375, "2": (1 / 2 + 5 / 6) / 2, "3": (3 / 4 + 1) / 2, "4": 1.0})
    # cons@k is the expectation over the k-subsets of the 4 samples, a tie split between the tied answers (issue 16);
    # the correct answers vote together although written differently. cons@1 = pass@1.
    # p1 (G, "7", -, -): k=2 {G,7} 1/2, {G,-} x2 1 -> 2.5/6; k=3 {G,7,-} x2 1/2, {G,-,-} 1 -> 2/4; k=4 tie -> 1/2.
    # p2 ("3", G, G, "4"): k=2 {3,G} x2 1/2, {G,G} 1, {G,4} x2 1/2 -> 3/6; k=3 {3,G,G} 1, {3,G,4} x2 1/3,
    # {G,G,4} 1 -> (8/3)/4; k=4 G twice -> 1.
    expected = {"1": 0.375, "2": (2.5 / 6 + 3 / 6) / 2, "3": (2 / 4 + 2 / 3) / 2, "4": (1 / 2 + 1) / 2}
    assert m["cons_at_k"] == pytest.approx(expected, abs=1e-6)
    assert m["k_skipped"] == [8]
    assert m["mean_tokens"] == pytest.approx(280 / 8)
    assert m["mean_tokens_correct"] == pytest.approx(50 / 3)
    assert m["mean_tokens_incorrect"] == pytest.approx(230 / 5)
    assert m["length_share"] == 0.25 and m["loop_share"] == 0.125
    assert m["by_status"] == {"correct": 3, "incorrect": 3, "no_answer": 2}
    assert sorted(map(int, m["pass_at_k_curve"])) == [1, 2, 3, 4]


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_curve_agrees_with_enumerating_subsets():
    rng = random.Random(1)
    rows, flags = [], {}
    for p in range(6):
        flags[p] = [rng.random() < 0.3 for _ in range(7)]
        for j, ok in enumerate(flags[p]):
            rows.append(row(f"p{p}", j, "correct" if ok else "incorrect", "1" if ok else "0", 5))
    m = evaluate.aggregate_shards([make_table(rows, EVAL_SAMPLES)], num_samples=7, ks=[1, 3])
    for k in range(1, 8):
        want = sum(brute_pass_at_k(f, k) for f in flags.values()) / len(flags)
        assert m["pass_at_k_curve"][str(k)] == pytest.approx(want)


def test_eta_and_aes_against_the_reference_including_an_accuracy_drop():
    metrics = {
        "base": {"pass_at_1": 0.5, "mean_tokens": 100.0},
        "shorter_worse": {"pass_at_1": 0.4, "mean_tokens": 60.0},
        "shorter_better": {"pass_at_1": 0.6, "mean_tokens": 80.0},
    }
    got = evaluate.compare_to_reference(metrics, "base")
    assert got["base"] == {"eta": 1.0, "aes": 0.0}
    # dLen = 0.4, dAcc = -0.2: the drop branch, alpha*dLen - gamma*|dAcc| = 0.4 - 5*0.2.
    assert got["shorter_worse"]["aes"] == pytest.approx(-0.6)
    assert got["shorter_worse"]["eta"] == pytest.approx((0.4 / 0.5) * (100 / 60))
    # dLen = 0.2, dAcc = +0.2: alpha*dLen + beta*dAcc = 0.2 + 3*0.2.
    assert got["shorter_better"]["aes"] == pytest.approx(0.8)
    assert got["shorter_better"]["eta"] == pytest.approx(1.2 * 1.25)
    assert evaluate.compare_to_reference(metrics, "base", alpha=2, gamma=1)["shorter_worse"]["aes"] == pytest.approx(
        0.6
    )
    zero = {"base": {"pass_at_1": 0.0, "mean_tokens": 10.0}, "x": {"pass_at_1": 0.5, "mean_tokens": 5.0}}
    assert evaluate.compare_to_reference(zero, "base")["x"] == {"eta": None, "aes": None}
    assert evaluate.compare_to_reference(metrics, "absent")["base"] == {"eta": None, "aes": None}


def synthetic_shards(num_problems: int, per_shard: int, n: int, refs: list, seed: int = 0):
    """Yield EVAL_SAMPLES shards lazily, remembering a weak reference to each one."""
    rng = random.Random(seed)
    for start in range(0, num_problems, per_shard):
        rows = []
        for p in range(start, min(start + per_shard, num_problems)):
            for j in range(n):
                ok = rng.random() < 0.4
                rows.append(
                    row(f"p{p}", j, "correct" if ok else "incorrect", str(rng.randint(0, 3)), rng.randint(1, 99))
                )
        table = make_table(rows, EVAL_SAMPLES)
        refs.append(weakref.ref(table))
        yield table


def test_aggregation_streams_one_shard_at_a_time():
    """500 problems x 16 samples in shards of 50: no earlier shard survives while a later one is read."""
    refs: list[weakref.ref] = []
    alive_at_yield = []

    def watched():
        for table in synthetic_shards(500, 50, 16, refs):
            gc.collect()
            alive_at_yield.append(sum(r() is not None for r in refs[:-1]))
            yield table
            del table

    agg = evaluate.EvalAggregator(16, [1, 4, 8, 16])
    for shard in watched():
        agg.add(shard)
    del shard
    gc.collect()
    m = agg.result()
    assert m["num_problems"] == 500 and m["num_samples"] == 8000
    # The consumer's loop variable may still hold the previous shard when the next is produced: at most one.
    assert len(alive_at_yield) == 10 and max(alive_at_yield) <= 1
    assert agg.max_rows_held == 50 * 16
    assert all(r() is None for r in refs), "the aggregator kept a shard"
    # Streaming changes nothing: the same data in one table gives the same metrics.
    whole = pa.concat_tables(list(synthetic_shards(500, 50, 16, [])))
    assert evaluate.aggregate_shards([whole], 16, [1, 4, 8, 16]) == m


def test_reading_shards_skips_completions(tmp_path: Path):
    """Shards on disk hold 2 KB completions; aggregation reads only the small columns, shard by shard."""
    stage = tmp_path / "eval" / "b" / "m"
    text = "word " * 400
    for i in range(5):
        rows = [
            row(f"p{p}", j, "correct", "1", 400) | {"completion": text}
            for p in range(i * 20, i * 20 + 20)
            for j in range(16)
        ]
        write_shard(stage, i, make_table(rows, EVAL_SAMPLES))
    peak = [0]

    def tracked():
        for table in evaluate.iter_eval_shards(stage):
            assert table.column_names == evaluate.AGG_COLUMNS and table.num_rows == 320
            peak[0] = max(peak[0], pa.total_allocated_bytes())
            yield table

    before = pa.total_allocated_bytes()
    m = evaluate.aggregate_shards(tracked(), 16, [1, 16])
    assert m["num_samples"] == 1600 and m["pass_at_1"] == 1.0
    # All completions together are 1600 x 2 KB = 3.2 MB; what is read at a time is a small fraction of that.
    assert peak[0] - before < 0.1 * 1600 * len(text)


def test_a_problem_split_across_shards_is_refused():
    a = make_table([row("p1", 0, "correct", "1", 3)], EVAL_SAMPLES)
    b = make_table([row("p1", 1, "correct", "1", 3)], EVAL_SAMPLES)
    with pytest.raises(ValueError, match="more than one shard"):
        evaluate.aggregate_shards([a, b], 2, [1])


def test_sample_rows_turn_failed_requests_into_error_rows():
    results = [
        GenerationResult([Sample("a \\boxed{1}", 2, "stop"), Sample("b", 1, "length")], 5),
        GenerationResult([], 5, error="boom"),
    ]
    verdicts = [Verdict("correct", True, "1"), Verdict("no_answer", None, None)]
    rows = evaluate.sample_rows("bench", "base", "path/m", ["p1", "p2"], results, verdicts, 2)
    assert [(r["problem_id"], r["sample_index"], r["status"], r["finish_reason"]) for r in rows] == [
        ("p1", 0, "correct", "stop"),
        ("p1", 1, "no_answer", "length"),
        ("p2", 0, "error", "error"),
        ("p2", 1, "error", "error"),
    ]
    make_table(rows, EVAL_SAMPLES)  # matches the schema
    m = evaluate.aggregate_shards([make_table(rows, EVAL_SAMPLES)], 2, [1, 2])
    assert m["pass_at_1"] == pytest.approx(0.25) and m["mean_tokens"] == pytest.approx(1.5)  # errors have no length
    with pytest.raises(ValueError, match="more verdicts"):
        evaluate.sample_rows("b", "m", "m", ["p1", "p2"], results, [*verdicts, verdicts[0]], 2)


def test_results_rows_fit_the_schema():
    m = evaluate.aggregate_shards([make_table(HAND, EVAL_SAMPLES)], 4, [1, 2, 4])
    section = {"b": {"base": {**m, "eta": 1.0, "aes": 0.0}}}
    table = make_table(evaluate.results_rows(section, "base"), EVAL_RESULTS)
    got = table.to_pylist()[0]
    assert got["pass_at_k"] == [(1, 0.375), (2, m["pass_at_k"]["2"]), (4, 1.0)] and got["reference_model"] == "base"


def test_models_and_benchmarks_resolve(tmp_path: Path):
    backend = backend_config(kind="hf", model="demo")
    cfg = EvalConfig(models=["base", "trained", "other=/models/x", "/models/y/"])
    specs, skipped = evaluate.resolve_models(cfg, backend, tmp_path)
    assert [s.name for s in specs] == ["base", "other", "y"] and "train stage" in skipped["trained"]
    assert specs[0].backend == backend and specs[1].backend.model == "/models/x"
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "model" / "config.json").write_text("{}")
    specs, skipped = evaluate.resolve_models(EvalConfig(), backend, tmp_path)
    assert specs[1].backend.model == str(tmp_path / "train" / "model")
    assert list(skipped) == ["grpo"]  # the default's third model, the GRPO baseline, has not run here
    fake = backend_config(kind="fake", script="s.yaml")
    specs, _ = evaluate.resolve_models(EvalConfig(backends={"trained": fake}), backend, tmp_path / "nowhere")
    assert specs[1].backend == fake

    demo = ProblemsConfig(source="demo", num_problems=8, seed=3)
    ((name, heldout),) = evaluate.resolve_benchmarks(EvalConfig(), demo).items()
    assert name == evaluate.HELDOUT_BENCHMARK and heldout.seed != demo.seed and heldout.num_problems == 8
    with pytest.raises(UserError, match="eval.benchmarks is empty"):
        evaluate.resolve_benchmarks(EvalConfig(), ProblemsConfig(source="file", path="x.jsonl"))
    kept, dropped = evaluate.exclude_problems([{"problem": "What is  1+1?"}, {"problem": "New"}], ["What is 1+1?\n"])
    assert kept == [{"problem": "New"}] and dropped == 1


@pytest.mark.parametrize(
    "section, match",
    [
        ({"models": ["base", "base"]}, "same model twice"),
        ({"models": ["a=/x", "a=/y"]}, "same model twice"),
        ({"benchmarks": {"bad/name": {"source": "demo"}}}, "benchmark names"),
        ({"k": [0, 4]}, "k must be"),
        ({"backends": {"nobody": {"kind": "fake"}}}, "not in models"),
    ],
)
def test_eval_config_errors_name_the_field(section, match):
    with pytest.raises(ConfigError, match=match):
        Recipe.from_dict({"eval": section}, source="r.yaml")


# --- the flow, on the fake backend -----------------------------------------------------------------------------------

TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"
BENCH = [
    {"id": "q1", "problem": "What is 1 + 1?", "answer": "2"},
    {"id": "q2", "problem": "What is 2 * 3?", "answer": "6"},
    {"id": "q3", "problem": "What is 5 - 1?", "answer": "4"},  # also a training problem: left out
]
BASE = {
    "What is 1 + 1?": ["One and one make two, so \\boxed{2}.", "Hmm, maybe \\boxed{3}.", "\\boxed{2}", "I give up."],
    "What is 2 * 3?": [
        "Wait, two times three. Wait, that is five. Wait, again: \\boxed{5}.",
        {"text": "Wait. Wait. Wait. Wait. Wait. Wait.", "finish_reason": "loop"},
        "Two threes are six: \\boxed{6}.",
        "\\boxed{5}",
    ],
}
TRAINED = {
    "What is 1 + 1?": ["\\boxed{2}", "\\boxed{2}", "So \\boxed{2}.", "\\boxed{3}"],
    "What is 2 * 3?": ["\\boxed{6}", "It is \\boxed{6}.", "\\boxed{5}", "\\boxed{6}"],
}


def write_script(path: Path, samples: dict) -> str:
    script = {"template": TEMPLATE, "problems": {p: {"samples": s} for p, s in samples.items()}}
    path.write_text(yaml.safe_dump(script))
    return str(path)


def expected(samples: dict, gold: dict, ks: list[int]) -> dict:
    """Metrics computed independently of ckptdpo.evaluate: enumerate subsets, count words."""
    flags = {
        p: [("\\boxed{" + gold[p] + "}") in (s if isinstance(s, str) else s["text"]) for s in v]
        for p, v in samples.items()
    }
    texts = [s if isinstance(s, str) else s["text"] for v in samples.values() for s in v]
    return {
        "pass_at_1": sum(sum(f) / len(f) for f in flags.values()) / len(flags),
        "pass_at_k": {str(k): sum(brute_pass_at_k(f, k) for f in flags.values()) / len(flags) for k in ks},
        "mean_tokens": sum(count_words(t) for t in texts) / len(texts),
    }


def test_eval_flow_on_fake_backend(prefect_harness, tmp_path: Path):
    from flows.report import report_step
    from flows.stage import stage_flow

    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(p) + "\n" for p in BENCH))
    recipe = {
        "name": "fake-eval",
        "stages": ["eval"],
        "problems": {"source": "file", "path": "bench.jsonl"},
        "backend": {"kind": "fake", "model": "fake", "script": write_script(tmp_path / "base.yaml", BASE)},
        "verify": {"timeout_s": 10},
        "eval": {
            "benchmarks": {"tiny": {"source": "file", "path": "bench.jsonl"}},
            "models": ["base", "trained"],
            "backends": {"trained": {"kind": "fake", "script": write_script(tmp_path / "trained.yaml", TRAINED)}},
            "num_samples": 4,
            "k": [1, 2, 4, 8],
            "max_tokens": 100,
            "shard_size": 1,
        },
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    training = [p for p in BENCH if p["id"] == "q3"]
    rows = [{"problem_id": p["id"], "problem": p["problem"], "answer": p["answer"], "source": "t"} for p in training]
    write_shard(run_dir / "problems", 0, make_table(rows, PROBLEMS))
    write_manifest(run_dir / "problems", config_hash="t")

    section = stage_flow("eval", str(run_dir), str(recipe_path))
    gold = {p["problem"]: p["answer"] for p in BENCH}
    base, trained = section["tiny"]["base"], section["tiny"]["trained"]
    for got, samples in ((base, BASE), (trained, TRAINED)):
        want = expected(samples, gold, [1, 2, 4])
        assert got["num_problems"] == 2 and got["num_samples"] == 8
        assert got["pass_at_1"] == pytest.approx(want["pass_at_1"])
        assert got["pass_at_k"] == pytest.approx(want["pass_at_k"])
        assert got["mean_tokens"] == pytest.approx(want["mean_tokens"])
        assert got["k_skipped"] == [8]
    assert base["loop_share"] == pytest.approx(1 / 8)
    eta = (trained["pass_at_1"] / base["pass_at_1"]) * (base["mean_tokens"] / trained["mean_tokens"])
    assert trained["eta"] == pytest.approx(eta, abs=1e-5) and base["eta"] == 1.0
    assert trained["aes"] > 0  # shorter and more accurate
    assert read_stats(run_dir)["eval"] == section
    results = read_stage(run_dir / "eval")
    assert results.schema.equals(EVAL_RESULTS) and results.num_rows == 2
    assert sorted(p.name for p in (run_dir / "eval" / "tiny" / "base").glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    manifest = json.loads((run_dir / "eval" / "tiny" / "_problems" / "_manifest.json").read_text())
    assert manifest["stats"]["num_excluded"] == 1

    # A rerun generates nothing; a new k list re-aggregates the kept shards.
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "eval").glob("*/*/part-*.parquet")}
    assert stage_flow("eval", str(run_dir), str(recipe_path)) == section
    again = stage_flow("eval", str(run_dir), str(recipe_path), {"eval.k": [1, 3]})
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "eval").glob("*/*/part-*.parquet")} == mtimes
    assert sorted(again["tiny"]["base"]["pass_at_k"]) == ["1", "3"]

    path = Path(report_step(str(run_dir)))
    page = path.read_text()
    assert path == run_dir / "report" / "index.html" and "pass@k" in page and "could not be drawn" not in page


# --- code and multiple-choice benchmarks in the same flow ------------------------------------------------------------

HUMANEVAL_TINY = [
    {
        "task_id": f"HumanEval/{i}",
        "prompt": f'def f{i}(x):\n    """Return x plus {i}."""\n',
        "canonical_solution": f"    return x + {i}\n",
        "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n",
        "entry_point": f"f{i}",
    }
    for i in (1, 2)
]
ARC_TINY = [
    {
        "id": f"arc{i}",
        "question": {
            "stem": f"Which number is {i}?",
            "choices": [{"text": str(i + 10 * n), "label": lab} for n, lab in enumerate("ABCD")],
        },
        "answerKey": "A",
    }
    for i in (1, 2)
]


def test_eval_flow_with_code_and_choice_benchmarks(prefect_harness, tmp_path: Path):
    """Math, code and choice benchmarks in one eval: prompts per kind, verdicts per kind, `kind` in stats.json."""
    import gzip

    from ckptdpo.sources import load_eval_problems
    from flows.stage import stage_flow

    with gzip.open(tmp_path / "he.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL_TINY))
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC_TINY))
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(p) + "\n" for p in BENCH[:2]))
    he = load_eval_problems(ProblemsConfig(source="humaneval", path=str(tmp_path / "he.jsonl.gz")))
    arc = load_eval_problems(ProblemsConfig(source="arc", path=str(tmp_path / "arc.jsonl")))
    rules = []
    for r in he:  # two samples each: one right, one wrong
        i = r["problem_id"].split("/")[1]
        right = f"```python\ndef f{i}(x):\n    return x + {i}\n```"
        wrong = f"```python\ndef f{i}(x):\n    return x\n```"
        rules.append({"after": r["problem"][-40:] + "\n<|assistant|>\n", "texts": [right, wrong]})
    for r in arc:  # one right, one ambiguous
        rules.append(
            {"after": r["problem"][-160:] + "\n<|assistant|>\n", "texts": [f"\\boxed{{{r['answer']}}}", "A or B"]}
        )
    script = {
        "template": TEMPLATE,
        "problems": {p: {"samples": s[:2]} for p, s in BASE.items()},
        "continuations": rules,
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(script))
    recipe = {
        "name": "kinds",
        "stages": ["eval"],
        "problems": {"source": "file", "path": "bench.jsonl"},
        "backend": {"kind": "fake", "model": "fake", "script": str(tmp_path / "base.yaml")},
        "eval": {
            "benchmarks": {
                "tiny": {"source": "file", "path": "bench.jsonl"},
                "he": {"source": "humaneval", "path": "he.jsonl.gz"},
                "arc": {"source": "arc", "path": "arc.jsonl"},
            },
            "models": ["base"],
            "num_samples": 2,
            "k": [1, 2],
            "max_tokens": 100,
            "code_wall_s": 10,
            "allow_unsandboxed": True,  # isolation is used where available; CI machines without it still run this
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    section = stage_flow("eval", str(tmp_path / "run"), str(tmp_path / "recipe.yaml"))
    assert {b: section[b]["base"]["kind"] for b in section} == {"tiny": "math", "he": "code", "arc": "choice"}
    assert read_stats(tmp_path / "run")["eval"]["he"]["base"]["kind"] == "code"
    assert section["he"]["base"]["by_status"] == {"correct": 2, "incorrect": 2}
    assert section["he"]["base"]["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert section["arc"]["base"]["by_status"] == {"correct": 2, "no_answer": 2}
    assert section["tiny"]["base"]["num_samples"] == 4
    samples = pq.read_table(tmp_path / "run" / "eval" / "he" / "base" / "part-00000.parquet").to_pylist()
    assert all(s["finish_reason"] == "stop" for s in samples)  # every prompt matched its rule: no math instruction


def test_kind_prompt_drops_the_math_instruction_for_code_and_choice_only():
    from ckptdpo.backends.base import problem_message

    templated = f"<u>{problem_message('Q?')}</u><a>"
    assert evaluate.kind_prompt(templated, "Q?", "math") == templated
    assert evaluate.kind_prompt(templated, "Q?", "choice") == "<u>Q?</u><a>"
    with pytest.raises(ValueError, match="changed the user turn"):
        evaluate.kind_prompt("<u>q?</u>", "Q?", "code")
