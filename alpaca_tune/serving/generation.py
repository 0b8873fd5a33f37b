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
from .decoder import Decoder, stop_ids
from .sampling import SamplingParams, next_token, process_scores


class TimeLimitError(UserError):
    """A prediction ran past the server's limit for one prediction."""


def parse_stop_sequences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in text.split(",")) if s]


class TokenPicker:
    """One request's sampling: its settings, its own generator (the same seed gives the same
    answer whatever else is decoded meanwhile) and the ids so far, which the repetition penalty
    reads. Shared by the one-sequence loop below and the batch scheduler (scheduler.py)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int] | frozenset[int],
                 device: torch.device):
        self.params, self.eos_ids = params, eos_ids
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.sequence = torch.tensor([prompt_ids], device=device)  # [1, T]
        self.generated = 0

    @torch.inference_mode()
    def pick(self, logits: torch.Tensor) -> int | None:
        """The next id after fp32 `logits` [vocab]; None at EOS."""
        next_id = next_token(process_scores(logits[None], self.sequence, self.params), self.params, self.generator)
        token = int(next_id)
        if token in self.eos_ids:
            return None
        self.sequence = torch.cat([self.sequence, next_id], dim=1)
        self.generated += 1
        return token

    @property
    def full(self) -> bool:
        """max_new_tokens reached."""
        return self.generated >= self.params.max_new_tokens


def time_limit_error(time_limit_s: float, tokens: int) -> TimeLimitError:
    return TimeLimitError(f"stopped after {time_limit_s:g} s and {tokens} tokens: the server's time limit for one "
                          f"prediction ($ALPACA_TUNE_MAX_PREDICT_SECONDS); ask for fewer max_new_tokens")


@torch.inference_mode()
def generate_token_ids(decoder: Decoder, prompt_ids: list[int], params: SamplingParams,
                       eos_ids: set[int] | frozenset[int], time_limit_s: float | None = None,
                       adapter=None, shared_prefix: int = 0) -> Iterator[int]:
    """Yield generated ids one at a time (EOS excluded), reusing the KV cache between steps;
    TimeLimitError once `time_limit_s` have passed since the call."""
    started = time.monotonic()
    picker = TokenPicker(prompt_ids, params, eos_ids, decoder.device)
    capacity = len(prompt_ids) + params.max_new_tokens
    with decoder.feeder(capacity, adapter, shared_prefix) as feed:
        logits = feed(prompt_ids)
        while not picker.full:
            if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                raise time_limit_error(time_limit_s, picker.generated)
            token = picker.pick(logits)
            if token is None:
                return
            yield token
            if not picker.full:
                logits = feed([token])


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not safe to emit yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextAssembler:
    """A response's text as its tokens arrive: what may be shown so far, never a stop sequence
    nor the start of one, nor half a character."""

    def __init__(self, tokenizer, stop_sequences: list[str]):
        self.tokenizer, self.stops = tokenizer, stop_sequences
        self.generated: list[int] = []
        self.emitted = 0  # characters of the response already given out
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that became safe to show with `token` ("" if none); sets `stopped` when a
        stop sequence appeared."""
        self.generated.append(token)
        # Decoding the whole response each time keeps multi-token characters and the
        # tokenizer's spacing rules right; a trailing U+FFFD means a character is incomplete.
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return ""
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        return self._take(text, len(text) - _held_back(text, self.stops))

    def finish(self) -> str:
        """What is left to show once generation ended without a stop sequence."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True).lstrip()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        chunk, self.emitted = text[self.emitted:end], end
        return chunk


def stream_text(decoder: Decoder, tokenizer, prompt_ids: list[int], params: SamplingParams,
                stop_sequences: list[str], time_limit_s: float | None = None, adapter=None,
                shared_prefix: int = 0) -> Iterator[str]:
    """Response text in chunks as tokens arrive; never the prompt, never a stop sequence."""
    eos_ids = stop_ids(decoder, tokenizer)
    text = TextAssembler(tokenizer, stop_sequences)
    for token in generate_token_ids(decoder, prompt_ids, params, eos_ids, time_limit_s, adapter, shared_prefix):
        chunk = text.add(token)
        if chunk:
            yield chunk
        if text.stopped:
            return
    chunk = text.finish()
    if chunk:
        yield chunk
