"""Recipe validation (issue 26): absurd sizes and settings that would do nothing are refused in one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdpo.configs import ConfigError, ProblemsConfig, Recipe
from ckptdpo.configs.recipe import parse_override

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"
DEEPSCALER = REPO / "recipes" / "r1-distill-qwen-1.5b" / "deepscaler.yaml"


def load(path: Path, *overrides: str) -> Recipe:
    return Recipe.from_yaml(path, dict(parse_override(o) for o in overrides))


def one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".") and "\n" not in message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("generate.num_samples=1000000000", "generate.num_samples"),
        ("generate.max_tokens=1000000000000", "generate.max_tokens"),
        ("generate.shard_size=1000000000", "generate.shard_size"),
        ("resample.max_attempts=1000000000", "resample.max_attempts"),
        ("resample.max_rounds=1000000000", "resample.max_rounds"),
        ("resample.max_tokens=1000000000", "resample.max_tokens"),
        ("eval.num_samples=1000000000", "eval.num_samples"),
        ("eval.shard_size=1000000000", "eval.shard_size"),
        ("eval.max_tokens=1000000000", "eval.max_tokens"),
        ("dto.probe_samples=1000000000", "dto.probe_samples"),
        ("dto.max_probes=1000000000", "dto.max_probes"),
        ("dto.judge.max_segments=1000000000", "dto.judge.max_segments"),
        ("problems.num_problems=1000000000", "problems.num_problems"),
        ("train.max_length=1000000000", "train.max_length"),
        ("task_runner.max_in_flight=1000000", "task_runner.max_in_flight"),
        ("verify.workers=1000000", "verify.workers"),
        ("backend.max_batch_size=1000000000", "backend.max_batch_size"),
        ("backend.batch_token_budget=1000000000000", "backend.batch_token_budget"),
        ("train.per_device_train_batch_size=1000000000", "train.per_device_train_batch_size"),
        ("train.num_processes=1000000", "train.num_processes"),
    ],
)
def test_absurd_sizes_are_refused_in_one_sentence(override: str, field: str):
    with pytest.raises(ConfigError) as info:
        load(DEMO, override)
    message = str(info.value)
    assert f"'{field}'" in message and one_sentence(message), message


def test_a_shard_whose_planned_text_is_absurd_is_refused_naming_the_fields():
    # Each setting alone is allowed; together one shard task would hold 256 x 4096 samples of 32k tokens.
    with pytest.raises(ConfigError) as info:
        load(DEMO, "generate.num_samples=4096", "generate.max_tokens=32768", "generate.shard_size=256")
    message = str(info.value)
    assert "generate.shard_size" in message and "generate.num_samples" in message and one_sentence(message), message
    # The fix it names works.
    assert load(DEMO, "generate.num_samples=4096", "generate.max_tokens=32768", "generate.shard_size=8")


def test_large_but_real_settings_still_load():
    recipe = load(DEEPSCALER)
    assert recipe.generate.max_tokens == 32768
    load(DEMO, "generate.num_samples=1024", "eval.num_samples=1024", "resample.max_attempts=64")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["problems.path=problems.jsonl"], "problems.path"),
        (["problems.split=test"], "problems.split"),
        (["problems.skip_invalid=true"], "problems.skip_invalid"),
        (["problems.source=file", "problems.path=p.jsonl", "problems.num_problems=5"], "problems.num_problems"),
        (["problems.source=file", "problems.path=p.jsonl", "problems.demo_mix={1: 1}"], "problems.demo_mix"),
        (["problems.source=file", "problems.path=p.jsonl", "problems.subset=main"], "problems.subset"),
        (["problems.source=humaneval", "problems.shuffle_choices=false"], "problems.shuffle_choices"),
        (["eval.benchmarks={b: {source: demo, path: x.jsonl}}"], "eval.benchmarks.b.path"),
        (["dto.probe=likelihood", "dto.probe_samples=8"], "dto.probe_samples"),
        (["task_runner.address=tcp://h:8786"], "task_runner.address"),
        (["train.lora_r=8"], "train.lora_r"),
        (["train.loss=simpo", "train.loss_type=ipo"], "train.loss_type"),
        (["dto.prune=false", "dto.judge.max_tokens=8"], "dto.judge"),
        (["resample.r2w=false", "resample.w2r=false"], "resample.r2w"),
    ],
)
def test_a_setting_that_would_do_nothing_is_refused_in_one_sentence(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as info:
        load(DEMO, *overrides)
    message = str(info.value)
    assert needle in message and one_sentence(message), message


def test_switching_the_problem_source_drops_the_recipes_settings_of_the_old_source():
    # demo.yaml sets num_problems and seed for the demo generator: switching to a file keeps neither silently.
    recipe = load(DEMO, "problems.source=file", "problems.path=p.jsonl")
    assert recipe.problems.source == "file" and recipe.problems.num_problems == 64
    # The README's way to point the DeepScaleR recipe at a local file (hf -> file keeps the field names).
    recipe = load(DEEPSCALER, "problems.source=file", "problems.path=data.jsonl")
    assert recipe.problems.path == "data.jsonl" and recipe.problems.id_field is None


def test_switching_an_option_off_on_the_command_line_drops_what_the_file_set_for_it():
    # demo.yaml sets dto.judge and dto.prune_without_exit: turning pruning off must still be one --set.
    recipe = load(DEMO, "dto.prune=false")
    assert recipe.dto.prune is False and recipe.dto.prune_without_exit is False
    assert load(DEEPSCALER, "dto.probe=likelihood").dto.probe_samples == 4  # deepscaler's 4 is the default
    # Set explicitly after the switch, the setting is refused again.
    with pytest.raises(ConfigError, match="dto.prune_without_exit does nothing"):
        load(DEMO, "dto.prune=false", "dto.prune_without_exit=true")


def test_a_setting_equal_to_its_default_is_not_refused_and_a_dumped_recipe_reloads():
    load(DEMO, "problems.split=train")  # the default: it does nothing, and changes nothing
    for path in (DEMO, DEEPSCALER):
        recipe = load(path)
        assert Recipe.from_dict(recipe.model_dump(mode="json")) == recipe  # what the flows and the refresh do
    assert ProblemsConfig.model_validate(ProblemsConfig(source="demo").model_dump()).source == "demo"
