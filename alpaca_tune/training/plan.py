"""Which micro-batches make up each optimizer step: a pure function of the settings.

Being pure is what makes resume exact: a resumed run recomputes the same order from (seed,
epoch) and skips the steps it had already taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.batching import micro_batches


@dataclass
class StepPlan:
    lengths: list[int]  # of the training examples, in order
    batch_size: int
    accumulation: int
    seed: int
    group_by_length: bool

    @property
    def steps_per_epoch(self) -> int:
        """Every example once; the epoch's last step may hold fewer micro-batches."""
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.accumulation)

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        """max_steps when > 0, else num_train_epochs (fractions too) of steps, at least one."""
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def step(self, index: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step `index` (0-based); past the
        first epoch, the next epoch's order."""
        epoch, within = divmod(index, self.steps_per_epoch)
        batches = micro_batches(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
        return batches[within * self.accumulation:(within + 1) * self.accumulation]
