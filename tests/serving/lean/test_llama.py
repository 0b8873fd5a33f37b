"""LeanLlama (CPU serving path) against transformers' LlamaForCausalLM and PEFT: logits at every
step through the KV cache, greedy tokens, adapter merge, tokenizer ids, and what falls back."""

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config

from alpaca_tune.serving.generation import generate_token_ids
from alpaca_tune.serving.lean.llama import (
    LeanLlama,
    LeanModelError,
    _silu,
    unsupported_reason,
)
from alpaca_tune.serving.lean.lora_merge import AdapterError, unmergeable_reason
from alpaca_tune.serving.sampling import SamplingParams
from alpaca_tune.serving.tokenizer import ServingTokenizer

PROMPT = [1, 40, 41, 42, 43, 44, 45, 46]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "gqa untied": {},
    "mha tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3 rope": dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=128),
    "linear rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
}


def save_model(directory, tokenizer_dir, seed=0, **overrides):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **overrides)).eval()
    with torch.no_grad():  # random norms, so a mix-up of the norm weights shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_at_every_step_equal_transformers(tmp_path, tiny_tokenizer_dir, variant):
    reference = save_model(tmp_path, tiny_tokenizer_dir, **VARIANTS[variant])
    lean = LeanLlama.load(tmp_path)
    continuation = [50, 61, 72, 83, 94, 105, 30, 31, 32, 33, 34, 35]  # past the llama3 original context of 16
    assert_equal_through_the_cache(lean, reference, continuation)


def assert_equal_through_the_cache(lean, reference, continuation):
    """The prompt at once, then the continuation a token at a time: logits at every step."""
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT + continuation])).logits[0]
    cache = lean.new_cache(len(PROMPT) + len(continuation))
    got = [lean.forward(PROMPT, cache)] + [lean.forward([token], cache) for token in continuation]
    torch.testing.assert_close(torch.stack(got), expected[len(PROMPT) - 1:], atol=1e-5, rtol=1e-4)


def test_one_token_at_a_time_from_the_start_equals_transformers(tmp_path, tiny_tokenizer_dir):
    """A one-id prompt takes the single-token attention (transposed key cache) from position 0."""
    reference = save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0]
    cache = lean.new_cache(len(PROMPT))
    got = torch.stack([lean.forward([token], cache) for token in PROMPT])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache full"):
        lean.forward([PROMPT[0]], cache)


def test_greedy_tokens_equal_transformers_generate(tmp_path, tiny_tokenizer_dir):
    reference = save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    ours = list(generate_token_ids(lean, PROMPT, SamplingParams(max_new_tokens=30, temperature=0.0), set()))
    theirs = reference.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == theirs and len(set(ours)) > 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_is_served_in_its_dtype_with_fp32_results(tmp_path, tiny_tokenizer_dir, dtype):
    """bf16/fp16 weights stay 16-bit (half the bytes a token reads) and give what transformers
    gives with the same weights widened to fp32, token by token through the cache."""
    from transformers import LlamaForCausalLM

    save_model(tmp_path, tiny_tokenizer_dir, tie_word_embeddings=True).to(dtype).save_pretrained(str(tmp_path))
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    lean = LeanLlama.load(tmp_path)
    assert {layer.qkv.dtype for layer in lean.layers} == {str(dtype).removeprefix("torch.")}
    assert lean.weight_bytes == sum(p.numel() * (4 if "norm" in n else 2)  # norms are kept fp32
                                    for n, p in reference.named_parameters())
    assert_equal_through_the_cache(lean, reference, [50, 61, 72, 83])


def test_an_adapter_on_a_bf16_base_is_merged_in_fp32(tmp_path, tiny_tokenizer_dir):
    """Rounding W + BA back to bf16 would lose most of the adapter: merged matrices become fp32,
    the others stay bf16, and the logits equal PEFT's over the widened base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    save_model(tmp_path / "base", tiny_tokenizer_dir).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    fresh = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    reference = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    lean = LeanLlama.load(tmp_path / "base", tmp_path / "adapter")
    assert {(layer.qkv.dtype, layer.o.dtype, layer.gate_up.dtype) for layer in lean.layers} == \
        {("float32", "bfloat16", "bfloat16")}
    got = lean.forward(PROMPT, lean.new_cache(len(PROMPT)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_wrong_rotary_layout_is_caught(tmp_path, tiny_tokenizer_dir):
    """Negative control: the comparison above notices a rope that differs from transformers'."""
    reference = save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    lean.inv_freq = lean.inv_freq.flip(0)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    assert (lean.forward(PROMPT, lean.new_cache(len(PROMPT))) - expected).abs().max() > 1e-3


def test_silu_in_numpy_equals_torch_where_exp_overflows():
    x = np.linspace(-500, 500, 10001, dtype=np.float32)
    with np.errstate(over="ignore"):
        got = torch.from_numpy(_silu(x))
    torch.testing.assert_close(got, F.silu(torch.from_numpy(x)), atol=1e-6, rtol=1e-5)


def test_huge_activations_give_finite_logits_and_no_warnings(tmp_path, tiny_tokenizer_dir):
    save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    lean.layers[0].gate_up.bits[:lean.intermediate] *= 1e4  # gate inputs far below -88: exp overflows
    cache = lean.new_cache(len(PROMPT) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = [lean.forward(PROMPT, cache), lean.forward([50], cache)]
    assert all(bool(torch.isfinite(step).all()) for step in logits)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_adapter_equals_peft_unmerged(tmp_path, tiny_tokenizer_dir, rslora):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = save_model(tmp_path / "base", tiny_tokenizer_dir)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_rslora=rslora)
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    fresh = save_model(tmp_path / "unused", tiny_tokenizer_dir)
    reference = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    lean = LeanLlama.load(tmp_path / "base", tmp_path / "adapter")
    got = lean.forward(PROMPT, lean.new_cache(len(PROMPT)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    unadapted = LeanLlama.load(tmp_path / "base").forward(PROMPT, lean.new_cache(len(PROMPT)))
    assert (unadapted - expected).abs().max() > 1e-2  # the adapter does change the answer


def test_adapter_for_another_base_is_refused(tmp_path, tiny_tokenizer_dir):
    from peft import LoraConfig, get_peft_model

    other = save_model(tmp_path / "other", tiny_tokenizer_dir, hidden_size=32, num_attention_heads=2,
                       num_key_value_heads=1)
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "adapter"))
    save_model(tmp_path / "base", tiny_tokenizer_dir)
    with pytest.raises(AdapterError, match="does not fit the base model"):
        LeanLlama.load(tmp_path / "base", tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: cannot read the adapter weights"):
        LeanLlama.load(tmp_path / "base", tmp_path / "adapter")


def test_what_falls_back_to_transformers():
    llama = json.loads(tiny_llama_config(100).to_json_string())
    assert unsupported_reason(llama) is None
    assert unsupported_reason({**llama, "attention_bias": True}) == "bias terms"
    assert "yarn" in unsupported_reason({**llama, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    assert "mistral" in unsupported_reason({**llama, "model_type": "mistral"})
    old_style = {k: v for k, v in llama.items() if k != "rope_parameters"}
    assert unsupported_reason({**old_style, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2}})
    assert unmergeable_reason({"peft_type": "LORA", "r": 8, "lora_alpha": 16}) is None
    assert unmergeable_reason({"peft_type": "LORA", "use_dora": True}) == "use_dora"
    assert unmergeable_reason({"peft_type": "LORA", "modules_to_save": ["lm_head"]}) == "modules_to_save"


def test_missing_weights_are_named(tmp_path, tiny_tokenizer_dir):
    from safetensors.torch import load_file, save_file

    save_model(tmp_path, tiny_tokenizer_dir)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(LeanModelError, match="model.layers.1.mlp.up_proj.weight"):
        LeanLlama.load(tmp_path)


def test_serving_tokenizer_equals_transformers(tmp_path, tiny_tokenizer_dir):
    from convert_fixtures import LLAMA3_TOKENIZER, sample_texts, train_sentencepiece
    from transformers import AutoTokenizer

    from alpaca_tune.conversion.tokenizer import (
        convert_sentencepiece,
        convert_tiktoken,
        save_tokenizer,
    )

    save_tokenizer(convert_sentencepiece(train_sentencepiece(tmp_path / "sp.model")), tmp_path / "llama2", 4096)
    save_tokenizer(convert_tiktoken(LLAMA3_TOKENIZER, "3.1"), tmp_path / "llama3", 131072)
    for directory in (tiny_tokenizer_dir, tmp_path / "llama2", tmp_path / "llama3"):
        ours, theirs = ServingTokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
        assert ours.eos_token_id == theirs.eos_token_id is not None
        for text in sample_texts()[:40] + ["### Response:\n", "  x\n\n\ty 1234 é 😀"]:
            ids = theirs(text)["input_ids"]
            assert ours(text)["input_ids"] == ids, (directory.name, text)
            with_eos = ids[1:] + [theirs.eos_token_id]
            assert ours.decode(with_eos) == theirs.decode(with_eos, skip_special_tokens=True)


def test_a_batch_step_gives_each_row_what_it_gets_alone(tmp_path, tiny_tokenizer_dir):
    """forward_batch over sequences at different positions equals each one's forward, bit for bit."""
    save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    prompts = [PROMPT, PROMPT[:3], [1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86]]
    alone, batched = [lean.new_cache(20) for _ in prompts], [lean.new_cache(20) for _ in prompts]
    for prompt, one, many in zip(prompts, alone, batched):
        lean.forward(prompt, one)
        lean.forward(prompt, many)
    for tokens in ([50, 61, 72], [90, 3, 4], [5, 6, 7]):
        together = lean.forward_batch(batched, tokens)
        for row, (token, cache) in enumerate(zip(tokens, alone)):
            assert torch.equal(together[row], lean.forward([token], cache))
    assert [c.length for c in batched] == [c.length for c in alone] == [11, 6, 14]


def test_a_long_prompt_fed_in_pieces_equals_transformers(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Prompts go in PREFILL_CHUNK pieces; a later piece attends to the cached positions before it."""
    from alpaca_tune.serving.lean import llama

    monkeypatch.setattr(llama, "PREFILL_CHUNK", 16)
    reference = save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    prompt = [1] + [40 + (i * 7) % 300 for i in range(52)]  # 53 positions: pieces of 16, 16, 16, 5
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt + [50, 61]])).logits[0]
    cache = lean.new_cache(len(prompt) + 2)
    got = [lean.forward(prompt, cache), lean.forward([50], cache), lean.forward([61], cache)]
    torch.testing.assert_close(torch.stack(got), expected[len(prompt) - 1:], atol=1e-5, rtol=1e-4)
    pieces = lean.new_cache(len(prompt))  # fed by the scheduler piece by piece: the same logits
    for start in range(0, len(prompt), 16):
        last = lean.forward(prompt[start:start + 16], pieces)
    assert torch.equal(last, got[0])


def random_updates(lean, seed, rank=4):
    """A request's own adapter on q_proj, down_proj and the head, unmerged (random weights)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (lean.hidden, lean.heads * lean.head_dim),
              "model.layers.1.mlp.down_proj": (lean.intermediate, lean.hidden),
              "lm_head": (lean.hidden, lean.head.shape[0])}
    pairs = {name: (torch.randn(rank, width, generator=generator) * 0.3, torch.randn(out, rank, generator=generator) * 0.3)
             for name, (width, out) in shapes.items()}
    return lean.low_rank_updates(pairs, f"adapter {seed}")


@pytest.mark.parametrize("piece_length", [2, 5, "prompt_rows", "prompt_rows + 1"])
@pytest.mark.parametrize("cached", [0, 7])
@pytest.mark.parametrize("piece_adapter", [False, True])
def test_a_prompt_piece_in_a_batch_step_gets_what_it_gets_alone(tmp_path, tiny_tokenizer_dir, piece_length, cached,
                                                                 piece_adapter):
    """feed_batch_and_piece (a prompt piece's rows in the decoding rows' pass): every row's logits,
    the piece's last logits and the next step equal feeding the piece alone and then the batch,
    bit for bit; with adapters unmerged on some rows and on the piece, at a prompt's start (its
    shared head copied in) or after cached positions; a piece too long to ride goes apart."""
    from alpaca_tune.serving.lean.matvec import PLAN

    save_model(tmp_path, tiny_tokenizer_dir)
    lean = LeanLlama.load(tmp_path)
    rows = max(PLAN.prompt_rows, 1)
    length = {"prompt_rows": rows, "prompt_rows + 1": rows + 1}.get(piece_length, piece_length)
    adapters = [random_updates(lean, 1), None, random_updates(lean, 2)]
    piece_updates = random_updates(lean, 3) if piece_adapter else None
    prompts = [PROMPT, PROMPT[:3], [1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86]]
    head = [1, 60, 61, 62]  # a shared template head, restored at the prompt's start
    piece = (head if not cached else []) + [100 + (i * 13) % 200 for i in range(length)]
    results = []
    for together in (False, True):
        with contextlib.ExitStack() as stack:
            feeds = [stack.enter_context(lean.feeder(60, updates)) for updates in adapters]
            for feed, prompt in zip(feeds, prompts):
                feed(prompt)
            reading = stack.enter_context(lean.feeder(60, piece_updates, shared_prefix=0 if cached else len(head)))
            if cached:
                reading([1] + list(range(30, 30 + cached - 1)))
            if together:
                step, last = lean.feed_batch_and_piece(feeds, [50, 61, 72], reading, piece)
            else:
                last = reading(piece)
                step = lean.feed_batch(feeds, [50, 61, 72])
            after = lean.feed_batch(feeds + [reading], [5, 6, 7, 8])
            results.append((step, last, after, [f.cache.length for f in feeds + [reading]]))
    (step, last, after, lengths), (step_2, last_2, after_2, lengths_2) = results
    assert torch.equal(step, step_2) and torch.equal(last, last_2) and torch.equal(after, after_2)
    assert lengths == lengths_2 == [10, 5, 13, cached + len(piece) + 1]
