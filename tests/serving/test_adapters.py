"""Per-request adapters (lora_weights): applied unmerged per row of a batch, each request's answer
the one its adapter gives served alone (merged, as COG_WEIGHTS); names only under the adapter
directory, one message for every refusal; an LRU by content."""

import base64
import os

import pytest

from alpaca_tune.errors import UserError
from alpaca_tune.serving.adapters import REFUSED, AdapterCache, resolve
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.serving.limits import Limits
from alpaca_tune.settings import GenerateSettings


@pytest.fixture(scope="module")
def archives(trained_adapters):
    """Two adapters trained here (different data order, rank, targets), as train.py's archives."""
    return {name: result.archive for name, result in trained_adapters.items()}


def data_uri(path) -> str:
    return "data:application/gzip;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(prompt, lora_weights="", **change):
    return GenerateSettings(prompt=prompt, lora_weights=lora_weights, **{
        "temperature": 0.0, "max_new_tokens": 20, "prompt_template": "alpaca_short", **change})


PROMPTS = ["Tell me about alpacas.", "Name three colours.", "Hi", "Translate to French: thank you."]


def alone(tiny_model_dir, archive, prompt) -> str:
    """The adapter served as COG_WEIGHTS (merged into the weights), answering alone."""
    return "".join(InstructModel.load(str(archive) if archive else None,
                                      base_model=str(tiny_model_dir)).stream(ask(prompt)))


def test_a_batch_of_different_adapters_answers_each_as_its_adapter_alone(archives, tiny_model_dir):
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    scheduler = served.batching(8)
    try:
        plan = [(p, archives[name] if name else None) for p in PROMPTS for name in ("one", "two", None)]
        expected = [alone(tiny_model_dir, archive, prompt) for prompt, archive in plan]
        streams = [served.submit(scheduler, ask(prompt, data_uri(archive) if archive else ""))
                   for prompt, archive in plan]
        assert ["".join(stream) for stream in streams] == expected
        assert len(set(expected)) > 3  # the adapters do change the answers
        assert len(served.adapters) == 2 and served.adapters.fetches == 2  # each fetched once
    finally:
        scheduler.close()


def test_a_request_adapter_replaces_the_servers_own(archives, tiny_model_dir):
    """With adapter one merged at setup, a request for adapter two gets two's answer alone (one is
    taken off again), and a request without lora_weights gets one's."""
    served = InstructModel.load(str(archives["one"]), base_model=str(tiny_model_dir))
    scheduler = served.batching(4)
    try:
        for prompt in PROMPTS[:2]:
            own, other = (served.submit(scheduler, ask(prompt, spec)) for spec in ("", data_uri(archives["two"])))
            assert "".join(own) == alone(tiny_model_dir, archives["one"], prompt)
            assert "".join(other) == alone(tiny_model_dir, archives["two"], prompt)
    finally:
        scheduler.close()


def test_names_only_inside_the_adapter_directory_and_one_message_for_every_refusal(archives, tmp_path):
    inside = tmp_path / "adapters"
    inside.mkdir()
    (inside / "one.tar.gz").write_bytes(archives["one"].read_bytes())
    outside = tmp_path / "secret.tar.gz"
    outside.write_bytes(archives["two"].read_bytes())
    os.symlink(outside, inside / "link.tar.gz")
    assert resolve("one.tar.gz", str(inside)) == str((inside / "one.tar.gz").resolve())
    for spec in (str(outside), "../secret.tar.gz", "link.tar.gz", "missing.tar.gz", "/etc/passwd", ""):
        with pytest.raises(UserError) as err:
            resolve(spec, str(inside))
        assert str(err.value) == REFUSED
    with pytest.raises(UserError) as err:
        resolve("one.tar.gz", "")  # no adapter directory: names are refused alike
    assert str(err.value) == REFUSED


def test_the_cache_keeps_the_most_recently_used(archives, tiny_model_dir):
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    cache = AdapterCache(served.decoder, served.adapters.base_shapes, Limits(max_cached_adapters=1))
    one, two = data_uri(archives["one"]), data_uri(archives["two"])
    first = cache.get(one)
    assert cache.get(one) is first and cache.fetches == 1
    cache.get(two)
    assert len(cache) == 1 and cache.fetches == 2
    cache.get(one)
    assert cache.fetches == 3  # one was evicted by two


def test_an_adapter_for_another_base_fails_its_request_alone(tiny_model_dir, tmp_path):
    import tarfile

    import torch
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(tiny_llama_config(400, hidden_size=32, intermediate_size=64))
    adapter = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapter.save_pretrained(str(tmp_path / "adapter"))
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "adapter", arcname="adapter")
    served = InstructModel.load(None, base_model=str(tiny_model_dir))
    scheduler = served.batching(4)
    try:
        running = served.submit(scheduler, ask(PROMPTS[0], max_new_tokens=40))
        with pytest.raises(UserError, match=r"^lora_weights=data:.*: adapter_model.safetensors: tensor .* has shape"):
            served.submit(scheduler, ask(PROMPTS[1], data_uri(archive)))
        assert "".join(running) == "".join(served.stream(ask(PROMPTS[0], max_new_tokens=40)))  # went on
    finally:
        scheduler.close()
