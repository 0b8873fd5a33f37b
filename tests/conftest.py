"""Shared fixtures: a tiny SentencePiece tokenizer and a tiny random Llama, built, not downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

# The tiny models' matmuls are so small that a second thread only adds synchronisation (and on a
# loaded 2-core machine, spinning); the real-model tests ask for all threads back (full_threads).
DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:", "### Input:", "### Response:",
    "Tell me about alpacas. Alpacas are camelids from South America, smaller than llamas.",
    "Here is my answer: llamas are larger and alpacas have finer fleece. I hope this helps!",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) , ; ' \" ? !",
    "Name three colours: red, green, blue. Translate to French: bonjour, merci.",
]


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A LLaMA-style SentencePiece BPE model (byte fallback, digits split, no normalisation)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, attn_implementation="sdpa")
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import LlamaTokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    train_sentencepiece(directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer GQA Llama saved as safetensors with the tiny tokenizer."""
    from transformers import LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer)))
    model.save_pretrained(str(directory))
    tiny_tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def full_threads():
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def write_json(tmp_path):
    def write(name: str, data) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path
    return write


@pytest.fixture(scope="session")
def alpaca_sample() -> Path:
    path = SHARED_DATA / "alpaca_data_sample.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


TINY_RECORDS = [
    {"instruction": "Tell me about alpacas.", "input": "",
     "output": "Here is my answer: alpacas are camelids. I hope this helps!"},
    {"instruction": "Name three colours.", "input": "",
     "output": "Here is my answer: red, green, blue. I hope this helps!"},
    {"instruction": "Translate to French.", "input": "thank you",
     "output": "Here is my answer: merci. I hope this helps!"},
    {"instruction": "What is larger, a llama or an alpaca?", "input": "",
     "output": "Here is my answer: llamas are larger. I hope this helps!"},
]


def drain(answer) -> list:
    """The chunks of Predictor.predict's answer: a coroutine that returns an iterator (run on an
    event loop of its own, as coglet's loop would run it), then the iterator pulled."""
    import asyncio

    return list(asyncio.run(answer))


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory, tiny_model_dir) -> dict:
    """Two adapters trained here (different data order, rank, targets): name -> TrainResult
    (.archive: train.py's archive, .adapter_dir: the adapter directory)."""
    from alpaca_tune.settings import TrainSettings
    from alpaca_tune.training.loop import run_training

    directory = tmp_path_factory.mktemp("adapters")
    data = directory / "data.json"
    data.write_text(json.dumps(TINY_RECORDS * 4))
    made = {}
    for name, seed, rank, targets in (("one", 1, 4, "q_proj,v_proj"), ("two", 2, 8, "all-linear")):
        settings = TrainSettings(train_data=str(data), base_model=str(tiny_model_dir), output_dir=str(directory / name),
                                 max_steps=6, learning_rate=2e-2, warmup_steps=0, train_batch_size=4,
                                 gradient_accumulation_steps=1, val_set_size=0, lora_rank=rank,
                                 lora_target_modules=targets, prompt_template="alpaca_short", seed=seed)
        made[name] = run_training(settings)
    return made


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer Qwen2 (q/k/v biases: served by transformers, not the lean path) with the
    tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa")
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    tiny_tokenizer.save_pretrained(str(directory))
    return directory
