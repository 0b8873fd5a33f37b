"""Streaming generation: prompt -> response text chunks, stopping at EOS or a stop sequence.

Our own token loop over a KV cache (transformers' or LeanLlama's) and sampling.py, rather than
generate() in a thread with a streamer, so that each token is produced in the caller's thread: a
Cog cancel lands between two tokens, and nothing keeps running after the caller stops reading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .cuda_graph_decode import graphs_possible, kept_feeder
from .lean_llama import LeanLlama
from .sampling import SamplingParams, next_token, process_scores


def parse_stop_sequences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in text.split(",")) if s]


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the model config's (may be a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for config in (getattr(model, "generation_config", None), model.config):
        configured = config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return ids


@contextlib.contextmanager
def feeding(model, capacity: int, cuda_graphs: bool = True, compile_step: bool = False):
    """feed(ids) -> fp32 logits [vocab] after those ids, keeping the model's KV cache between calls;
    for one generation."""
    if isinstance(model, LeanLlama):
        cache = model.new_cache(capacity)
        yield lambda ids: model.forward(ids, cache)
    elif cuda_graphs and graphs_possible(model):
        with kept_feeder(model, capacity, compile_step) as feeder:
            yield feeder
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)

        def feed(ids: list[int]) -> torch.Tensor:
            step = torch.tensor([ids], device=model.device)
            return model(input_ids=step, past_key_values=cache, use_cache=True,
                         logits_to_keep=1).logits[0, -1].float()
        yield feed


@torch.inference_mode()
def generate_token_ids(model, prompt_ids: list[int], params: SamplingParams,
                       eos_ids: set[int], cuda_graphs: bool = True, compile_step: bool = False) -> Iterator[int]:
    """Yield generated ids one at a time (EOS excluded), reusing the KV cache between steps.

    `model` is a transformers causal LM or a LeanLlama (the CPU serving path). On a GPU each
    one-token step is a CUDA graph replay (cuda_graph_decode.py) unless cuda_graphs is False;
    compile_step also compiles that step first.
    """
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    sequence = torch.tensor([prompt_ids], device=device)  # [1, T]: what the repetition penalty sees
    with feeding(model, len(prompt_ids) + params.max_new_tokens, cuda_graphs, compile_step) as feed:
        logits = feed(prompt_ids)
        for step in range(params.max_new_tokens):
            if step:
                logits = feed([token])
            next_id = next_token(process_scores(logits[None], sequence, params), params, generator)  # [1, 1]
            token = int(next_id)
            if token in eos_ids:
                return
            yield token
            sequence = torch.cat([sequence, next_id], dim=1)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not safe to emit yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def stream_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
                stop_sequences: list[str]) -> Iterator[str]:
    """Response text in chunks as tokens arrive; never the prompt, never a stop sequence."""
    eos_ids = eos_ids_of(model, tokenizer)
    generated: list[int] = []
    emitted = 0  # characters of the response already yielded
    for token in generate_token_ids(model, prompt_ids, params, eos_ids):
        generated.append(token)
        # Decoding the whole response each time keeps multi-token characters and the
        # tokenizer's spacing rules right; a trailing U+FFFD means a character is incomplete.
        text = tokenizer.decode(generated, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            continue
        cut = min((text.find(s) for s in stop_sequences if s in text), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - _held_back(text, stop_sequences)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(generated, skip_special_tokens=True).lstrip()
    if len(text) > emitted:
        yield text[emitted:]
