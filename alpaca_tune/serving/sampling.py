"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

The same rules and order as transformers' logits processors (tests/serving/test_sampling.py compares them
on random logits), written here because serving must not import transformers: that import alone
costs ~0.8 s of the server's start-up (BENCHMARKS.md, cold start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import GenerateSettings, default_of


def _default(name: str):
    return default_of(GenerateSettings, name)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; the defaults are GenerateSettings' (settings.py)."""
    max_new_tokens: int = _default("max_new_tokens")
    temperature: float = _default("temperature")  # 0: greedy
    top_p: float = _default("top_p")
    top_k: int = _default("top_k")  # 0: off
    repetition_penalty: float = _default("repetition_penalty")
    seed: int | None = None  # None: a random seed (GenerateSettings' seed -1)

    @classmethod
    def from_settings(cls, settings: GenerateSettings, max_new_tokens: int) -> SamplingParams:
        return cls(max_new_tokens=max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                   top_k=settings.top_k, repetition_penalty=settings.repetition_penalty,
                   seed=None if settings.seed < 0 else settings.seed)


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every id already in the sequence: positive scores / penalty, negative * penalty."""
    picked = scores.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, seen, picked)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """-inf for every score below the k-th largest (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    threshold = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest set of tokens whose probability adds up to more than top_p."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)
    drop[..., -1:] = False  # the most likely token always stays
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process_scores(logits: torch.Tensor, sequence: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [1, V] (fp32) -> the scores the next token is drawn from; sequence [1, T] so far."""
    scores = logits
    if params.repetition_penalty != 1.0:
        scores = penalize_repetition(scores, sequence, params.repetition_penalty)
    if params.temperature > 0:
        scores = scores / params.temperature
        if params.top_k > 0:
            scores = keep_top_k(scores, params.top_k)
        if params.top_p < 1.0:
            scores = keep_top_p(scores, params.top_p)
    return scores


def next_token(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[1, 1] id: a draw from softmax(scores), or the argmax when temperature is 0."""
    if params.temperature > 0:
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
    if scores.device.type == "cpu":
        # numpy's argmax (the same first index of the largest, NaN counted largest): 3 us over
        # SmolLM2's 49,152 scores where torch's took 65 us (2-core Xeon), once per request a step
        return torch.from_numpy(scores.numpy().argmax(axis=-1, keepdims=True))
    return scores.argmax(dim=-1, keepdim=True)
