"""sdpa_fp32: transformers' SDPA attention on upcast q, k, v for bf16 models on CPU."""

import torch

from alpaca_tune.batching import collate_packed
from alpaca_tune.cpu_attention import _sdpa_fp32, use_fp32_attention
from alpaca_tune.loss import decoder_inputs
from alpaca_tune.tokenization import IGNORE_INDEX, Example


def _bf16_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)


def test_attention_runs_in_fp32_even_under_autocast(tiny_model_dir):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _bf16_model(tiny_model_dir).model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 24, 16, generator=g).to(torch.bfloat16) for heads in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _sdpa_fp32(layer, q, k, v, None)
        in_bf16, _ = sdpa_attention_forward(layer, q, k, v, None)
    expected, _ = sdpa_attention_forward(layer, q.float(), k.float(), v.float(), None)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.to(torch.bfloat16))
    assert not torch.equal(got, in_bf16)  # autocast did not push it back to bf16


def test_model_switched_to_fp32_attention_keeps_packed_examples_apart(tiny_model_dir):
    model = _bf16_model(tiny_model_dir)
    use_fp32_attention(model)
    assert model.config._attn_implementation == "sdpa_fp32"
    g = torch.Generator().manual_seed(1)
    examples = [Example(ids, [IGNORE_INDEX] + ids[1:]) for ids in
                (torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 15))]
    with torch.no_grad():
        packed = model(**decoder_inputs(model, collate_packed(examples))).logits[0]
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    torch.testing.assert_close(packed[9:], alone, atol=2e-2, rtol=2e-2)
    loss = model(input_ids=torch.tensor([examples[0].input_ids]), labels=torch.tensor([examples[0].input_ids])).loss
    loss.backward()  # and gradients flow through it
    assert model.model.embed_tokens.weight.grad is not None
