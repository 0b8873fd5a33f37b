"""Each swap of a library's internals counts what it replaced, and says so when an upgrade leaves it
nothing to replace (the model then trains on the library's own code)."""

import logging

import pytest
import torch

from alpaca_tune.training import fast_paths
from alpaca_tune.training.cpu import attention, dropout
from alpaca_tune.training.model import attach_lora
from alpaca_tune.training.precision import bf16_supported

LAYERS = 2  # the tiny Llama's


@pytest.fixture
def lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16,
                                                attn_implementation="sdpa")
    return attach_lora(base, rank=4, alpha=8, dropout=0.1, target_modules="q_proj,v_proj", seed=0)


def test_on_a_bf16_cpu_model_every_swap_counts_what_it_replaced(lora_model):
    fast = fast_paths.switch_on_fast_paths(lora_model, torch.device("cpu"), torch.bfloat16, quantized=False)
    assert fast.switched_on == {"bf16_lora_products": True, "malloc_keeps_freed_memory": True,
                                "cpu_dropout": 2 * LAYERS, "cpu_attention": LAYERS}
    causal_lm = lora_model.get_base_model()
    assert causal_lm.config._attn_implementation == attention.NAME
    assert sum(isinstance(m, dropout.CpuDropout) for m in lora_model.modules()) == 2 * LAYERS


def test_fast_paths_named_in_the_environment_stay_off(lora_model, monkeypatch):
    monkeypatch.setenv(fast_paths.OFF_ENV, "cpu_attention,malloc_keeps_freed_memory")
    fast = fast_paths.switch_on_fast_paths(lora_model, torch.device("cpu"), torch.bfloat16, quantized=False)
    assert fast.switched_on["cpu_attention"] == 0 and fast.switched_on["malloc_keeps_freed_memory"] == 0
    assert fast.switched_on["cpu_dropout"] == 2 * LAYERS
    causal_lm = lora_model.get_base_model()
    assert causal_lm.config._attn_implementation == "sdpa"


def test_lora_dropouts_kept_elsewhere_are_reported(lora_model, caplog):
    for module in lora_model.modules():  # as if PEFT stored them under another name
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.dropouts_moved = module.lora_dropout
            del module.lora_dropout
    with caplog.at_level(logging.WARNING):
        assert dropout.use_cpu_dropout(lora_model) == 0
    assert "LoRA has dropout [0.1] but no nn.Dropout under lora_dropout was found" in caplog.text


def test_attention_that_no_longer_follows_the_config_stays_on_sdpa(lora_model, monkeypatch, caplog):
    causal_lm = lora_model.get_base_model()
    monkeypatch.setattr(type(causal_lm), "set_attn_implementation", lambda self, name: None)
    with caplog.at_level(logging.WARNING):
        assert attention.use_cpu_attention(causal_lm) == 0
    assert "no attention module" in caplog.text


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bf16 kernels")
def test_the_swapped_attention_is_called_by_every_layer(lora_model, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "causal_block_attention",
                        lambda q, k, v, scale=None: calls.append(q.shape) or torch.zeros_like(q))
    causal_lm = lora_model.get_base_model()
    assert attention.use_cpu_attention(causal_lm) == LAYERS
    with torch.no_grad():
        causal_lm(input_ids=torch.tensor([[1, 40, 41, 42]]))
    assert len(calls) == LAYERS
