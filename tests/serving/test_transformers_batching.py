"""The transformers path (GPU, architectures the lean path does not run) under the batch scheduler:
rows decode as one padded batch, each answer the one it gets alone, for mixed lengths, rows joining
and leaving, a non-Llama architecture, and per-request adapters (PEFT's mixed-adapter batches)."""

import base64

import pytest
import torch

from alpaca_tune.base_model import weight_shapes
from alpaca_tune.errors import UserError
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.serving.limits import Limits
from alpaca_tune.serving.transformers_decoder import TransformersDecoder
from alpaca_tune.settings import GenerateSettings

PROMPTS = ["Tell me about alpacas.", "Hi", "Name three colours and say why each one is nice to look at.",
           "Translate to French: thank you very much, my friend.", "Why?", "Write a short poem about the sea."]


def ask(prompt, lora_weights="", **change):
    return GenerateSettings(prompt=prompt, lora_weights=lora_weights, **{
        "temperature": 0.0, "max_new_tokens": 24, "prompt_template": "alpaca_short", **change})


def served_by_transformers(base_dir, adapter_dir=None) -> InstructModel:
    decoder = TransformersDecoder.load(base_dir, adapter_dir)
    return InstructModel(decoder, InstructModel._tokenizer(base_dir), None, Limits(), weight_shapes(base_dir))


def alone(model: InstructModel, setting) -> str:
    single = model.batching(1)
    try:
        return "".join(model.submit(single, setting))
    finally:
        single.close()


class CountingBatches:
    """Counts feed_batch calls with more than one row, to show the rows really ran together."""

    def __init__(self, decoder):
        self.rows, self._inner = [], decoder.feed_batch
        decoder.feed_batch = self

    def __call__(self, feeds, tokens):
        self.rows.append(len(feeds))
        return self._inner(feeds, tokens)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return served_by_transformers(tiny_model_dir)


def test_batched_logits_equal_each_row_fed_alone_as_rows_join_and_leave(llama):
    """feed_batch against the same tokens fed to one cache each: equal logits (fp32) at every
    step, while the kept batch is rebuilt as a row joins (step 3) and another leaves (step 6)."""
    decoder = llama.decoder
    prompts = [[1, 5, 9, 13, 17, 21, 25, 29, 33], [1, 7], [1, 40, 41, 42, 43]]
    torch.manual_seed(0)
    steps = torch.randint(3, 200, (9, 3)).tolist()
    with torch.inference_mode():
        reference = []
        for row, prompt in enumerate(prompts):
            with decoder.feeder(64) as feed:
                reference.append([feed(prompt)] + [feed([tokens[row]]) for tokens in steps])
        with decoder.feeder(64) as a, decoder.feeder(64) as b, decoder.feeder(64) as c:
            feeds = [a, b, c]
            firsts = [feed(prompt) for feed, prompt in zip(feeds, prompts)]
            for row in range(3):
                torch.testing.assert_close(firsts[row], reference[row][0], rtol=0, atol=1e-5)
            for step, tokens in enumerate(steps):
                if step == 3:  # row 2 catches up alone on what it missed, then joins
                    for missed in steps[:3]:
                        c([missed[2]])
                rows = [0, 1] if step < 3 else [0, 1, 2] if step < 6 else [0, 2]
                logits = decoder.feed_batch([feeds[r] for r in rows], [tokens[r] for r in rows])
                for out, r in zip(logits, rows):
                    torch.testing.assert_close(out, reference[r][step + 1], rtol=0, atol=1e-5)
    assert decoder._batch is None


def test_a_batch_of_mixed_lengths_runs_together_and_answers_each_as_alone(llama):
    wanted = [ask(p, max_new_tokens=n) for p, n in zip(PROMPTS, [24, 5, 40, 12, 30, 1])]
    expected = [alone(llama, s) for s in wanted]
    counter = CountingBatches(llama.decoder)
    scheduler = llama.batching(8)
    try:
        streams = [llama.submit(scheduler, s) for s in wanted]
        assert ["".join(stream) for stream in streams] == expected
    finally:
        scheduler.close()
        del llama.decoder.feed_batch
    assert max(counter.rows) >= 4  # the rows shared steps
    assert llama.decoder._batch is None  # the kept batch went with its last row


def test_rows_joining_and_leaving_mid_way(llama):
    first = [ask(PROMPTS[0], max_new_tokens=60), ask(PROMPTS[1], max_new_tokens=8)]
    later = [ask(p, max_new_tokens=20) for p in PROMPTS[2:5]]
    expected = [alone(llama, s) for s in first + later]
    scheduler = llama.batching(8)
    try:
        streams = [llama.submit(scheduler, s) for s in first]
        chunks = iter(streams[0])
        head = [next(chunks), next(chunks)]  # decoding: the others join its batch now
        streams += [llama.submit(scheduler, s) for s in later]
        got = ["".join(head) + "".join(chunks)] + ["".join(stream) for stream in streams[1:]]
    finally:
        scheduler.close()
    assert got == expected


def test_a_long_prompt_is_read_in_pieces_between_the_others_steps(llama):
    """A ~300-token prompt joins in two pieces (256, then the rest), a step apart, while the others
    decode; every answer is still its own alone, and alone equals the one-sequence loop."""
    long = ask(" ".join(["alpacas graze on the high plains"] * 14), max_new_tokens=12)
    assert len(llama.prompt_ids(long)) > 260
    short = [ask(p, max_new_tokens=30) for p in PROMPTS[:3]]
    expected = [alone(llama, s) for s in short + [long]]
    assert expected[-1] == "".join(llama.stream(long))
    fed = []
    model = llama.decoder.model
    original = model.forward

    def counting(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    model.forward = counting
    scheduler = llama.batching(8)
    try:
        streams = [llama.submit(scheduler, s) for s in short]
        chunks = iter(streams[0])
        head = next(chunks)  # decoding: the long prompt arrives now
        streams.append(llama.submit(scheduler, long))
        got = [head + "".join(chunks)] + ["".join(stream) for stream in streams[1:]]
    finally:
        scheduler.close()
        del model.forward
    assert got == expected
    pieces = [shape[1] for shape in fed if shape[1] > 1]
    assert pieces[-2] == 256 and pieces[-1] == len(llama.prompt_ids(long)) - 256
    between = fed[fed.index(next(s for s in fed if s[1] == 256)) + 1]
    assert between[0] > 1 and between[1] == 1  # the others' batched step ran between the pieces


def test_another_architecture_batches_too(tiny_qwen2_dir):
    model = InstructModel.load(None, base_model=str(tiny_qwen2_dir))
    assert isinstance(model.decoder, TransformersDecoder)  # biases: not the lean path
    wanted = [ask(p, max_new_tokens=16) for p in PROMPTS[:4]]
    expected = [alone(model, s) for s in wanted]
    scheduler = model.batching(4)
    try:
        assert ["".join(model.submit(scheduler, s)) for s in wanted] == expected  # one after another
        streams = [model.submit(scheduler, s) for s in wanted]
        assert ["".join(stream) for stream in streams] == expected  # together
    finally:
        scheduler.close()


def data_uri(path) -> str:
    return "data:application/gzip;base64," + base64.b64encode(path.read_bytes()).decode()


def test_each_row_its_own_adapter_answers_as_that_adapter_alone(trained_adapters, tiny_model_dir):
    """A base-only transformers server given adapters per request: a batch mixing two adapters
    and none answers each as that adapter served alone as COG_WEIGHTS (merged) on this path."""
    served = served_by_transformers(tiny_model_dir)
    plan = [(p, name) for p in PROMPTS[:4] for name in ("one", "two", None)]
    merged = {name: served_by_transformers(tiny_model_dir, trained_adapters[name].adapter_dir) if name else served
              for name in ("one", "two", None)}
    expected = [alone(merged[name], ask(prompt)) for prompt, name in plan]
    counter = CountingBatches(served.decoder)
    scheduler = served.batching(12)
    try:
        streams = [served.submit(scheduler, ask(prompt, data_uri(trained_adapters[name].archive) if name else ""))
                   for prompt, name in plan]
        assert ["".join(stream) for stream in streams] == expected
    finally:
        scheduler.close()
    assert len(set(expected)) > 3 and max(counter.rows) >= 6
    assert len(served.adapters) == 2 and served.adapters.fetches == 2


def test_an_evicted_adapter_leaves_the_model_after_its_last_request(trained_adapters, tiny_model_dir):
    """Evicted from the cache while a request decodes with it, an adapter stays until that request
    ends, then leaves the model at the next step; requests for the base and the other adapter go
    on answering as alone, before and after."""
    served = served_by_transformers(tiny_model_dir)
    served.adapters.limits = Limits(max_cached_adapters=1)
    one, two = (data_uri(trained_adapters[name].archive) for name in ("one", "two"))
    expected = {spec: alone(served, ask(PROMPTS[0], spec, max_new_tokens=40)) for spec in (one, two, "")}
    assert len(set(expected.values())) == 3
    scheduler = served.batching(4)
    try:
        running = served.submit(scheduler, ask(PROMPTS[0], one, max_new_tokens=40))
        chunks = iter(running)
        head = next(chunks)
        other = served.submit(scheduler, ask(PROMPTS[0], two, max_new_tokens=40))  # evicts one from the cache
        assert len(served.decoder.model.peft_config) == 2  # one is still in the model: a request decodes with it
        assert head + "".join(chunks) == expected[one]
        assert "".join(other) == expected[two]
        for spec in ("", two):  # the next steps delete one; the others answer as before
            assert "".join(served.submit(scheduler, ask(PROMPTS[0], spec, max_new_tokens=40))) == expected[spec]
        assert len(served.decoder.model.peft_config) == 1
        assert "".join(served.submit(scheduler, ask(PROMPTS[0], one, max_new_tokens=40))) == expected[one]
    finally:
        scheduler.close()


def test_with_its_last_adapter_gone_the_model_is_the_plain_base_again(trained_adapters, tiny_model_dir):
    served = served_by_transformers(tiny_model_dir)
    decoder = served.decoder
    base_answer = alone(served, ask(PROMPTS[1]))
    from peft import PeftModel

    adapter = decoder.request_adapter(trained_adapters["one"].adapter_dir, "one")
    assert isinstance(decoder.model, PeftModel)
    del adapter  # nothing refers to it: deleted at the next forward
    assert alone(served, ask(PROMPTS[1])) == base_answer
    assert type(decoder.model).__name__ == "LlamaForCausalLM" and not decoder._peft


def test_a_server_with_its_adapter_merged_refuses_request_adapters(trained_adapters, tiny_model_dir):
    served = served_by_transformers(tiny_model_dir, trained_adapters["one"].adapter_dir)
    with pytest.raises(UserError, match="merged its own adapter .* serve the base alone"):
        served.request(ask(PROMPTS[0], data_uri(trained_adapters["two"].archive)))


def test_the_kv_budget_counts_the_models_own_cache_size(llama):
    """kv_bytes_per_position as transformers' own cache holds a position: every layer's keys and values."""
    from transformers import DynamicCache

    decoder = llama.decoder
    with torch.inference_mode(), decoder.feeder(64) as feed:
        feed([1, 5, 9, 13])
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in feed.cache.layers)
    assert isinstance(feed.cache, DynamicCache) and decoder.kv_bytes_per_position == held // 4
    scheduler = llama.batching(4)
    scheduler.close()
    assert 0 < scheduler.kv_budget_tokens <= 4 * decoder.context_length
