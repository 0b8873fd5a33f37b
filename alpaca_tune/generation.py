"""Streaming generation: prompt -> response text chunks, stopping at EOS or a stop sequence.

Our own token loop over transformers' KV cache and logits processors (rather than generate() in a
thread with a streamer) so that each token is produced in the caller's thread: a Cog cancel lands
between two tokens, and nothing keeps running after the caller stops reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 40  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None


def parse_stop_sequences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in text.split(",")) if s]


def _logits_processors(params: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the model config's (may be a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for config in (getattr(model, "generation_config", None), model.config):
        configured = getattr(config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return ids


@torch.inference_mode()
def generate_token_ids(model, prompt_ids: list[int], params: SamplingParams,
                       eos_ids: set[int]) -> Iterator[int]:
    """Yield generated ids one at a time (EOS excluded), reusing the KV cache between steps."""
    from transformers import DynamicCache

    device = model.device
    processors = _logits_processors(params)
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    sequence = torch.tensor([prompt_ids], device=device)  # [1, T]
    cache = DynamicCache(config=model.config)
    step_input = sequence
    for _ in range(params.max_new_tokens):
        logits = model(input_ids=step_input, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1, :].float()  # [1, V]
        scores = processors(sequence, logits)
        if params.temperature > 0:
            next_id = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)  # [1, 1]
        else:
            next_id = scores.argmax(dim=-1, keepdim=True)
        token = int(next_id)
        if token in eos_ids:
            return
        yield token
        sequence = torch.cat([sequence, next_id], dim=1)
        step_input = next_id


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
