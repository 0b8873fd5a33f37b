"""A template's head is read once and its KV cache kept: a prompt's logits are the same bits
whether its head was computed or copied, close to the prompt read whole, kept per adapter and
for a bounded number of heads; the served model finds the head in its prompts."""

import pytest
import torch

from alpaca_tune.data.tokenization import encode_prompt
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.serving.lean import llama
from alpaca_tune.serving.lean.llama import LeanLlama
from alpaca_tune.settings import GenerateSettings

HEAD = [1, 30, 31, 32, 33, 34, 35, 36, 37]


def answer_logits(model, prompt, shared, updates=None, steps=3):
    """The prompt's logits, then those after each of `steps` greedy tokens."""
    with model.feeder(len(prompt) + steps, updates, shared) as feed:
        logits = [feed(prompt)]
        for _ in range(steps):
            logits.append(feed([int(logits[-1].argmax())]))
    return torch.stack(logits)


@pytest.fixture
def model(tiny_model_dir):
    return LeanLlama.load(tiny_model_dir)


def test_a_copied_head_gives_the_bits_a_computed_one_gives(model):
    prompts = [HEAD + [50, 51, 52], HEAD + [60], HEAD + list(range(70, 90))]
    computed = [answer_logits(model, p, len(HEAD)) for p in prompts]  # the first computes and keeps it
    assert list(model.prefixes) == [tuple(HEAD)]
    model.prefixes.clear()
    for prompt, first in zip(prompts, computed):
        again = answer_logits(model, prompt, len(HEAD))  # the head copied from the one kept
        assert torch.equal(again, first)
        whole = answer_logits(model, prompt, 0)  # read as one piece: other sums, the same numbers
        assert torch.allclose(whole, first, atol=1e-4, rtol=1e-4)


def test_a_prompt_that_is_only_the_head_is_read_whole(model):
    assert torch.equal(answer_logits(model, HEAD, len(HEAD)), answer_logits(model, HEAD, 0))
    assert not model.prefixes


def test_heads_are_kept_per_adapter_and_bounded(model, trained_adapters, monkeypatch):
    monkeypatch.setattr(llama, "SHARED_PREFIXES", 2)
    own = model.request_adapter(trained_adapters["one"].adapter_dir, "one")
    prompt = HEAD + [50, 51]
    base = answer_logits(model, prompt, len(HEAD))
    adapted = answer_logits(model, prompt, len(HEAD), own)
    assert not torch.allclose(base, adapted)  # the adapter's head is its own, not the base's
    assert list(own.prefixes) == [tuple(HEAD)] and list(model.prefixes) == [tuple(HEAD)]
    assert torch.equal(answer_logits(model, prompt, len(HEAD), own), adapted)
    for other in ([1, 2, 3], [1, 4, 5], [1, 6, 7]):
        answer_logits(model, other + [9], len(other))
    assert list(model.prefixes) == [(1, 4, 5), (1, 6, 7)]  # the least recently used went
    assert list(own.prefixes) == [tuple(HEAD)]


@pytest.mark.parametrize("template,input", [("alpaca", ""), ("alpaca", "some input"), ("alpaca_short", "")])
def test_the_served_model_finds_its_templates_head(tiny_model_dir, template, input):
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    settings = GenerateSettings(prompt="Tell me about alpacas.", input=input, prompt_template=template)
    prompt_ids = served.prompt_ids(settings)
    shared = served.shared_prefix(settings, prompt_ids)
    head = served.template_for(settings).head(input)
    assert 0 < shared < len(prompt_ids)
    assert prompt_ids[:shared] == encode_prompt(served.tokenizer, head)[:shared]
    other = GenerateSettings(prompt="Why?", input=input, prompt_template=template)
    assert served.prompt_ids(other)[:shared] == prompt_ids[:shared]  # every instruction shares it


def test_no_head_no_shared_prefix(tiny_model_dir):
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    settings = GenerateSettings(prompt="Tell me about alpacas.", prompt_template="none")
    assert served.shared_prefix(settings, served.prompt_ids(settings)) == 0
