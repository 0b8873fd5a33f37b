"""Packing, padding and the label-only loss, checked numerically against plain references."""

import pytest
import torch
import torch.nn.functional as F

from alpaca_tune.data.batching import collate_packed, collate_padded
from alpaca_tune.data.tokenization import IGNORE_INDEX, Example
from alpaca_tune.training.loss import full_logits_loss, label_loss


def _examples(lengths, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 2
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_packed_logits_equal_unpacked(tiny_model):
    """Each packed example sees only itself: its logits match running it alone."""
    examples = _examples([9, 23, 4, 17])
    packed = collate_packed(examples)
    from alpaca_tune.training.loss import decoder_inputs

    with torch.no_grad():
        packed_logits = tiny_model(**decoder_inputs(tiny_model, packed)).logits[0]  # [sum T, V]
        offset = 0
        for example in examples:
            alone = tiny_model(input_ids=torch.tensor([example.input_ids])).logits[0]
            torch.testing.assert_close(packed_logits[offset:offset + len(example)], alone,
                                       atol=1e-5, rtol=1e-4)
            offset += len(example)


def test_padded_logits_at_real_positions_equal_each_example_alone(tiny_model):
    """Right padding needs no padding mask under causal attention (decoder_inputs passes none)."""
    from alpaca_tune.training.loss import decoder_inputs

    examples = _examples([9, 23, 4, 17], seed=3)
    batch = collate_padded(examples, pad_id=0)
    assert set(decoder_inputs(tiny_model, batch)) == {"input_ids"}
    with torch.no_grad():
        padded_logits = tiny_model(**decoder_inputs(tiny_model, batch)).logits  # [B, T, V]
        for row, example in enumerate(examples):
            alone = tiny_model(input_ids=torch.tensor([example.input_ids])).logits[0]
            torch.testing.assert_close(padded_logits[row, :len(example)], alone, atol=1e-5, rtol=1e-4)


def test_packing_without_the_block_mask_would_leak(tiny_model):
    """Negative control: position_ids alone do not isolate examples under SDPA in transformers 5."""
    examples = _examples([9, 23])
    packed = collate_packed(examples)
    with torch.no_grad():
        leaky = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        alone = tiny_model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    assert (leaky[9:] - alone).abs().max() > 1e-3


def test_packed_and_padded_losses_equal_the_reference(tiny_model):
    examples = _examples([9, 23, 4, 17], seed=1)
    # reference: every example alone, HF-style shifted cross-entropy on full logits
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = tiny_model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
        for batch in (collate_packed(examples), collate_padded(examples, pad_id=0)):
            for loss_fn in (label_loss, full_logits_loss):
                loss_sum, n = loss_fn(tiny_model, batch)
                assert n == count
                assert loss_sum.item() == pytest.approx(total, rel=1e-5)


def test_label_only_head_gradients_match_full_head(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    examples = _examples([12, 30, 7], seed=2)
    batch = collate_packed(examples)
    grads = []
    for loss_fn in (label_loss, full_logits_loss):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        loss_sum, n = loss_fn(model.get_base_model(), batch)
        (loss_sum / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_cross_entropy_equals_full_logits(monkeypatch, dtype):
    """Loss and both gradients equal F.cross_entropy over nn.Linear's logits, across chunk borders."""
    from alpaca_tune.training import loss

    vocab, width, rows = 50, 16, 23
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", vocab * 5)  # 5 rows per chunk: 5 chunks, the last short
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=g).to(dtype)
    weight = torch.randn(vocab, width, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    results = []
    for fn in (lambda h, w: loss.HeadCrossEntropy.apply(h, w, targets),
               lambda h, w: F.cross_entropy((h @ w.t()).float(), targets, reduction="sum")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = fn(h, w)
        (value / 7).backward()
        results.append((value.detach(), h.grad, w.grad))
    (value, grad_h, grad_w), (ref_value, ref_grad_h, ref_grad_w) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(value, ref_value, **tol)
    torch.testing.assert_close(grad_h.float(), ref_grad_h.float(), **tol)
    torch.testing.assert_close(grad_w.float(), ref_grad_w.float(), **tol)
    assert grad_h.dtype == dtype and grad_w.dtype == dtype


def test_chunked_head_cross_entropy_for_a_target_far_below_the_rest():
    """A target whose probability is below fp32's range still gets its exact loss (not inf)."""
    from alpaca_tune.training.loss import HeadCrossEntropy

    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([[300.0, 0.0], [0.0, 0.0], [0.0, 150.0], [2.0, -1.0]])
    targets = torch.tensor([1, 0, 3])  # row 0: 300 below its best logit; row 1: 150 below
    h = hidden.clone().requires_grad_()
    value = HeadCrossEntropy.apply(h, weight, targets)
    value.backward()
    reference = hidden.clone().requires_grad_()
    expected = F.cross_entropy(reference @ weight.t(), targets, reduction="sum")
    expected.backward()
    assert torch.isfinite(value) and value.item() > 400
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(h.grad, reference.grad)


def test_chunked_head_cross_entropy_without_gradients_keeps_nothing():
    from alpaca_tune.training.loss import HeadCrossEntropy

    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3, 9])
    with torch.no_grad():
        value = HeadCrossEntropy.apply(hidden, weight, targets)
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(value, expected)


def test_label_loss_with_a_lora_wrapped_head_matches_the_full_head(tiny_model_dir):
    """A head that is not a plain Linear (here LoRA on lm_head) takes the module's own logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    batch = collate_padded(_examples([12, 30, 7], seed=4), pad_id=0)
    grads, values = [], []
    for loss_fn in (label_loss, full_logits_loss):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                init_lora_weights=False))
        loss_sum, n = loss_fn(model.get_base_model(), batch)
        (loss_sum / n).backward()
        values.append(loss_sum.item())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert any("lm_head" in key for key in grads[0])
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-6, rtol=1e-4)
