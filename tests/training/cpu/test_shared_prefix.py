"""A step's shared preamble, computed once (shared_prefix.py), gives the loss and gradients of
computing every row whole."""

import pytest
import torch

from alpaca_tune.data.batching import collate_padded
from alpaca_tune.data.tokenization import IGNORE_INDEX, Example
from alpaca_tune.training.cpu import shared_prefix
from alpaca_tune.training.cpu.attention import use_cpu_attention
from alpaca_tune.training.cpu.shared_prefix import (
    plan_shared_prefix,
    shared_prefix_usable,
)
from alpaca_tune.training.loop import run_training
from alpaca_tune.training.steps import accumulate_gradients

PREAMBLES = ([5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [5, 9, 13, 17, 21, 25, 29, 33, 60, 61])


def _example(preamble, own, seed, response=6):
    """preamble + `own` prompt tokens + `response` response tokens (the only labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = preamble + torch.randint(70, 300, (own + response,), generator=g).tolist()
    labels = [IGNORE_INDEX] * (len(preamble) + own) + ids[len(preamble) + own:]
    return Example(ids, labels)


def _step_batches():
    """Two micro-batches of rows of different lengths, each starting with one of two preambles."""
    first = [_example(PREAMBLES[0], 3, 1), _example(PREAMBLES[1], 9, 2), _example(PREAMBLES[0], 5, 3)]
    second = [_example(PREAMBLES[1], 4, 4), _example(PREAMBLES[0], 12, 5)]
    return [collate_padded(rows, pad_id=0) for rows in (first, second)]


def _lora_model(tiny_model_dir, dtype, dropout=0.0):
    from transformers import AutoModelForCausalLM

    from alpaca_tune.training.model import attach_lora

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    model = attach_lora(base, rank=4, alpha=8, dropout=dropout, target_modules="q_proj,v_proj", seed=0)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without gradient
            torch.nn.init.normal_(param, std=0.1)
    use_cpu_attention(model.get_base_model())
    return model


def _loss_and_grads(model, batches, share):
    model.zero_grad(set_to_none=True)
    loss, tokens, slots = accumulate_gradients(model.get_base_model(), batches, torch.device("cpu"),
                                               share_prefix=share)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, tokens, grads


@pytest.fixture
def small_saving(monkeypatch):
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_TOKENS", 8)


def test_the_plan_picks_the_length_that_saves_most(small_saving):
    batches = _step_batches()
    plan = plan_shared_prefix(batches)
    # 8 tokens are common to all five rows (saving 8 x 4); the whole 10-token preambles, two of
    # them, save 10 x 3
    assert plan.length == 8 and plan.prompts.tolist() == [PREAMBLES[0][:8]]
    assert [rows.tolist() for rows in plan.rows] == [[0, 0, 0], [0, 0]]
    batches[1] = collate_padded([_example(PREAMBLES[1], 4, 4), _example(PREAMBLES[0], 12, 5),
                                 _example(PREAMBLES[0], 2, 6), _example(PREAMBLES[1], 7, 7)], pad_id=0)
    plan = plan_shared_prefix(batches)  # seven rows: 10 x (7 - 2) > 8 x (7 - 1)
    assert plan.length == 10 and sorted(plan.prompts.tolist()) == sorted(PREAMBLES)
    for batch, rows in zip(batches, plan.rows):
        for ids, prompt in zip(batch["input_ids"], rows):
            assert ids[:10].tolist() == plan.prompts[prompt].tolist()


def test_nothing_is_shared_when_it_would_not_pay_or_would_hold_a_target(small_saving, monkeypatch):
    batches = _step_batches()
    batches[0]["targets"][1, 3] = 7  # a trained position inside the common preamble
    plan = plan_shared_prefix(batches)
    assert plan is None or plan.length <= 3
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_TOKENS", 10_000)
    assert plan_shared_prefix(_step_batches()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharing_gives_the_loss_and_gradients_of_whole_rows(tiny_model_dir, small_saving, dtype):
    model = _lora_model(tiny_model_dir, dtype)
    batches = _step_batches()
    whole_loss, whole_tokens, whole = _loss_and_grads(model, batches, share=False)
    shared_loss, shared_tokens, shared = _loss_and_grads(model, batches, share=True)
    assert plan_shared_prefix(batches) is not None and shared_tokens == whole_tokens
    # fp32: rounding only (the preamble's products run on fewer rows: 4e-7 measured); bf16:
    # bf16's rounding of the same (4e-3 measured)
    loss_tolerance, grad_tolerance = (1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 2e-2)
    assert shared_loss == pytest.approx(whole_loss, rel=loss_tolerance)
    for name, grad in whole.items():
        assert grad.abs().max() > 0, name
        error = ((shared[name] - grad).norm() / grad.norm()).item()
        assert error < grad_tolerance, f"{name}: relative error {error:.1e}"


def test_the_preamble_gradient_matters(tiny_model_dir, small_saving, monkeypatch):
    """The last backward (through the preamble's own forward) carries part of the gradient: a
    step that skipped it would be caught by the test above."""
    model = _lora_model(tiny_model_dir, torch.float32)
    batches = _step_batches()
    _, _, whole = _loss_and_grads(model, batches, share=False)
    monkeypatch.setattr(shared_prefix.SharedPrefix, "backward", lambda self: None)
    _, _, skipped = _loss_and_grads(model, batches, share=True)
    errors = [((skipped[n] - g).norm() / g.norm()).item() for n, g in whole.items()]
    assert max(errors) > 1e-2


def test_with_dropout_the_expected_gradient_is_unchanged(tiny_model_dir, small_saving):
    """Rows sharing a preamble share its dropout mask there; each row's mask is still Bernoulli(p),
    so averaged over many draws the gradients agree with whole rows' as well as two averages of
    whole rows agree with each other."""
    model = _lora_model(tiny_model_dir, torch.float32, dropout=0.2)
    model.train()
    batches = _step_batches()

    def mean_grad(share, seed, draws=24):
        torch.manual_seed(seed)
        total = None
        for _ in range(draws):
            grads = torch.cat([g.flatten() for g in _loss_and_grads(model, batches, share)[2].values()])
            total = grads if total is None else total + grads
        return total / draws

    whole, whole_again, shared = mean_grad(False, 1), mean_grad(False, 2), mean_grad(True, 3)
    spread = (whole_again - whole).norm()
    assert (shared - whole).norm() < 1.5 * spread
    assert torch.nn.functional.cosine_similarity(shared, whole, dim=0) > 0.95


def test_used_only_where_the_attention_can_take_it(tiny_model_dir):
    model = _lora_model(tiny_model_dir, torch.bfloat16)
    causal_lm = model.get_base_model()
    assert shared_prefix_usable(causal_lm, packing=False, gradient_checkpointing=False)
    assert not shared_prefix_usable(causal_lm, packing=True, gradient_checkpointing=False)
    assert not shared_prefix_usable(causal_lm, packing=False, gradient_checkpointing=True)
    causal_lm.set_attn_implementation("sdpa")
    assert not shared_prefix_usable(causal_lm, packing=False, gradient_checkpointing=False)


def test_a_training_run_shares_and_learns_what_whole_rows_learn(tiny_model_dir, write_json, tmp_path,
                                                                 small_saving, monkeypatch, caplog):
    """Through run_training (bf16 on CPU, where it is used): the steps do share a preamble, and
    the losses step by step are those of the same run with whole rows."""
    import dataclasses
    import logging

    from conftest import TINY_RECORDS

    from alpaca_tune.settings import TrainSettings
    from alpaca_tune.training import loop, steps
    from alpaca_tune.training.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: training runs fp32 without the blockwise attention")
    settings = TrainSettings(train_data=str(write_json("train.json", TINY_RECORDS * 4)),
                             base_model=str(tiny_model_dir), output_dir=str(tmp_path / "shared"),
                             precision="bf16", learning_rate=5e-2, max_steps=4, train_batch_size=2,
                             gradient_accumulation_steps=2, warmup_steps=0, val_set_size=0,
                             lora_rank=4, lora_alpha=32, lora_dropout=0.0, logging_steps=1, seed=3)
    plans = []
    planned = steps.plan_shared_prefix
    monkeypatch.setattr(steps, "plan_shared_prefix", lambda batches: plans.append(planned(batches)) or plans[-1])
    with caplog.at_level(logging.INFO, logger="alpaca_tune.training.loop"):
        shared = run_training(settings)
    assert any("computed once per step" in r.message for r in caplog.records)
    assert len(plans) == 4 and all(plan is not None and plan.length > 8 for plan in plans)
    monkeypatch.setattr(loop, "shared_prefix_usable", lambda *args: False)
    whole = run_training(dataclasses.replace(settings, output_dir=str(tmp_path / "whole")))
    assert len(plans) == 4  # not planned with whole rows
    for a, b in zip(shared.metrics["history"], whole.metrics["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3) and a["tokens"] == b["tokens"]
