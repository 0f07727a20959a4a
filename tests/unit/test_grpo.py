"""The GRPO baseline's library parts: the verifier as reward function (real verifier), the factory's token count,
the budget's cap, stop and schedule, the job and the trainer arguments, the per-step figures that travel in
checkpoints, and the eval's third model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ckptdpo.configs import ConfigError, EvalConfig, GRPOConfig, Recipe, VerifyConfig, backend_config
from ckptdpo.errors import UserError
from ckptdpo.evaluate import resolve_models
from ckptdpo.grpo import (
    GRPOProgress,
    VerifierReward,
    budget_spent,
    build_grpo_job,
    build_grpo_kwargs,
    build_grpo_launch_command,
    factory_generated_tokens,
    factory_token_sources,
    generation_cap,
    load_grpo_job,
    lr_factor,
    prompt_rows,
    read_problems,
    resolve_generation_budget,
    step_bound,
)
from ckptdpo.schemas import PROBLEMS, make_table
from ckptdpo.shards import write_manifest, write_shard
from ckptdpo.train.job import write_job

REPO = Path(__file__).resolve().parents[2]
EOS, PAD, WORD = 0, 1, 7
# Gold answers in dollars: math-verify alone never matches `\$18.90`, not even with itself; the project's
# normalisation (currency signs removed on both sides) does.
DOLLARS = "\\$18.90"


def _call(reward: VerifierReward, texts: list[str], ids: list[list[int]], answers: list[str], kinds=None) -> list:
    """Call the reward the way GRPOTrainer does: conversational completions, their ids, every dataset column."""
    kinds = kinds or ["math"] * len(texts)
    metrics: dict[str, list[float]] = {}
    out = reward(
        prompts=[[{"role": "user", "content": "q"}]] * len(texts),
        completions=[[{"role": "assistant", "content": t}] for t in texts],
        completion_ids=ids,
        answer=answers,
        kind=kinds,
        problem_id=[f"p{i}" for i in range(len(texts))],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda name, value: metrics.setdefault(name, []).append(value),
    )
    reward.metrics = metrics
    return out


@pytest.fixture(scope="module")
def reward() -> VerifierReward:
    return VerifierReward(VerifyConfig(timeout_s=20.0, workers=1, answer_format="boxed"), EvalConfig(), [EOS, PAD])


def test_rewards_come_from_the_projects_verifier(reward):
    texts = [
        "It costs \\$18.90 in all, so the answer is \\boxed{\\$18.90}",  # the gold's own notation
        "So the total is \\boxed{18.90}",  # no currency sign: the same value once normalised
        "So the total is \\boxed{19.90}",  # wrong
        "The total is eighteen dollars and ninety cents.",  # no boxed answer (answer_format boxed)
    ]
    ids = [[WORD, WORD, EOS]] * 4
    assert _call(reward, texts, ids, [DOLLARS] * 4) == [1.0, 1.0, 0.0, 0.0]
    # math-verify on its own does not accept the dollar amount: the reward above is the normalisation's doing.
    from math_verify import parse, verify

    assert not verify(parse(DOLLARS), parse(DOLLARS))


def test_a_cut_off_completion_is_never_rewarded(reward):
    right = "So the total is \\boxed{\\$18.90}"
    # The same correct text: ended (last token EOS or pad) vs cut at max_completion_length (last token a word).
    got = _call(reward, [right, right, right], [[WORD, EOS], [WORD, PAD], [WORD, WORD]], [DOLLARS] * 3)
    assert got == [1.0, 1.0, 0.0]
    assert reward.metrics["verifier/cut_off_share"] == [pytest.approx(1 / 3)]


def test_a_verifier_failure_skips_the_sample_instead_of_scoring_zero(reward):
    # A gold answer nothing can check (empty after normalisation) is the verifier's failure: None, not 0.
    got = _call(reward, ["\\boxed{5}", "\\boxed{5}"], [[WORD, EOS]] * 2, ["\\$", "5"])
    assert got == [None, 1.0]
    assert reward.metrics["verifier/skipped_share"] == [0.5]


def test_choice_problems_are_checked_in_the_pool(reward):
    got = _call(
        reward,
        ["Answer: B", "Answer: C", "Answer: B"],
        [[WORD, EOS], [WORD, EOS], [WORD, WORD]],
        ["B", "B", "B"],
        kinds=["choice"] * 3,
    )
    assert got == [1.0, 0.0, 0.0]


# --- the factory's cost and the budget ------------------------------------------------------------------------------

STATS = {
    "generate": {"generated_tokens": 1000, "completion_tokens": 1000},
    "resample": {"generated_tokens": 400, "rounds": [{"tokens": 300}, {"tokens": 100}]},
    "values": {"generated_tokens": 250},
    "dto": {"probe_generated_tokens": 50, "tokens_before": 999},
    "train": {"tokens": 123456},
}


def test_factory_generated_tokens_sum_what_each_stage_records():
    assert factory_token_sources(STATS) == {"generate": 1000, "resample": 400, "values": 250, "dto": 50}
    assert factory_generated_tokens(STATS) == 1700
    # Older stats: resample from its rounds, DTO without the probe count (likelihood probes or an older run).
    older = {"generate": {"completion_tokens": 10}, "resample": {"rounds": [{"tokens": 3}, {"tokens": 4}]}, "dto": {}}
    assert factory_token_sources(older) == {"generate": 10, "resample": 7}
    assert factory_generated_tokens({}) == 0


def test_budget_resolves_match_and_refuses_it_without_factory_tokens():
    assert resolve_generation_budget("match", STATS) == 1700
    assert resolve_generation_budget(5000, STATS) == 5000
    assert resolve_generation_budget(None, STATS) is None
    with pytest.raises(UserError, match="generation_budget is 'match'"):
        resolve_generation_budget("match", {})


def _spend(budget: int, completions: int, max_len: int, rng: random.Random) -> tuple[int, int]:
    """Simulate the trainer's loop: each generation capped by `generation_cap`, stopped by `budget_spent`."""
    generated = steps = 0
    while True:
        cap = generation_cap(budget - generated, completions, max_len) or max_len
        generated += sum(rng.randint(1, cap) for _ in range(completions))
        steps += 1
        assert steps <= step_bound(budget, completions, 1)
        if budget_spent(generated, budget, completions):
            return generated, steps


@pytest.mark.parametrize("seed", range(20))
def test_a_budgeted_run_ends_within_five_percent_or_one_token_per_completion_of_the_budget(seed):
    rng = random.Random(seed)
    budget, completions, max_len = rng.randint(100, 50_000), rng.choice([2, 8, 32]), rng.choice([16, 256, 1024])
    generated, _ = _spend(budget, completions, max_len, rng)
    assert budget - max(completions, 0.05 * budget) <= generated < budget + completions


def test_cap_only_when_a_full_generation_could_overshoot():
    assert generation_cap(10_000, 8, 100) is None  # 800 tokens at most: no cap
    assert generation_cap(500, 8, 100) == 63  # ceil(500 / 8)
    assert generation_cap(3, 8, 100) == 1


def test_learning_rate_schedule_over_the_budget():
    assert lr_factor(0.0, "cosine_with_min_lr", 0.1, 0.1) == 0.0
    assert lr_factor(0.05, "cosine_with_min_lr", 0.1, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, "cosine_with_min_lr", 0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, "cosine_with_min_lr", 0.1, 0.1) == pytest.approx(0.1)
    assert lr_factor(1.7, "cosine", 0.0, 0.1) == pytest.approx(0.0)
    assert lr_factor(0.55, "linear", 0.1, 0.0) == pytest.approx(0.5)
    assert lr_factor(0.9, "constant_with_warmup", 0.1, 0.0) == 1.0
    assert all(0 <= lr_factor(p / 100, "cosine_with_min_lr", 0.1, 0.1) <= 1 for p in range(101))


# --- config, job, arguments ----------------------------------------------------------------------------------------


def test_config_defaults_follow_open_r1_and_bad_settings_are_one_sentence():
    cfg = GRPOConfig()
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.min_lr_rate, cfg.warmup_ratio) == (
        1e-6,
        "cosine_with_min_lr",
        0.1,
        0.1,
    )
    assert (cfg.max_completion_length, cfg.generation_budget, cfg.seed) == (1024, "match", 42)
    with pytest.raises(ConfigError, match="grpo.generation_budget"):
        Recipe.from_dict({"grpo": {"generation_budget": 0}})
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        Recipe.from_dict({"grpo": {"num_generations": 3, "per_device_train_batch_size": 4}})
    # open-r1 samples 7 per prompt on 7 GPUs: fine over all processes.
    GRPOConfig(num_generations=7, num_processes=7)
    for path in ("recipes/demo.yaml", "recipes/r1-distill-qwen-1.5b/deepscaler.yaml"):
        recipe = Recipe.from_yaml(REPO / path)
        assert "grpo" in recipe.stages and "grpo" in recipe.eval.models


def _run_dir(tmp_path: Path, n: int = 6) -> Path:
    run = tmp_path / "run"
    rows = [
        {"problem_id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1), "source": "t"} for i in range(n)
    ]
    write_shard(run / "problems", 0, make_table(rows, PROBLEMS))
    write_manifest(run / "problems", config_hash="t")
    return run


def test_job_carries_the_runs_problems_prompts_verifier_and_resolved_budget(tmp_path):
    run = _run_dir(tmp_path)
    recipe = Recipe.from_yaml(REPO / "recipes/demo.yaml")
    with pytest.raises(UserError, match="'match'"):
        build_grpo_job(recipe.model_copy(update={"grpo": GRPOConfig(generation_budget="match")}), run, "m")
    job = build_grpo_job(recipe.model_copy(update={"grpo": GRPOConfig()}), run, "m", stats=STATS)
    assert job.generation_budget == 1700 and job.budget_sources["generate"] == 1000
    assert job.verify == recipe.verify and job.output_dir == str(run / "grpo") and job.kind == "math"
    path = write_job(job, tmp_path / "job.yaml")
    assert load_grpo_job(path) == job
    with pytest.raises(UserError, match="grpo job file not found"):
        load_grpo_job(tmp_path / "none.yaml")

    rows = prompt_rows(read_problems(job.problems_dir), job.kind, [(e.problem, e.solution) for e in job.few_shot])
    assert len(rows) == 6 and rows[0]["answer"] == "1" and rows[0]["kind"] == "math"
    # The worked examples come first as earlier turns, then the problem with the instruction.
    roles = [m["role"] for m in rows[0]["prompt"]]
    assert roles == ["user", "assistant"] * len(job.few_shot) + ["user"]
    assert rows[0]["prompt"][-1]["content"].startswith("What is 0 + 1?\n\nPlease reason step by step")

    assert build_grpo_launch_command(path, job.grpo)[1:] == ["-m", "ckptdpo.grpo", "--config", str(path)]


def test_trainer_arguments_with_and_without_a_budget(tmp_path):
    run = _run_dir(tmp_path)
    recipe = Recipe.from_yaml(REPO / "recipes/demo.yaml")
    job = build_grpo_job(recipe, run, "m", stats=STATS)
    kwargs = build_grpo_kwargs(job, use_cpu=True, world_size=1)
    cfg = job.grpo
    completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    # The budget ends the run: max_steps only bounds the loop, and the schedule runs over tokens (no step schedule).
    assert kwargs["max_steps"] == step_bound(job.generation_budget, completions, 1)
    assert "lr_scheduler_type" not in kwargs
    assert (kwargs["num_generations"], kwargs["max_completion_length"]) == (
        cfg.num_generations,
        cfg.max_completion_length,
    )
    free = job.model_copy(update={"generation_budget": None})
    kwargs = build_grpo_kwargs(free, use_cpu=True, world_size=1)
    assert kwargs["max_steps"] == cfg.max_steps and kwargs["lr_scheduler_type"] == cfg.lr_scheduler_type
    from trl import GRPOConfig as TRLConfig

    fields = set(TRLConfig.__dataclass_fields__)
    assert set(kwargs) <= fields, set(kwargs) - fields


def test_progress_travels_in_the_trainer_state_and_stops_at_the_resumed_step():
    p = GRPOProgress()
    p.add(generated_tokens=90, completions=8, scored=6, skipped=2, reward_sum=3.0, trained_tokens=400)
    first = p.close_step(1)
    assert first["reward_mean"] == 0.5 and first["skipped_share"] == 0.25 and first["completion_length"] == 11.25
    p.add(generated_tokens=10, completions=8, scored=8, reward_sum=8.0, capped=1)
    p.close_step(2)
    assert p.generated_tokens == 100
    state = {"global_step": 1, "stateful_callbacks": {"ckptdpo_grpo_progress": p.to_state()}}
    resumed = GRPOProgress.from_trainer_state(state)
    assert resumed.steps == [first] and resumed.generated_tokens == 90


def test_eval_knows_the_grpo_model(tmp_path):
    backend = backend_config(kind="hf", model="demo")
    specs, skipped = resolve_models(EvalConfig(), backend, tmp_path)
    assert [s.name for s in specs] == ["base"]
    assert "grpo stage has not run" in skipped["grpo"] and "train stage" in skipped["trained"]
    (tmp_path / "grpo" / "model").mkdir(parents=True)
    (tmp_path / "grpo" / "model" / "config.json").write_text("{}")
    specs, skipped = resolve_models(EvalConfig(), backend, tmp_path)
    assert [s.name for s in specs] == ["base", "grpo"] and specs[1].backend.model == str(tmp_path / "grpo" / "model")
