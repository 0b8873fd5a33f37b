"""Micro-batches (order, length grouping) and collation (padding, packing, shifted targets)."""

import torch

from alpaca_tune.data.batching import collate_packed, collate_padded, micro_batches
from alpaca_tune.data.tokenization import IGNORE_INDEX, Example


def test_micro_batches_cover_every_example_once_and_are_deterministic():
    lengths = [5, 90, 12, 44, 7, 61, 33, 2, 80, 19, 27]
    batches = micro_batches(lengths, 3, seed=7, epoch=0, group_by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == micro_batches(lengths, 3, seed=7, epoch=0, group_by_length=True)
    assert batches != micro_batches(lengths, 3, seed=7, epoch=1, group_by_length=True)


def test_length_grouping_reduces_padding():
    lengths = [int(x) for x in torch.randint(10, 500, (400,), generator=torch.Generator().manual_seed(0))]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = padding(micro_batches(lengths, 4, seed=0, epoch=0, group_by_length=True))
    plain = padding(micro_batches(lengths, 4, seed=0, epoch=0, group_by_length=False))
    assert grouped < plain / 5


def test_padded_targets_never_cross_examples():
    examples = [Example([1, 5, 6], [IGNORE_INDEX, 5, 6]), Example([1, 7], [1, 7])]
    packed = collate_packed(examples)
    assert packed["targets"].tolist() == [[5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    padded = collate_padded(examples, pad_id=0)
    assert padded["targets"].tolist() == [[5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
