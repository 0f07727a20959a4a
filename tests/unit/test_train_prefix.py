"""Shared-prefix batches: the packed layout, its mask, and the same log-probabilities, losses and gradients as TRL's
standard path (float32, tiny random models) for DPO and SimPO, with and without a reference model."""

from __future__ import annotations

import pytest
import torch

from ckptdpo.configs import TrainConfig
from ckptdpo.train.prefix import (
    CHOSEN,
    POLICY_OUTPUTS,
    REJECTED,
    SHARED,
    attention_mask,
    install_packed_forward,
    pack_rows,
    sharing_problem,
    standard_rows,
)
from tests.flows import test_train

tiny_tokenizer = test_train.tiny_tokenizer
tiny = test_train.tiny
TOL = 1e-4


def _examples() -> list[dict]:
    """Prompt / chosen / rejected token ids: sides sharing their first tokens, a side that is a prefix of the other,
    a one-token completion."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 97, (n,), generator=g).tolist()

    common = ids(2)
    return [
        {"prompt_ids": ids(10), "chosen_ids": common + ids(3), "rejected_ids": common + ids(5)},
        {"prompt_ids": ids(3), "chosen_ids": ids(9), "rejected_ids": ids(2)},
        {"prompt_ids": ids(12), "chosen_ids": common, "rejected_ids": common + ids(1)},
        {"prompt_ids": ids(5), "chosen_ids": ids(1), "rejected_ids": ids(4)},
    ]


def _dpo_batch() -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(_examples())


def test_each_scored_token_is_predicted_from_its_own_context():
    batch = _dpo_batch()
    ids, real, scored = standard_rows(batch)
    packed = pack_rows(ids, real, scored)
    n, width = packed["input_ids"].shape
    assert n == 4 and packed["score_mask"].shape == (8, ids.shape[1] - 1)
    # The shared part is the longest common token prefix: the prompt and the completions' common first tokens.
    shared = packed["lengths"][:, 0].tolist()
    assert shared == [12, 3, 14, 5]
    rows, cols = packed["score_mask"].nonzero(as_tuple=True)
    assert packed["target_ids"].tolist() == ids[rows, cols + 1].tolist()
    # The hidden state that predicts token t sits on the packed copy of token t-1, at its position t-1, ...
    flat_ids, flat_pos = packed["input_ids"].flatten(), packed["position_ids"].flatten()
    assert flat_ids[packed["hidden_index"]].tolist() == ids[rows, cols].tolist()
    assert flat_pos[packed["hidden_index"]].tolist() == cols.tolist()
    # ... and sees exactly its own sequence's earlier tokens: never the other side's completion.
    segments = packed["segments"].flatten()[packed["hidden_index"]]
    assert set(segments[rows < n].tolist()) <= {SHARED, CHOSEN}
    assert set(segments[rows >= n].tolist()) <= {SHARED, REJECTED}
    # Each prompt is computed once: 2 * prompt + completions in the standard rows, prompt + completions here.
    computed = int((packed["segments"] > 0).sum())
    assert computed == int(real.sum()) - sum(shared)


def test_the_mask_is_causal_and_keeps_rejected_from_chosen():
    segments = torch.tensor([[SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, REJECTED, 0]], dtype=torch.int8)
    allowed = attention_mask(segments, "sdpa")[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]  # chosen: prompt and itself
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]  # rejected: prompt and itself
    assert allowed[6].tolist() == [True, True, True, True, True, True, True]  # padding: never a masked-out row
    additive = attention_mask(segments, "eager")[0, 0]
    assert torch.equal(additive == 0, allowed) and additive.min() == torch.finfo(torch.float32).min


def _tiny_model(kind: str, attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)  # fmt: skip
    return model_cls(config)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forward_matches_trls_fused_head(kind, attention):
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_model(kind, attention)
    add_fused_lm_head(model, outputs=POLICY_OUTPUTS)
    install_packed_forward(model, POLICY_OUTPUTS)
    batch = _dpo_batch()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    packed = pack_rows(*standard_rows(batch))
    weights = torch.arange(1.0, 9.0)  # a loss that weighs every sequence differently

    results = []
    for extra in ({}, {"packed": packed}):
        model.zero_grad()
        out = model(**inputs, **extra, fused_lm_head=True)
        (out.log_probs.sum(dim=1) * weights).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (standard, standard_grads), (shared, shared_grads) = results
    for field in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(standard, field), getattr(shared, field), atol=TOL), field
    assert torch.equal(standard.is_top1, shared.is_top1)
    assert shared.log_probs[packed["score_mask"]].lt(0).all()
    for name, grad in standard_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=TOL), name


def test_models_that_cannot_take_the_mask_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert sharing_problem(_tiny_model("llama", "sdpa")) is None
    flash = _tiny_model("qwen2", "sdpa")
    flash.config._attn_implementation_internal = "flash_attention_2"
    assert "takes no explicit 4D mask" in sharing_problem(flash)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    assert "model type 'gpt2'" in sharing_problem(gpt2)
    sliding = _tiny_model("qwen2", "sdpa")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert "sliding-window" in sharing_problem(sliding)


# --- the trainers, standard vs shared ---------------------------------------------------------------------------


def _trainer(tiny, tmp_path, **fields):
    from ckptdpo.train import TrainJob, build_pair_rows, make_arguments, read_pairs
    from ckptdpo.train.arguments import build_training_kwargs
    from ckptdpo.train.run import build_datasets, build_trainer, load_tokenizer

    cfg = test_train.tiny_train_config(**fields)
    out = tmp_path / f"train-{len(list(tmp_path.iterdir()))}"
    job = TrainJob(train=cfg, pairs_dirs=[str(tiny["pairs"])], model=str(tiny["model"]), output_dir=str(out))
    tokenizer = load_tokenizer(job.model)
    train_rows, _, _ = build_pair_rows(read_pairs(job.pairs_dirs), tokenizer, cfg, "pairs")
    args = make_arguments(cfg, build_training_kwargs(cfg, out, use_cpu=True, liger=False))
    data = build_datasets(train_rows, [], out, args)
    return build_trainer(job, args, data, tokenizer, {})[0]


def _loss_and_grads(trainer) -> tuple[float, dict, dict]:
    """Loss of the first four training pairs, its gradients and the logged metrics, on the trainer's own batch."""
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = trainer._metrics["train"] if hasattr(trainer, "_metrics") else trainer._stored_metrics["train"]
    return float(loss), grads, {k: v[-1] for k, v in metrics.items()}, batch


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"loss": "dpo"}, id="dpo-reference-model"),
        pytest.param({"loss": "dpo", "precompute_ref_log_probs": True}, id="dpo-precomputed-reference"),
        pytest.param({"loss": "dpo", "lora": True, "lora_r": 4}, id="dpo-lora-no-reference-model"),
        pytest.param({"loss": "simpo", "pair_types": ["r2w", "w2r", "dto"]}, id="simpo-no-reference"),
    ],
)
def test_shared_prefix_trains_like_the_standard_path(tiny, tmp_path, fields):
    standard = _trainer(tiny, tmp_path, prefix_sharing=False, **fields)
    shared = _trainer(tiny, tmp_path, **fields)
    assert shared.prefix_sharing and not standard.prefix_sharing
    loss_a, grads_a, metrics_a, batch_a = _loss_and_grads(standard)
    loss_b, grads_b, metrics_b, batch_b = _loss_and_grads(shared)
    assert "packed" in batch_b and "packed" not in batch_a
    if fields.get("precompute_ref_log_probs"):  # the reference log-probs came from a packed forward too
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            assert torch.allclose(batch_a[key], batch_b[key], atol=TOL)
    assert loss_b == pytest.approx(loss_a, abs=TOL)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], abs=TOL), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=TOL), name


def test_a_model_without_the_mask_trains_on_the_standard_path_and_says_why(tiny, tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptdpo.train.run import load_tokenizer

    gpt2 = tmp_path / "gpt2"
    tokenizer = load_tokenizer(str(tiny["model"]))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with caplog.at_level("WARNING"):
        trainer = _trainer({**tiny, "model": gpt2}, tmp_path, loss="dpo")
    assert not trainer.prefix_sharing and "model type 'gpt2'" in trainer.prefix_sharing_off
    assert [r.getMessage() for r in caplog.records if "prefix_sharing" in r.getMessage()] == [
        "train.prefix_sharing: model type 'gpt2' is not one of llama, mistral, qwen2, qwen3, so pairs train as two "
        "sequences."
    ]
    loss, grads, _, batch = _loss_and_grads(trainer)
    assert "packed" not in batch and grads and loss > 0


def test_prefix_sharing_is_on_by_default():
    assert TrainConfig().prefix_sharing and not TrainConfig().save_optimizer_at_end
