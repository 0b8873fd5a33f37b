"""One optimizer step (its micro-batches' gradients, clipping, AdamW, schedule) and evaluation."""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.batching import make_batch
from ..data.tokenization import IGNORE_INDEX, Example
from ..settings import TrainSettings
from .cpu.shared_prefix import plan_shared_prefix
from .distributed import ONE, World, clip_grad_norm
from .loss import label_loss


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(causal_lm, examples: list[Example], batch_size: int, packing: bool, pad_id: int,
             device: torch.device, compute=contextlib.nullcontext, world: World = ONE) -> float:
    """Mean loss per target token over the validation examples (each rank takes every
    world.size-th batch; the sums are reduced)."""
    if not examples:
        return float("nan")
    was_training = causal_lm.training
    causal_lm.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    starts = list(range(0, len(order), batch_size))
    mine = starts[world.rank::world.size]
    if world.sharded:  # FSDP gathers each layer in every rank's forward: all run as many
        mine += [None] * (-(-len(starts) // world.size) - len(mine))
    for start in mine:
        if start is None:
            with compute():
                label_loss(causal_lm, _to(make_batch([examples[order[0]]], packing, pad_id), device))
            continue
        batch = make_batch([examples[i] for i in order[start:start + batch_size]], packing, pad_id)
        with compute():
            loss_sum, n = label_loss(causal_lm, _to(batch, device))
        total, count = total + loss_sum.item(), count + n
    causal_lm.train(was_training)
    total, count = world.sum([total, count])
    return total / max(count, 1)


def make_optimizer(peft_model, settings: TrainSettings, total_steps: int):
    """AdamW over the trainable parameters (LoRA's, or every weight in full fine-tuning) and the
    learning-rate schedule."""
    from transformers import get_scheduler

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # Warmup starts at lr 0; a run that is all warmup would end before reaching the set rate (a
    # 1-step run would not learn at all), so warmup stops one step before the end at the latest.
    warmup = math.ceil(settings.warmup_ratio * total_steps) if settings.warmup_ratio > 0 else settings.warmup_steps
    scheduler = get_scheduler(settings.lr_scheduler, optimizer,
                              num_warmup_steps=min(warmup, total_steps - 1),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def optimizer_step(model, causal_lm, batches: list[dict[str, torch.Tensor]], optimizer, scheduler,
                   max_grad_norm: float, device: torch.device,
                   compute=contextlib.nullcontext,
                   share_prefix: bool = False, world: World = ONE,
                   idle: list[dict[str, torch.Tensor]] = ()) -> tuple[float, float, int, int]:
    """One optimizer step over its micro-batches (this rank's share of them): (mean loss per target
    token, the lr used, real tokens, computed tokens including padding), all over the world. `idle`:
    micro-batches run with weight 0, so that under FSDP every rank runs as many as the others."""
    step_targets = int(world.sum([sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)])[0])
    loss, tokens, slots = accumulate_gradients(causal_lm, batches, device, compute, share_prefix, step_targets)
    for batch in idle:
        with compute():
            loss_sum, _ = label_loss(causal_lm, _to(batch, device))
        (loss_sum * 0).backward()
    world.sum_gradients([p for p in model.parameters() if p.requires_grad])
    loss, tokens, slots = world.sum([loss, tokens, slots])
    tokens, slots = int(tokens), int(slots)
    if max_grad_norm > 0:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if world.sharded:  # shards and whole weights side by side (full fine-tuning's embeddings)
            clip_grad_norm(trainable, max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, lr, tokens, slots


def accumulate_gradients(causal_lm, batches: list[dict[str, torch.Tensor]], device: torch.device,
                         compute=contextlib.nullcontext,
                         share_prefix: bool = False, step_targets: int | None = None) -> tuple[float, int, int]:
    """The gradients of one step's mean loss per target token, added to the parameters' .grad:
    (that loss, real tokens, computed tokens including padding). With share_prefix, a preamble that
    the step's rows share is computed once (cpu/shared_prefix.py). step_targets: the whole step's
    target tokens when these batches are one rank's share of it."""
    if step_targets is None:
        step_targets = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    prefix = plan_shared_prefix(batches) if share_prefix and batches else None  # a rank may have none
    if prefix is not None:
        prefix.to(device)
        with compute():
            prefix.compute(causal_lm)
    loss_total, tokens, slots = 0.0, 0, 0
    for index, batch in enumerate(batches):
        with compute():  # the forward only; backward follows the forward's dtypes
            loss_sum, _ = label_loss(causal_lm, _to(batch, device), prefix, index)
        # normalise by the whole step's target tokens, so accumulation equals one big batch
        (loss_sum / max(step_targets, 1)).backward()
        loss_total += loss_sum.item()
        slots += batch["input_ids"].numel()
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if prefix is not None:
        prefix.backward()
    return loss_total / max(step_targets, 1), tokens, slots
