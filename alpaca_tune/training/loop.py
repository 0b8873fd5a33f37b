"""The LoRA training run: data -> adapter archive with config, metrics and loss plot.

A plain loop rather than HF Trainer, because the speed-ups that matter here (packing with exact
example isolation, LM head only at labelled positions, a preamble shared within a step) and
exact resume are simplest to get right when the loop is ours. Order of work: everything that can
reject the input (settings, template, data) happens before the model is loaded, so bad input
fails in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from .. import device as machine
from ..base_model import load_tokenizer, resolve_base_dir, weight_shapes
from ..data.batching import make_batch
from ..data.prompts import template_for
from ..data.records import DataError, load_records, split_records
from ..data.tokenization import tokenize_records
from ..settings import TrainSettings, apply_preset, validate
from . import adapter, distributed
from .checkpoint import (
    checkpoint_dir,
    load_training_state,
    load_weights,
    open_checkpoint,
    save_checkpoint,
)
from .cpu.shared_prefix import shared_prefix_usable
from .fast_paths import FastPaths, switch_on_fast_paths, wanted
from .model import ModelError, attach_lora, load_frozen_base, make_fully_trainable
from .outputs import TrainResult, removed_on_failure, write_outputs
from .plan import StepPlan
from .precision import cpu_auto_dtype, training_dtype
from .progress import ProgressLog
from .steps import evaluate, make_optimizer, optimizer_step

log = logging.getLogger(__name__)


def prepare_examples(records, settings: TrainSettings, tokenizer, template):
    """Validated records -> (train examples, validation examples, stats); DataError if nothing is left."""
    train_records, val_records = split_records(records, settings.val_set_size, settings.seed)
    train, stats = tokenize_records(train_records, template, tokenizer, settings.cutoff_len,
                                    settings.train_on_inputs, progress=len(records) > 5000)
    val, val_stats = tokenize_records(val_records, template, tokenizer, settings.cutoff_len,
                                      settings.train_on_inputs)
    if not train:
        raise DataError(f"{settings.train_data}: no example has a response token within "
                        f"cutoff_len={settings.cutoff_len}; raise cutoff_len")
    log.info("data: %d records -> %d train / %d validation examples; %d truncated at cutoff_len=%d, "
             "%d dropped (prompt alone fills cutoff_len)", len(records), len(train), len(val),
             stats.truncated + val_stats.truncated, settings.cutoff_len, stats.dropped + val_stats.dropped)
    return train, val, {"records": len(records), "train_examples": len(train), "val_examples": len(val),
                        "truncated": stats.truncated + val_stats.truncated,
                        "dropped": stats.dropped + val_stats.dropped,
                        "train_tokens_per_epoch": stats.tokens,
                        "train_label_tokens_per_epoch": stats.label_tokens}


def run_training(settings: TrainSettings) -> TrainResult | None:
    """The run; under torchrun every rank calls this, and only rank 0 returns the result (the
    others return None)."""
    world = distributed.launched_world()
    if not world.is_main:
        logging.getLogger("alpaca_tune").setLevel(logging.WARNING)  # rank 0 tells the story
    settings = apply_preset(settings, world.size)
    validate(settings)
    if settings.finetune_method == "full" and settings.quantization != "none":
        raise ModelError(f"finetune_method=full trains every weight, which a {settings.quantization} base cannot "
                         f"hold; use quantization=none")
    template = template_for(settings)
    records = load_records(settings.train_data)
    started = time.perf_counter()
    # Everything that can reject the data (its records, the split, cutoff_len) runs on the
    # tokenizer alone, before the model is loaded or anything is written.
    base_dir = resolve_base_dir(settings.base_model)
    tokenizer = load_tokenizer(base_dir)
    train_examples, val_examples, data_stats = prepare_examples(records, settings, tokenizer, template)
    base_shapes = weight_shapes(base_dir)  # also: a truncated weights file is named here
    output_dir = Path(settings.output_dir)

    device = distributed.rank_device(world, machine.pick_device())
    distributed.start(world, device)  # after the data passed: bad data never starts a process group
    try:
        return _train(settings, world, device, template, base_dir, tokenizer, train_examples, val_examples,
                      data_stats, base_shapes, output_dir, started)
    finally:
        distributed.stop(world)


def _train(settings, world, device, template, base_dir, tokenizer, train_examples, val_examples, data_stats,
           base_shapes, output_dir, started) -> TrainResult | None:
    base_dtype = training_dtype(settings.precision, device)
    full = settings.finetune_method == "full"
    if full:
        # AdamW's updates need fp32 weights; under bf16 precision the forward runs in bf16 autocast
        base = load_frozen_base(base_dir, "none", device, torch.float32)
        model = causal_lm = make_fully_trainable(base, settings.gradient_checkpointing)
        fast = FastPaths(functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                           enabled=base_dtype == torch.bfloat16), {})
        share_prefix = False
        initial = adapter.fingerprint(model)
    else:
        base = load_frozen_base(base_dir, settings.quantization, device, base_dtype)
        model = attach_lora(base, settings.lora_rank, settings.lora_alpha, settings.lora_dropout,
                            settings.lora_target_modules, settings.seed,
                            quantized=settings.quantization != "none",
                            gradient_checkpointing=settings.gradient_checkpointing)
        fast = switch_on_fast_paths(model, device, base_dtype, quantized=settings.quantization != "none",
                                    compile_layers=settings.torch_compile)
        causal_lm = model.get_base_model()  # LoRA layers live inside it; loss.py calls its parts
        share_prefix = (shared_prefix_usable(causal_lm, settings.packing, settings.gradient_checkpointing)
                        and wanted("shared_preamble"))
        fast.switched_on["shared_preamble"] = share_prefix
        if share_prefix:
            log.info("a preamble shared by a step's rows (the prompt template's) is computed once per step")
        initial = adapter.snapshot_lora(model)
    # the world's step: gradient_accumulation_steps micro-batches on each rank
    per_step = settings.gradient_accumulation_steps * world.size
    resume = None
    if settings.resume_from_checkpoint:  # weights first, while every rank holds its whole model
        resume = open_checkpoint(Path(settings.resume_from_checkpoint), per_step)
        load_weights(resume, model, base_shapes)
    if settings.sharding == "fsdp" and world.distributed:
        share_prefix = fast.switched_on["shared_preamble"] = False  # its preamble pass is not FSDP's
        log.info("FSDP2: %d decoder layers sharded over %d processes", distributed.shard_layers(causal_lm),
                 world.size)
        world = dataclasses.replace(world, sharded=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if full:
        log.info("full fine-tuning: %s trainable parameters (fp32 weights%s)", f"{trainable:,}",
                 ", bf16 autocast" if base_dtype == torch.bfloat16 else "")
    else:
        log.info("LoRA: %s trainable parameters (r=%d, alpha=%d, targets=%s)", f"{trainable:,}",
                 settings.lora_rank, settings.lora_alpha, settings.lora_target_modules)
    ran = {"device": str(device), "base_dtype": str(base_dtype).removeprefix("torch."),
           "finetune_method": settings.finetune_method, "processes": world.size, "sharding": settings.sharding,
           "attention": causal_lm.config._attn_implementation, "fast_paths": fast.switched_on,
           "machine": machine.describe()}
    if settings.precision == "auto" and device.type == "cpu":
        ran["precision_probe"] = cpu_auto_dtype()[1]  # the timings auto chose by

    plan = StepPlan([len(e) for e in train_examples], settings.train_batch_size, per_step, settings.seed,
                    settings.group_by_length)
    total_steps = plan.total_steps(settings.num_train_epochs, settings.max_steps)
    optimizer, scheduler = make_optimizer(model, settings, total_steps)
    history: list[dict] = []
    evals: list[dict] = []
    start_step = 0
    if resume:
        load_training_state(resume, model, optimizer, scheduler, world)
        start_step, history, evals = resume.step, resume.metrics["history"], resume.metrics["evals"]
        log.info("resumed from %s at step %d", settings.resume_from_checkpoint, start_step)

    pad_id = tokenizer.pad_token_id
    meter = ProgressLog(total_steps, start_step, settings.logging_steps)
    log.info("training: %d steps (%d per epoch), micro-batch %d x %d accumulation x %d process(es) = %d "
             "examples per step, %s on %s", total_steps, plan.steps_per_epoch, settings.train_batch_size,
             settings.gradient_accumulation_steps, world.size, settings.train_batch_size * per_step,
             "packed" if settings.packing else "padded", device)
    # output_dir is first written from here on, by rank 0 alone
    with removed_on_failure(output_dir) if world.is_main else contextlib.nullcontext():
        model.train()
        for step in range(start_step, total_steps):
            step_batches = plan.step(step)
            mine = world.share(step_batches, settings.gradient_accumulation_steps)
            batches = [make_batch([train_examples[i] for i in indices], settings.packing, pad_id) for indices in mine]
            idle = []
            if world.sharded:  # as many forwards as rank 0, whose share is the fullest
                first = make_batch([train_examples[i] for i in step_batches[0]], settings.packing, pad_id)
                idle = [first] * (min(settings.gradient_accumulation_steps, len(step_batches)) - len(mine))
            loss, lr, tokens, slots = optimizer_step(model, causal_lm, batches, optimizer, scheduler,
                                                     settings.max_grad_norm, device, fast.compute, share_prefix,
                                                     world, idle)
            done = step + 1
            meter.step_done(done, loss, lr, tokens, history)
            history[-1]["padded_tokens"] = slots
            if val_examples and settings.eval_steps and done % settings.eval_steps == 0 and done < total_steps:
                evals.append({"step": done, "eval_loss": evaluate(causal_lm, val_examples,
                              settings.train_batch_size, settings.packing, pad_id, device, fast.compute, world)})
                log.info("step %d/%d  eval loss %.4f", done, total_steps, evals[-1]["eval_loss"])
            if settings.save_steps and done % settings.save_steps == 0 and done < total_steps:
                rng_states = world.gather(torch.get_rng_state())  # each rank's dropout continues its own
                gathered = distributed.full_state_dicts(model, optimizer) if world.sharded else None
                if world.is_main:
                    save_checkpoint(checkpoint_dir(output_dir, done), model, optimizer, scheduler, done,
                                    {"history": history, "evals": evals}, rng_states, per_step, gathered)
                    log.info("checkpoint saved: %s", checkpoint_dir(output_dir, done))
                world.barrier()  # no rank runs ahead of a checkpoint that is not there yet

        if val_examples:
            evals.append({"step": total_steps, "eval_loss": evaluate(
                causal_lm, val_examples, settings.train_batch_size, settings.packing, pad_id, device, fast.compute,
                world)})
            log.info("final eval loss %.4f", evals[-1]["eval_loss"])
        state = distributed.full_state_dict(model) if world.sharded else None  # every rank takes part
        if not world.is_main:
            return None
        return write_outputs(settings, output_dir, model, initial, template, causal_lm, ran, history, evals,
                             data_stats, meter, started, start_step, tokenizer, state)
