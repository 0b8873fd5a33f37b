"""Streaming generation: prompt -> response text chunks, stopping at EOS or a stop sequence.

Our own token loop over a Decoder's KV cache (decoder.py: LeanLlama or transformers) and
sampling.py, rather than generate() in a thread with a streamer, so that each token is produced
in the caller's thread: a Cog cancel lands between two tokens, and nothing keeps running after
the caller stops reading.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ..errors import UserError
from .decoder import Decoder
from .sampling import SamplingParams, next_token, process_scores


class TimeLimitError(UserError):
    """A prediction ran past the server's limit for one prediction."""


def parse_stop_sequences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in text.split(",")) if s]


@torch.inference_mode()
def generate_token_ids(decoder: Decoder, prompt_ids: list[int], params: SamplingParams,
                       eos_ids: set[int] | frozenset[int], time_limit_s: float | None = None) -> Iterator[int]:
    """Yield generated ids one at a time (EOS excluded), reusing the KV cache between steps;
    TimeLimitError once `time_limit_s` have passed since the call."""
    started = time.monotonic()
    device = decoder.device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    sequence = torch.tensor([prompt_ids], device=device)  # [1, T]: what the repetition penalty sees
    with decoder.feeder(len(prompt_ids) + params.max_new_tokens) as feed:
        logits = feed(prompt_ids)
        for step in range(params.max_new_tokens):
            if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                raise TimeLimitError(f"stopped after {time_limit_s:g} s and {step} tokens: the server's time "
                                     f"limit for one prediction ($ALPACA_TUNE_MAX_PREDICT_SECONDS); ask for "
                                     f"fewer max_new_tokens")
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


def stream_text(decoder: Decoder, tokenizer, prompt_ids: list[int], params: SamplingParams,
                stop_sequences: list[str], time_limit_s: float | None = None) -> Iterator[str]:
    """Response text in chunks as tokens arrive; never the prompt, never a stop sequence."""
    eos_ids = decoder.eos_ids | ({tokenizer.eos_token_id} - {None})
    generated: list[int] = []
    emitted = 0  # characters of the response already yielded
    for token in generate_token_ids(decoder, prompt_ids, params, eos_ids, time_limit_s):
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
