"""The step plan: which examples each optimizer step trains on, across epochs and fractions of one."""

import math

import pytest

from alpaca_tune.training.plan import StepPlan

LENGTHS = [5, 90, 12, 44, 7, 61, 33, 2, 80, 19, 27]  # 11 examples


@pytest.mark.parametrize("group_by_length", [True, False])
def test_each_epoch_covers_every_example_once(group_by_length):
    plan = StepPlan(LENGTHS, batch_size=2, accumulation=2, seed=7, group_by_length=group_by_length)
    assert plan.steps_per_epoch == 3  # 6 micro-batches of at most 2, 2 per step
    for epoch in range(3):
        steps = [plan.step(epoch * 3 + i) for i in range(3)]
        assert [len(step) for step in steps] == [2, 2, 2]
        seen = [i for step in steps for batch in step for i in batch]
        assert sorted(seen) == list(range(len(LENGTHS)))
        sizes = sorted(len(batch) for step in steps for batch in step)
        assert sizes == [1, 2, 2, 2, 2, 2]  # 11 = 5 full micro-batches + one of 1 (length grouping may move it)
    first, second = ([plan.step(epoch * 3 + i) for i in range(3)] for epoch in (0, 1))
    assert first != second  # each epoch is shuffled anew ...
    assert first == [plan.step(i) for i in range(3)]  # ... and the order is a pure function (exact resume)


def test_an_epoch_whose_micro_batches_do_not_fill_its_last_step():
    plan = StepPlan(LENGTHS, batch_size=4, accumulation=2, seed=0, group_by_length=False)
    assert plan.steps_per_epoch == 2  # 3 micro-batches: the second step has one
    assert [len(plan.step(i)) for i in range(4)] == [2, 1, 2, 1]
    assert sorted(i for batch in plan.step(2) + plan.step(3) for i in batch) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("epochs, expected", [(1.0, 3), (0.5, 2), (0.01, 1), (2.34, 8), (3.0, 9)])
def test_fractional_epochs_round_up_to_whole_steps(epochs, expected):
    plan = StepPlan(LENGTHS, batch_size=2, accumulation=2, seed=0, group_by_length=True)
    assert plan.total_steps(epochs, max_steps=-1) == expected == max(1, math.ceil(epochs * 3))


def test_max_steps_wins_over_epochs_and_may_run_past_the_data():
    plan = StepPlan(LENGTHS, batch_size=2, accumulation=2, seed=0, group_by_length=True)
    assert plan.total_steps(3.0, max_steps=5) == 5
    assert plan.total_steps(3.0, max_steps=0) == 9  # 0, like -1, means "use the epochs"
    assert plan.step(100) and all(plan.step(100))  # epoch 33: still a full order
