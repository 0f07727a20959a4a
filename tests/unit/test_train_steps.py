"""The pure steps of a training run, checked without a trainer: pair rows and their datasets, the trainer
arguments, launch commands, token counting and the summary computed from a trainer state."""

from __future__ import annotations

import pytest

from ckptdpo.configs import TrainConfig
from ckptdpo.errors import UserError
from ckptdpo.train import (
    TokenCounts,
    build_launch_command,
    build_merge_command,
    build_pair_rows,
    build_training_kwargs,
    count_batch_tokens,
    dataset_dir,
    materialize_dataset,
    summarize_run,
    training_dtype,
)
from ckptdpo.train.arguments import loss_kwargs, reference_dtype
from ckptdpo.train.pairs import TRUNCATION_MARKER, prepare_pairs
from ckptdpo.train.progress import TOKEN_COUNTS_KEY
from ckptdpo.train.trainer import pair_lengths
from tests.flows import test_train
from tests.flows.test_train import MAX_LENGTH, _rows

# A byte-level BPE trained here on a few lines (no model, no hub).
tiny_tokenizer = test_train.tiny_tokenizer


def test_pair_rows_are_filtered_by_length_and_split_by_problem(tiny_tokenizer):
    tok = tiny_tokenizer["tokenizer"]
    cfg = TrainConfig(pair_types=["r2w", "w2r"], max_length=MAX_LENGTH, eval_fraction=0.3)
    train, evals, report = build_pair_rows(_rows(), tok, cfg, "pairs/")
    assert report["dropped"]["over_max_length"] == 1 and report["dropped"]["prompt_not_prefix"] == 1
    assert len(train) + len(evals) == report["num_pairs_used"] == 12
    assert (report["num_train"], report["num_eval"]) == (len(train), len(evals)) and evals
    assert {r["problem_id"] for r in train}.isdisjoint({r["problem_id"] for r in evals})
    longest = max(len(tok(r["prompt"] + c)["input_ids"]) for r in train + evals for c in (r["chosen"], r["rejected"]))
    assert longest <= MAX_LENGTH
    # Nothing fits: one sentence naming the source and the settings to check.
    with pytest.raises(UserError, match=r"^pairs/: no usable training pairs .*train.max_length"):
        build_pair_rows(_rows(), tok, cfg.model_copy(update={"max_length": 8}), "pairs/")


def test_datasets_on_disk_give_every_process_the_same_cache_path(tiny_tokenizer, tmp_path):
    import datasets

    rows = build_pair_rows(_rows(), tiny_tokenizer["tokenizer"], TrainConfig(max_length=MAX_LENGTH), "p")[0]
    # In memory, a derived cache (TRL's precomputed reference log-probs) gets a random name in a private temp dir.
    memory = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    assert memory._get_cache_file_path("fp") != memory._get_cache_file_path("fp")
    where = dataset_dir(tmp_path / "data", "train", rows)
    assert where == dataset_dir(tmp_path / "data", "train", list(rows))
    assert where != dataset_dir(tmp_path / "data", "train", rows[1:])
    first, second = materialize_dataset(rows, where), materialize_dataset(rows, where)  # two ranks
    assert first._fingerprint == second._fingerprint
    assert first._get_cache_file_path("fp") == second._get_cache_file_path("fp") == str(where / "cache-fp.arrow")
    assert first["chosen"] == [r["chosen"] for r in rows]
    assert not list(where.parent.glob(".*tmp*"))


def test_training_arguments_follow_the_config():
    assert training_dtype(TrainConfig(bf16=True, lora=True), deepspeed=False) == "bfloat16"
    assert training_dtype(TrainConfig(bf16=True), deepspeed=True) == "bfloat16"
    assert training_dtype(TrainConfig(bf16=True), deepspeed=False) == "float32"  # fp32 weights under autocast
    assert training_dtype(TrainConfig(), deepspeed=True) == "float32"
    cfg = TrainConfig(zero_stage=3, bf16=True, max_steps=7, save_total_limit=1, learning_rate=1e-5)
    kw = build_training_kwargs(cfg, "/out", use_cpu=True, liger=False)
    assert kw["deepspeed"]["zero_optimization"]["stage"] == 3 and kw["ddp_backend"] == "gloo"
    assert kw["deepspeed"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert kw["model_init_kwargs"]["dtype"] == "bfloat16"
    assert (kw["max_steps"], kw["save_total_limit"], kw["learning_rate"]) == (7, 1, 1e-5)
    plain = build_training_kwargs(TrainConfig(), "/out", use_cpu=False, liger=True)
    assert plain["deepspeed"] is None and plain["ddp_backend"] is None and plain["use_liger_kernel"]
    assert loss_kwargs(TrainConfig(precompute_ref_log_probs=True))["precompute_ref_log_probs"]
    simpo = loss_kwargs(TrainConfig(loss="simpo", beta=2.0, gamma_beta_ratio=0.25))
    assert simpo == {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5}


def test_multi_machine_launch_commands():
    job = "/runs/x/train/job.yaml"
    nodes = dict(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29600)
    torchrun = build_launch_command(job, TrainConfig(num_processes=4, zero_stage=2, **nodes), python="py")
    assert torchrun[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" not in torchrun
    assert torchrun[3:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port",
                              "29600", "--nproc_per_node", "4"]  # fmt: skip
    acc = build_launch_command(job, TrainConfig(accelerate_config="z3.yaml", num_processes=8, **nodes), python="py")
    assert acc[5:7] == ["--num_processes", "16"]  # accelerate counts processes over all machines
    assert acc[9:17] == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                         "--main_process_port", "29600"]  # fmt: skip
    assert acc[17:] == ["-m", "ckptdpo.train", "--config", job]
    # One machine keeps the config file's own settings and torchrun's private rendezvous.
    assert "--num_machines" not in build_launch_command(job, TrainConfig(accelerate_config="z.yaml"), python="py")
    assert build_merge_command(job, python="py") == ["py", "-m", "ckptdpo.train", "--config", job, "--merge"]
    with pytest.raises(ValueError, match="main_process_ip"):
        TrainConfig(num_machines=2)
    with pytest.raises(ValueError, match="machine_rank"):
        TrainConfig(num_machines=2, machine_rank=2, main_process_ip="h")


def test_token_counts_of_dpo_and_cpo_batches():
    import torch

    # DPOTrainer: chosen and rejected stacked into one batch padded to the longest row.
    dpo = {
        "input_ids": torch.zeros(4, 10, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 10] + [[1] * 6 + [0] * 4] * 3),
    }
    assert count_batch_tokens(dpo) == (28, 40)
    # CPOTrainer: chosen (width 5) and rejected (width 8) padded apart, concatenated at the wider.
    cpo = {
        "chosen_input_ids": torch.zeros(2, 5),
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
        "rejected_input_ids": torch.zeros(2, 8),
        "rejected_attention_mask": torch.tensor([[1] * 8, [1] * 2 + [0] * 6]),
    }
    assert count_batch_tokens(cpo) == (18, 32)
    lengths = pair_lengths(_Columns(prompt_ids=[[1, 2], [3]], chosen_ids=[[4], [5, 6, 7]], rejected_ids=[[8, 9], [1]]))
    assert lengths == [4, 4]


class _Columns(dict):
    """A dataset stand-in for pair_lengths: named columns of token lists."""

    @property
    def column_names(self):
        return list(self)


def test_summary_from_a_resumed_trainer_state_counts_the_whole_run():
    # Resumed from step 2: log_history holds steps 1-2 from the checkpoint, then 3-4; the counts came with it.
    counts = TokenCounts.from_trainer_state(
        {"global_step": 2, "stateful_callbacks": {TOKEN_COUNTS_KEY: {"steps": [[1, 10, 16], [2, 12, 16], [3, 9, 9]]}}}
    )
    assert counts.steps == [[1, 10, 16], [2, 12, 16]]  # step 3 was never checkpointed: it is trained again
    counts.close_step(3, 11, 12)
    counts.close_step(4, 8, 8)
    history = [{"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 10} for s in (1, 2, 3, 4)]
    history.append({"step": 4, "train_runtime": 2.0})
    summary = summarize_run({"global_step": 4, "log_history": history}, counts, start_step=2, runtime=2.0)
    assert (summary["global_step"], summary["start_step"], summary["steps_run"]) == (4, 2, 2)
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3, 4] and summary["final_loss"] == pytest.approx(0.66)
    assert summary["tokens"] == 41 and summary["tokens_this_session"] == 19 and summary["tokens_per_s"] == 9.5
    padding = summary["padding"]
    assert (padding["real_tokens"], padding["padded_tokens"]) == (41, 52)
    assert padding["padding_fraction"] == pytest.approx(11 / 52)
    assert padding["per_step"][2] == {"step": 3, "real_tokens": 11, "padded_tokens": 12}
    assert not summary["tokens_estimated"]


PROBLEM = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_a_long_prompt_keeps_its_problem_and_the_end_of_its_prefix(tiny_tokenizer, loss):
    tok = tiny_tokenizer["tokenizer"]
    prompt = PROBLEM + "Let me add the numbers. " * 30 + "So far"
    row = test_train._pair(7, prompt, " Wait, 2+3=5.", " But 2+3=6.", "r2w", "p")
    for limits in ({"max_length": 64}, {"max_length": MAX_LENGTH, "max_prompt_length": 32}):
        cfg = TrainConfig(loss=loss, pair_types=["r2w"], **limits)
        (kept,), report = prepare_pairs([row], tok, cfg)
        assert report["num_truncated"] == 1 and report["num_kept"] == 1 and report["num_dropped"] == 0
        assert report["truncation"] == "keep_problem_and_end" and report["num_cut_keep_end"] == 0
        # The templated problem, the marker, then the end of the prefix right before the checkpoint.
        head, tail = kept["prompt"].split(TRUNCATION_MARKER)
        assert head == PROBLEM and prompt.endswith(tail) and tail.endswith("So far")
        assert kept["chosen"] == " Wait, 2+3=5." + tok.eos_token
        ids = tok(kept["prompt"] + kept["chosen"], add_special_tokens=loss == "dpo")["input_ids"]
        prompt_ids = tok(kept["prompt"], add_special_tokens=loss == "dpo")["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # still a token prefix of both sides
        # Within the binding limit, and cut no deeper than needed (merges at the cut may cost a token).
        used, limit = (len(prompt_ids), cfg.max_prompt_length) if cfg.max_prompt_length else (len(ids), cfg.max_length)
        assert limit - 2 <= used <= limit and len(ids) <= cfg.max_length


def test_the_problem_ends_where_the_chat_template_opens_the_assistant_turn(tiny_tokenizer):
    import copy

    from ckptdpo.train.pairs import problem_end_finder

    tok = copy.deepcopy(tiny_tokenizer["tokenizer"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                     add_generation_prompt=True) + "Let me add. " * 40  # fmt: skip
    assert prompt[: problem_end_finder(tok)(prompt)].endswith("<|im_start|>assistant\n<think>\n")
    (kept,), report = prepare_pairs([test_train._pair(1, prompt, "Wait, 5.", "But 6.", "r2w", "p")], tok,
                                    TrainConfig(pair_types=["r2w"], max_length=48))  # fmt: skip
    assert kept["prompt"].startswith(prompt[: problem_end_finder(tok)(prompt)] + TRUNCATION_MARKER)
    # Without a template header or the reasoning instruction, the problem's end is unknown: dropped and counted.
    plain = test_train._pair(2, "Q: 2+3? " + "Let me add. " * 40, "Wait, 5.", "But 6.", "r2w", "p")
    report = prepare_pairs([plain], tiny_tokenizer["tokenizer"], TrainConfig(pair_types=["r2w"], max_length=48))[1]
    assert report["dropped"]["no_problem_end"] == 1 and report["num_pairs_used"] == 0
    with pytest.raises(ValueError, match="max_prompt_length"):
        TrainConfig(max_length=64, max_prompt_length=64)


def test_steady_state_rates_leave_out_the_first_step_and_the_saves():
    counts = TokenCounts()
    work = {"computed_tokens": 60, "computed_padded_tokens": 64, "pairs": 2, "attended_pairs": 900}
    for step, seconds in ((1, 5.0), (2, 1.0), (3, 1.5)):
        counts.close_step(step, 100, 128, {**work, "seconds": seconds})
    summary = summarize_run({"global_step": 3, "log_history": []}, counts, start_step=0, runtime=30.0)
    steady = summary["steady_state"]
    assert (steady["first_step"], steady["last_step"], steady["num_steps"]) == (2, 3, 2)
    assert summary["tokens_per_s"] == steady["tokens_per_s"] == pytest.approx(200 / 2.5)
    assert summary["computed_tokens_per_s"] == pytest.approx(120 / 2.5) and summary["pairs_per_s"] == 4 / 2.5
    assert summary["train_steps_s"] == 7.5 and summary["step_seconds"] == [5.0, 1.0, 1.5]
    assert summary["step_cpu_seconds"] == [None] * 3 and steady["cpu_seconds"] is None
    assert summary["computed_tokens"] == 180
    assert summary["computed_padding_fraction"] == pytest.approx(4 / 64)
    # The per-step figures say what the model computed, never how long it took (that differs between runs).
    assert summary["padding"]["per_step"][0] == {"step": 1, "real_tokens": 100, "padded_tokens": 128, **work}


def test_the_reference_loads_in_the_training_precision():
    assert reference_dtype(TrainConfig(bf16=True), deepspeed=False) == "bfloat16"
    for cfg, deepspeed in (
        (TrainConfig(bf16=True), True),  # TRL loads it like the policy: bf16 already
        (TrainConfig(bf16=True, lora=True), False),  # the base with the adapter off
        (TrainConfig(bf16=True, precompute_ref_log_probs=True), False),  # no reference held while training
        (TrainConfig(bf16=True, loss="simpo"), False),
        (TrainConfig(), False),
    ):
        assert reference_dtype(cfg, deepspeed=deepspeed) is None
