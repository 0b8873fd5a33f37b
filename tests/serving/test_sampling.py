"""sampling.py against transformers' logits processors (the reference it replaces at serving time)."""

import pytest
import torch

from alpaca_tune.serving.sampling import SamplingParams, next_token, process_scores


def transformers_scores(logits, sequence, params: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors(sequence, logits.clone())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9, top_k=40),
    SamplingParams(temperature=1.3, top_p=0.5, top_k=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.2, top_p=1.0, top_k=5, repetition_penalty=0.8),
    SamplingParams(temperature=1.0, top_p=0.999, top_k=300),  # k above the vocabulary
    SamplingParams(temperature=0.0, repetition_penalty=1.5),  # greedy: only the penalty applies
])
def test_scores_equal_transformers_processors(params):
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(1, 257, generator=generator) * 4
        logits[0, :8] = logits[0, 8]  # ties at the cut-offs
        sequence = torch.randint(0, 257, (1, 30), generator=generator)
        ours = process_scores(logits.clone(), sequence, params)
        theirs = transformers_scores(logits, sequence, params)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        finite = torch.isfinite(theirs)
        torch.testing.assert_close(ours[finite], theirs[finite])


def test_next_token_is_argmax_when_greedy_and_seeded_when_sampling():
    scores = torch.tensor([[0.1, 3.0, 0.2, -1.0]])
    assert int(next_token(scores, SamplingParams(temperature=0.0), torch.Generator())) == 1
    params = SamplingParams(temperature=1.0)
    draws = [int(next_token(torch.zeros(1, 50), params, torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(draws)) == 1
    spread = {int(next_token(torch.zeros(1, 50), params, torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(spread) > 5
    masked = torch.full((1, 50), float("-inf"))
    masked[0, 17] = 0.0
    assert int(next_token(masked, params, torch.Generator())) == 17


def test_greedy_picks_what_torch_argmax_picks_on_ties_nan_and_inf():
    """Greedy on CPU goes through numpy's argmax: the same id as torch's, [1, 1] int64, for
    ties (the first), NaN (taken as the largest), infinities, and random rows of a big vocabulary."""
    rows = [torch.tensor([[1.0, 5.0, 5.0, 2.0]]), torch.tensor([[0.0, float("nan"), 9.0, float("nan")]]),
            torch.tensor([[float("-inf"), float("inf"), float("inf")]]), torch.full((1, 6), float("-inf"))]
    generator = torch.Generator().manual_seed(0)
    rows += [torch.randn(1, 49152, generator=generator) for _ in range(5)]
    rows += [torch.randn(3, 100, generator=generator)[1:2]]  # a row of a larger tensor
    for scores in rows:
        got = next_token(scores, SamplingParams(temperature=0.0), torch.Generator())
        expected = scores.argmax(dim=-1, keepdim=True)
        assert got.dtype == torch.int64 and got.shape == (1, 1) and torch.equal(got, expected), scores
