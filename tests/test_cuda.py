"""The CUDA paths: bf16 training, 8-bit and 4-bit (QLoRA) training, serving, CUDA-graph decoding.

Skipped on a machine without a CUDA GPU (CI has none); run them where one is:
    python -m pytest tests/test_cuda.py
(BENCHMARKS.md's GPU section records when they last ran and on what.)
"""

import dataclasses
import importlib.util

import pytest
import torch
from conftest import TINY_RECORDS, drain

from alpaca_tune.serving.cuda_graph import StaticCacheFeeder
from alpaca_tune.serving.generation import generate_token_ids
from alpaca_tune.serving.sampling import SamplingParams
from alpaca_tune.serving.transformers_decoder import TransformersDecoder
from alpaca_tune.settings import TrainSettings
from alpaca_tune.training.loop import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bitsandbytes = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA GPU and bitsandbytes")

PROMPT = [1, 40, 41, 42, 43, 44]


def _cuda_model(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to("cuda").eval()


def test_graph_decoding_equals_eager_decoding(tiny_model_dir):
    model = _cuda_model(tiny_model_dir, torch.float32)
    graphs, no_graphs = TransformersDecoder(model), TransformersDecoder(model, cuda_graphs=False)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    eager = list(generate_token_ids(no_graphs, PROMPT, greedy, set()))
    graphed = list(generate_token_ids(graphs, PROMPT, greedy, set()))
    assert len(eager) == 24 and graphed == eager
    compiled = TransformersDecoder(model, compile_step=True)
    assert list(generate_token_ids(compiled, PROMPT, greedy, set())) == eager
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=5)
    assert list(generate_token_ids(graphs, PROMPT, sampled, set())) == \
        list(generate_token_ids(no_graphs, PROMPT, sampled, set()))


def test_graph_replay_gives_the_eager_steps_logits_in_bf16(tiny_model_dir):
    model = _cuda_model(tiny_model_dir, torch.bfloat16)
    graphed, eager = StaticCacheFeeder(model, 32), StaticCacheFeeder(model, 32, use_graph=False)
    with torch.inference_mode():
        for ids in [PROMPT, [50], [51], [7], [9], [60]]:
            torch.testing.assert_close(graphed(ids), eager(ids), rtol=0, atol=0)
    assert graphed.graph is not None  # the steps above really were replays


@pytest.fixture
def settings(tmp_path, tiny_model_dir, write_json):
    data = write_json("train.json", TINY_RECORDS * 4)
    return TrainSettings(train_data=str(data), base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                         max_steps=40, learning_rate=1e-2, lora_alpha=32, lora_target_modules="all-linear",
                         lora_dropout=0.0, train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0,
                         val_set_size=2, lora_rank=4, logging_steps=10, seed=3)


# torch_compile is on by default: the unquantized runs train compiled decoder layers
@pytest.mark.parametrize("quantization,checkpointing", [
    ("none", False), ("none", True),
    pytest.param("8bit", False, marks=needs_bitsandbytes),
    pytest.param("4bit", True, marks=needs_bitsandbytes)])
def test_training_on_the_gpu_learns_and_serves(settings, tiny_model_dir, monkeypatch, quantization, checkpointing):
    result = run_training(dataclasses.replace(settings, quantization=quantization,
                                              gradient_checkpointing=checkpointing))
    history = result.metrics["history"]
    first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.9 * first
    assert result.metrics["final_eval_loss"] > 0
    # the adapter trained on the GPU (on a quantized base too) serves on the unquantized bf16 base
    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir))
    from predict import Predictor

    predictor = Predictor()
    predictor.setup(str(result.archive))
    assert predictor.model.decoder.device.type == "cuda"
    answer = "".join(drain(predictor.predict(prompt="Tell me about alpacas.", max_new_tokens=16, temperature=0.0)))
    assert answer.strip()


def test_bf16_training_matches_fp32_training(settings):
    """Same data, seed and steps: the bf16 base lands where the fp32 base does, within bf16 noise;
    the compiled layers' losses are the eager layers' losses."""
    short = dataclasses.replace(settings, max_steps=10)
    eager = run_training(dataclasses.replace(short, precision="bf16", torch_compile=False,
                                             output_dir=settings.output_dir + "-eager"))
    bf16 = run_training(dataclasses.replace(short, precision="bf16", output_dir=settings.output_dir + "-bf16"))
    fp32 = run_training(dataclasses.replace(short, precision="fp32"))
    for a, b, c in zip(bf16.metrics["history"], fp32.metrics["history"], eager.metrics["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.03)
        assert a["loss"] == pytest.approx(c["loss"], rel=0.01)
