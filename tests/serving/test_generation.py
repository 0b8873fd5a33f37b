"""Decoding: KV cache == recompute == transformers' generate, stop sequences, merged == unmerged."""

import time

import pytest
import torch

from alpaca_tune.serving.generation import (
    TimeLimitError,
    _held_back,
    generate_token_ids,
    parse_stop_sequences,
    stream_text,
)
from alpaca_tune.serving.sampling import SamplingParams
from alpaca_tune.serving.transformers_decoder import TransformersDecoder


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return TransformersDecoder(model), AutoTokenizer.from_pretrained(str(tiny_model_dir))


PROMPT = [1, 40, 41, 42, 43, 44]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


def _recompute_greedy(model, prompt, steps, eos):
    """Reference: no cache, the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos:
                break
            ids.append(token)
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_recompute_and_generate(model_and_tokenizer):
    decoder, _ = model_and_tokenizer
    model = decoder.model
    no_eos = set()
    cached = list(generate_token_ids(decoder, PROMPT, GREEDY, no_eos))
    assert len(cached) == 24
    assert cached == _recompute_greedy(model, PROMPT, 24, no_eos)
    reference = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert cached == reference


def test_static_cache_feeder_equals_dynamic_cache(model_and_tokenizer):
    """The GPU decoding path's static cache (cuda_graph.py; graphs are CUDA-only and tested in
    test_cuda.py) gives the same logits, step by step, as the dynamic cache."""
    from alpaca_tune.serving.cuda_graph import StaticCacheFeeder

    decoder, _ = model_and_tokenizer
    static = StaticCacheFeeder(decoder.model, capacity=16)
    with torch.inference_mode(), decoder.feeder(16) as dynamic:
        steps = [PROMPT] + [[token] for token in (50, 51, 7, 9)]
        for number, ids in enumerate(steps):
            if number == 2:  # what capture does first: two unkept steps, then the cache is rewound
                static.step_id.fill_(ids[0])
                static.step_position.fill_(static.length)
                static.warm_up()
            torch.testing.assert_close(static(ids), dynamic(ids), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="capacity 16"):
            static(list(range(3, 10)))


def test_kept_feeder_is_reused_only_when_free_and_starts_empty(model_and_tokenizer):
    """A model keeps its static-cache feeders per capacity bucket, as many as ran at once (a GPU's
    recorded graph is reused by later requests); a reused one answers like a fresh cache, stale
    keys notwithstanding."""
    from alpaca_tune.serving.cuda_graph import kept_feeder

    decoder, _ = model_and_tokenizer
    model = decoder.model
    with torch.inference_mode():
        with kept_feeder(model, 40) as first:
            with kept_feeder(model, 200) as other:
                assert first.capacity == 256 and other is not first  # first is still in use
            for ids in [PROMPT + [60, 61, 62], [9], [10]]:  # leaves keys at positions a shorter request reuses
                first(ids)
        with kept_feeder(model, 30) as again, decoder.feeder(16) as fresh:
            assert again is first and again.length == 0
            with kept_feeder(model, 100) as second:
                assert second is other  # the bucket's other feeder, kept too
            for ids in [PROMPT, [50], [51], [7]]:
                torch.testing.assert_close(again(ids), fresh(ids), rtol=1e-5, atol=1e-5)
    with kept_feeder(model, 300) as larger:
        assert larger.capacity == 512


def test_stops_at_eos(model_and_tokenizer):
    decoder, _ = model_and_tokenizer
    tokens = list(generate_token_ids(decoder, PROMPT, GREEDY, set()))
    eos = {tokens[5]}
    stopped = list(generate_token_ids(decoder, PROMPT, GREEDY, eos))
    assert stopped == tokens[:tokens.index(tokens[5])]


def test_sampling_is_seeded(model_and_tokenizer):
    decoder, _ = model_and_tokenizer
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=11)
    first = list(generate_token_ids(decoder, PROMPT, params, set()))
    assert first == list(generate_token_ids(decoder, PROMPT, params, set()))
    other = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=12)
    assert first != list(generate_token_ids(decoder, PROMPT, other, set()))


def test_streaming_chunks_and_stop_sequences(model_and_tokenizer):
    decoder, tokenizer = model_and_tokenizer
    decoder.model.generation_config.eos_token_id = None
    chunks = list(stream_text(decoder, tokenizer, PROMPT, GREEDY, []))
    full = "".join(chunks)
    assert len(chunks) > 3 and full == full.lstrip()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.find(stop)
    stopped = "".join(stream_text(decoder, tokenizer, PROMPT, GREEDY, [stop]))
    assert stopped == full[:cut]
    assert stop not in stopped


def test_a_prediction_past_its_time_limit_ends_with_a_message(model_and_tokenizer):
    decoder, tokenizer = model_and_tokenizer
    params = SamplingParams(max_new_tokens=400, temperature=1.0, seed=3)  # sampled: no early EOS to rely on
    produced = []
    with pytest.raises(TimeLimitError, match=r"stopped after 0.05 s and \d+ tokens: the server's time limit"):
        for token in generate_token_ids(decoder, PROMPT, params, set(), time_limit_s=0.05):
            produced.append(token)
            time.sleep(0.01)  # a slow step
    assert 1 <= len(produced) < 400
    assert len(list(generate_token_ids(decoder, PROMPT, params, set(), time_limit_s=None))) == 400


def test_held_back_prefixes():
    assert _held_back("hello ##", ["###"]) == 2
    assert _held_back("hello", ["###"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2
    assert parse_stop_sequences("###, User:,, ") == ["###", "User:"]


def test_merged_adapter_equals_unmerged(tiny_model_dir, tmp_path):
    """TransformersDecoder.load with the adapter merged into the weights answers as PEFT's model
    with the adapter kept apart."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([PROMPT])
    unmerged = TransformersDecoder.load(tiny_model_dir, tmp_path / "adapter", merge=False).model
    merged = TransformersDecoder.load(tiny_model_dir, tmp_path / "adapter", merge=True).model
    plain = TransformersDecoder.load(tiny_model_dir).model
    assert any("lora" in name for name, _ in unmerged.named_parameters())
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter does something


def test_a_static_cache_without_its_write_position_is_an_error(model_and_tokenizer):
    """cuda_graph.py rewinds StaticCache's device-side write position; if transformers stops keeping
    it there, rewinding would silently do nothing and replays would write past the request."""
    from alpaca_tune.serving.cuda_graph import StaticCacheFeeder

    decoder, _ = model_and_tokenizer
    feeder = StaticCacheFeeder(decoder.model, capacity=16)
    feeder.restart()  # fine as transformers is
    for layer in feeder.cache.layers:
        del layer.cumulative_length
    with pytest.raises(RuntimeError, match="no longer keep their write position"):
        feeder.restart()
