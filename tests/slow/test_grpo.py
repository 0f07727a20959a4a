"""`python -m ckptdpo.grpo` end to end on a tiny model: two or more GRPO steps with an explicit budget change every
parameter, generate within 10% of the budget (as the summary says), and a run killed after its first checkpoint
resumes from it to the same kind of summary.

The model is a tiny random Llama with the train tests' byte-level tokenizer (no hub), given a chat template and
warmed up for a few hundred steps to answer "\\boxed{5}" or "\\boxed{6}" half of the time each: with a random model
every completion would earn 0, every advantage would be 0 and no parameter could change.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ckptdpo.backends.base import problem_messages
from ckptdpo.configs import GRPOConfig, VerifyConfig
from ckptdpo.grpo import GRPOJob, build_grpo_launch_command, build_grpo_merge_command
from ckptdpo.schemas import PROBLEMS, make_table
from ckptdpo.shards import write_manifest, write_shard
from ckptdpo.train import FAULT_EXIT_CODE, latest_checkpoint, write_job
from tests.flows import test_train
from tests.flows.test_train import ROOT, _assert_all_changed, _weights

pytestmark = pytest.mark.slow
tiny_tokenizer = test_train.tiny_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROBLEMS_ROWS = [
    {"problem_id": f"p{i}", "problem": f"What is {a}+{b}?", "answer": str(a + b), "source": "test"}
    for i, (a, b) in enumerate([(2, 3), (3, 3), (1, 4), (2, 4)])
]
BUDGET = 200  # 8 completions of at most 16 tokens a step: at least two steps
CFG = GRPOConfig(
    generation_budget=BUDGET, num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=1,
    max_completion_length=16, learning_rate=1e-3, warmup_ratio=0.0, save_steps=1, save_total_limit=3,
)  # fmt: skip


def _warm_up(model_dir: Path, tokenizer) -> None:
    """A few hundred supervised steps so the model answers each problem '\\boxed{5}' or '\\boxed{6}', then stops."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = []
    for p in PROBLEMS_ROWS:
        prompt = tokenizer.apply_chat_template(
            problem_messages(p["problem"]), tokenize=False, add_generation_prompt=True
        )
        for answer in ("5", "6"):
            ids = tokenizer(prompt)["input_ids"]
            completion = tokenizer(f"The answer is \\boxed{{{answer}}}." + tokenizer.eos_token)["input_ids"]
            batch.append((ids + completion, [-100] * len(ids) + completion))
    width = max(len(x) for x, _ in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def tiny_chat(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The warmed-up tiny model with a chat template, and a run directory holding its problems stage."""
    from ckptdpo.models import save_random_llama

    tokenizer = tiny_tokenizer["tokenizer"]
    tokenizer.chat_template = CHATML
    model_dir = tmp_path_factory.mktemp("grpo") / "model"
    tokenizer.save_pretrained(model_dir)
    save_random_llama(tokenizer, model_dir, hidden_size=32, intermediate_size=64, max_positions=512, bos_token_id=None)
    _warm_up(model_dir, tokenizer)
    run_dir = model_dir.parent / "run"
    write_shard(run_dir / "problems", 0, make_table(PROBLEMS_ROWS, PROBLEMS))
    write_manifest(run_dir / "problems", config_hash="test")
    return {"model": model_dir, "run_dir": run_dir}


def _grpo(tiny_chat, out: Path, cfg: GRPOConfig = CFG, merge: bool = False, **faults) -> subprocess.CompletedProcess:
    job = GRPOJob(
        grpo=cfg, problems_dir=str(tiny_chat["run_dir"] / "problems"), model=str(tiny_chat["model"]),
        output_dir=str(out), generation_budget=BUDGET,
        verify=VerifyConfig(timeout_s=20.0, workers=1, answer_format="boxed"), **faults,
    )  # fmt: skip
    path = write_job(job, out.parent / f"job-{out.name}.yaml")
    cmd = build_grpo_merge_command(path) if merge else build_grpo_launch_command(path, cfg)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_within_budget(s: dict) -> None:
    assert s["generation_budget"] == BUDGET and s["stopped_by"] == "budget"
    assert abs(s["generated_tokens"] - BUDGET) <= 0.1 * BUDGET, s["generated_tokens"]
    assert s["generated_tokens"] == sum(step["generated_tokens"] for step in s["steps"])
    assert [step["step"] for step in s["steps"]] == list(range(1, s["global_step"] + 1))
    assert s["global_step"] >= 2 and s["trained_tokens"] > s["generated_tokens"]


def test_grpo_trains_every_parameter_within_its_budget(tiny_chat, tmp_path):
    out = tmp_path / "grpo"
    done = _grpo(tiny_chat, out)
    assert done.returncode == 0, done.stderr[-4000:]
    s = _summary(out)
    _assert_within_budget(s)
    # Rewards came from the verifier: some completions right, some wrong, so the groups had something to learn.
    rewards = [step["reward_mean"] for step in s["steps"] if step["reward_mean"] is not None]
    assert rewards and 0 < sum(rewards) / len(rewards) < 1
    assert all(k in s for k in ("startup_s", "train_runtime_s", "save_s", "wall_time_s"))
    _assert_all_changed(_weights(tiny_chat["model"]), _weights(out / "model"))


def test_grpo_killed_after_its_first_checkpoint_resumes_from_it(tiny_chat, tmp_path):
    out = tmp_path / "grpo"
    first = _grpo(tiny_chat, out, fail_after_step=1)
    assert first.returncode == FAULT_EXIT_CODE, first.stderr[-4000:]
    assert getattr(latest_checkpoint(out), "name", None) == "checkpoint-1" and not (out / "summary.json").exists()
    saved = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    step_one = saved["stateful_callbacks"]["ckptdpo_grpo_progress"]["steps"]
    done = _grpo(tiny_chat, out)
    assert done.returncode == 0, done.stderr[-4000:]
    s = _summary(out)
    assert s["resumed_from"] == "checkpoint-1" and s["start_step"] == 1 and s["steps_run"] == s["global_step"] - 1
    # The steps before the kill are reported from the checkpoint, and count against the same budget.
    (before,) = step_one
    assert {k: s["steps"][0][k] for k in before} == before
    _assert_within_budget(s)


def test_grpo_with_lora_merges_its_adapter_into_the_model(tiny_chat, tmp_path):
    out = tmp_path / "grpo"
    cfg = CFG.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8})
    done = _grpo(tiny_chat, out, cfg)
    assert done.returncode == 0, done.stderr[-4000:]
    assert any((out / "adapter").glob("*.safetensors")) and _summary(out)["merged"] is False
    merged = _grpo(tiny_chat, out, cfg, merge=True)
    assert merged.returncode == 0, merged.stderr[-4000:]
    s = _summary(out)
    assert s["merged"] is True and s["lora"] is True
    _assert_within_budget(s)
    before, after = _weights(tiny_chat["model"]), _weights(out / "model")
    assert set(before) == set(after) and any(not (before[k] == after[k]).all() for k in before)


def test_grpo_on_two_cpu_ranks_counts_and_stops_together(tiny_chat, tmp_path):
    """torchrun with 2 ranks over gloo: the counts are summed over ranks, and both ranks stop at the same step."""
    out = tmp_path / "grpo"
    cfg = CFG.model_copy(update={"num_processes": 2, "per_device_train_batch_size": 4})
    done = _grpo(tiny_chat, out, cfg)
    assert done.returncode == 0, done.stderr[-4000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["completions_per_step"] == 8
    assert all(step["completions"] == 8 for step in s["steps"])
    _assert_within_budget(s)
