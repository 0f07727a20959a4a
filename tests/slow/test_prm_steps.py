"""The `prm/` rows train a process reward model: TRL's PRMTrainer when this TRL has it, and a token-classification
model labelled the way PRMTrainer labels (the last token of each step) with transformers' Trainer in any case.

A tiny randomly initialised Llama with the demo model's tokenizer, two steps each; every parameter must change.
TRL 1.14 removed `trl.experimental.prm` (the project pins TRL 1.16), so the first test runs TRL 1.13's PRMTrainer in a
subprocess, from the side directory `make test` installs it into.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from ckptdpo.backends.fake import FakeBackend
from ckptdpo.configs import ValuesConfig
from ckptdpo.schemas import PRM_STEPS, make_table
from ckptdpo.values import estimate_values
from ckptdpo.verify import verify_batch
from tests.unit.test_values import curve, plant

pytestmark = pytest.mark.slow
STEPS = 2


def prm_rows() -> list[dict]:
    """PRM_STEPS rows of planted trajectories: wrong ones with a first error at 1, 3 and 5, a correct one."""
    planted = [plant(f"s{c}", curve(6, c)) for c in (1, 3, 5)] + [plant("s-ok", curve(4, None), status="correct")]
    backend = FakeBackend({"continuations": [r for _, rules in planted for r in rules]})
    verify = functools.partial(verify_batch, timeout_s=20.0, workers=1, answer_format="boxed")
    res = estimate_values([t for t, _ in planted], ValuesConfig(search="binary"), backend, verify)
    make_table(res.prm, PRM_STEPS)
    assert len(res.prm) == 4 and {False, True} <= {label for r in res.prm for label in r["labels"]}
    return res.prm


def tiny_model(tokenizer):
    import torch
    from transformers import AutoModelForTokenClassification, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, num_labels=2)  # fmt: skip
    return AutoModelForTokenClassification.from_config(config)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_all_changed(before: dict, model) -> None:
    import torch

    same = [name for name, p in model.named_parameters() if torch.equal(before[name], p.detach())]
    assert not same, f"parameters left unchanged by training: {same}"


# TRL 1.14 removed `trl.experimental.prm`; the project pins TRL 1.16, so PRMTrainer comes from TRL 1.13, installed
# beside the venv (`make test` puts it in .venv/trl-prm, with --no-deps: it runs on the venv's transformers).
TRL_PRM = Path(__file__).resolve().parents[2] / ".venv" / "trl-prm"
PRM_SCRIPT = """
import json, sys, torch
from datasets import Dataset
from transformers import AutoModelForTokenClassification, AutoTokenizer, LlamaConfig
from trl.experimental.prm import PRMConfig, PRMTrainer

rows, tokenizer_dir, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                     pad_token_id=tokenizer.pad_token_id, num_labels=2)
model = AutoModelForTokenClassification.from_config(config)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
args = PRMConfig(output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, step_separator="",
                 max_length=512, report_to=[], save_strategy="no", use_cpu=True, dataset_num_proc=None)
trainer = PRMTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
trainer.train()
same = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
print(json.dumps({"global_step": trainer.state.global_step, "unchanged": same, "trl": __import__("trl").__version__}))
"""


def test_trl_prm_trainer_trains_on_prm_rows(demo_model_path: Path, tmp_path: Path):
    import json
    import os
    import subprocess
    import sys

    if not (TRL_PRM / "trl" / "experimental" / "prm").is_dir():
        pytest.skip(f"{TRL_PRM} holds no TRL with PRMTrainer; `make test` installs TRL 1.13 there")
    rows = tmp_path / "prm.json"
    rows.write_text(json.dumps(prm_rows()))
    env = {**os.environ, "PYTHONPATH": f"{TRL_PRM}{os.pathsep}{Path(__file__).resolve().parents[2]}"}
    proc = subprocess.run([sys.executable, "-c", PRM_SCRIPT, str(rows), str(demo_model_path), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"global_step": STEPS, "unchanged": [], "trl": "1.13.0"}


def step_labelled(row: dict, tokenizer) -> dict:
    """PRMTrainer's labelling, for the Trainer below: prompt tokens ignored, each step's last token carries its
    label (as int, which is why the float values travel in a column of their own)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for step, label in zip(row["completions"], row["labels"], strict=True):
        step_ids = tokenizer(step, add_special_tokens=False)["input_ids"]
        ids += step_ids
        labels += [-100] * (len(step_ids) - 1) + [int(label)]
    return {"input_ids": ids, "labels": labels}


def test_token_classification_trains_on_prm_rows(demo_model_path: Path, tmp_path: Path):
    from datasets import Dataset
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    tokenizer = load_tokenizer(demo_model_path)
    rows = prm_rows()
    data = Dataset.from_list([step_labelled(r, tokenizer) for r in rows])
    assert sum(label == 0 for r in data for label in r["labels"]) == 3  # one first error per wrong trajectory
    model = tiny_model(tokenizer)
    before = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForTokenClassification(tokenizer)
    )
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert_all_changed(before, model)
