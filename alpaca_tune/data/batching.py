"""Examples -> micro-batches: order (shuffled, optionally length-grouped), padding or packing.

Every tensor batch carries `targets`: the next-token label of each position, shifted inside each
example. Shifting per example (not per row) is what lets packed examples sit side by side
without the last token of one being trained to predict the first token of the next.
"""

from __future__ import annotations

import random

import torch

from .tokenization import IGNORE_INDEX, Example

MEGABATCH_FACTOR = 50  # length grouping sorts within windows of this many micro-batches


def micro_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Example indices per micro-batch for one epoch; a pure function of (seed, epoch).

    Being a pure function is what makes resume exact: a resumed run recomputes the same order and
    skips the micro-batches it had already consumed.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * MEGABATCH_FACTOR
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)  # keep similar lengths together, but not longest-first every window
    return batches


def shifted_targets(labels: list[int]) -> list[int]:
    """Position t learns labels[t + 1]; the last position learns nothing."""
    return labels[1:] + [IGNORE_INDEX]


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """[B, T] right-padded to the longest example of the micro-batch."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        targets[row, :n] = torch.tensor(shifted_targets(example.labels))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """[1, sum of lengths]: no padding; position_ids restart and segment_ids tell examples apart."""
    input_ids, targets, positions, segments = [], [], [], []
    for index, example in enumerate(examples):
        input_ids += example.input_ids
        targets += shifted_targets(example.labels)
        positions += range(len(example))
        segments += [index] * len(example)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(input_ids), "position_ids": as_row(positions),
            "segment_ids": as_row(segments), "targets": as_row(targets)}


def make_batch(examples: list[Example], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch: packed into a row (with segment_ids) or right-padded rows."""
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)
