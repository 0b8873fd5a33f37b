"""The LoRA training run: data -> adapter archive with config, metrics and loss plot.

A plain loop rather than HF Trainer, because the speed-ups that matter here (packing with exact
example isolation, LM head only at labelled positions) and exact resume are simplest to get
right when the loop is ours. Order of work: everything that can reject the input (settings,
template, data) happens before the model is loaded, so bad input fails in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts
from .base_model import resolve_base_dir
from .batching import make_batch, micro_batches
from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from .data import DataError, load_records, split_records
from .fast_paths import switch_on_fast_paths
from .loss import label_loss
from .model import attach_lora, load_model, load_tokenizer, pick_device, training_dtype
from .progress import ProgressLog, plot_loss
from .prompts import load_template
from .settings import TrainSettings, validate
from .shared_prefix import plan_shared_prefix, shared_prefix_usable
from .tokenization import IGNORE_INDEX, Example, tokenize_records

log = logging.getLogger("alpaca_tune.train")


@dataclass
class StepPlan:
    """Which micro-batches make up each optimizer step; a pure function of the settings."""
    lengths: list[int]
    batch_size: int
    accumulation: int
    seed: int
    group_by_length: bool

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.accumulation)

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def step(self, index: int) -> list[list[int]]:
        epoch, within = divmod(index, self.steps_per_epoch)
        batches = micro_batches(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
        return batches[within * self.accumulation:(within + 1) * self.accumulation]


@dataclass
class TrainResult:
    output_dir: Path
    archive: Path
    adapter_dir: Path
    metrics: dict


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(causal_lm, examples: list[Example], batch_size: int, packing: bool, pad_id: int,
             device: torch.device, compute=contextlib.nullcontext) -> float:
    """Mean loss per target token over the validation examples."""
    if not examples:
        return float("nan")
    was_training = causal_lm.training
    causal_lm.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = make_batch([examples[i] for i in order[start:start + batch_size]], packing, pad_id)
        with compute():
            loss_sum, n = label_loss(causal_lm, _to(batch, device))
        total, count = total + loss_sum.item(), count + n
    causal_lm.train(was_training)
    return total / max(count, 1)


def make_optimizer(peft_model, settings: TrainSettings, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # Warmup starts at lr 0; a run that is all warmup would end before reaching the set rate (a
    # 1-step run would not learn at all), so warmup stops one step before the end at the latest.
    scheduler = get_scheduler(settings.lr_scheduler, optimizer,
                              num_warmup_steps=min(settings.warmup_steps, total_steps - 1),
                              num_training_steps=total_steps)
    return optimizer, scheduler


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


def optimizer_step(model, causal_lm, batches: list[dict[str, torch.Tensor]], optimizer, scheduler,
                   max_grad_norm: float, device: torch.device,
                   compute=contextlib.nullcontext,
                   share_prefix: bool = False) -> tuple[float, float, int, int]:
    """One optimizer step over its micro-batches: (mean loss per target token, the lr used,
    real tokens, computed tokens including padding)."""
    loss, tokens, slots = accumulate_gradients(causal_lm, batches, device, compute, share_prefix)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, lr, tokens, slots


def accumulate_gradients(causal_lm, batches: list[dict[str, torch.Tensor]], device: torch.device,
                         compute=contextlib.nullcontext,
                         share_prefix: bool = False) -> tuple[float, int, int]:
    """The gradients of one step's mean loss per target token, added to the parameters' .grad:
    (that loss, real tokens, computed tokens including padding). With share_prefix, a preamble that
    the step's rows share is computed once (shared_prefix.py)."""
    step_targets = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    prefix = plan_shared_prefix(batches) if share_prefix else None
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


def run_training(settings: TrainSettings) -> TrainResult:
    validate(settings)
    template = load_template(settings.prompt_template)
    records = load_records(settings.train_data)
    started = time.perf_counter()
    # Everything that can reject the data (its records, the split, cutoff_len) runs on the
    # tokenizer alone, before the model is loaded or anything is written.
    base_dir = resolve_base_dir(settings.base_model)
    tokenizer = load_tokenizer(base_dir)
    train_examples, val_examples, data_stats = prepare_examples(records, settings, tokenizer, template)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    device = pick_device()
    base_dtype = training_dtype(settings.precision, device)
    base = load_model(base_dir, settings.quantization, device, base_dtype)
    model = attach_lora(base, settings.lora_rank, settings.lora_alpha, settings.lora_dropout,
                        settings.lora_target_modules, settings.seed,
                        quantized=settings.quantization != "none",
                        gradient_checkpointing=settings.gradient_checkpointing)
    compute = switch_on_fast_paths(model, device, base_dtype, quantized=settings.quantization != "none",
                                   compile_layers=settings.torch_compile)
    causal_lm = model.get_base_model()  # LoRA layers live inside it; loss.py calls its parts
    initial = artifacts.snapshot_lora(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %s trainable parameters (r=%d, alpha=%d, targets=%s)", f"{trainable:,}",
             settings.lora_rank, settings.lora_alpha, settings.lora_target_modules)

    plan = StepPlan([len(e) for e in train_examples], settings.train_batch_size,
                    settings.gradient_accumulation_steps, settings.seed, settings.group_by_length)
    total_steps = plan.total_steps(settings.num_train_epochs, settings.max_steps)
    optimizer, scheduler = make_optimizer(model, settings, total_steps)
    history: list[dict] = []
    evals: list[dict] = []
    start_step = 0
    if settings.resume_from_checkpoint:
        start_step, saved = load_checkpoint(Path(settings.resume_from_checkpoint), model, optimizer,
                                            scheduler)
        history, evals = saved["history"], saved["evals"]
        log.info("resumed from %s at step %d", settings.resume_from_checkpoint, start_step)

    pad_id = tokenizer.pad_token_id
    share_prefix = shared_prefix_usable(causal_lm, settings.packing, settings.gradient_checkpointing)
    if share_prefix:
        log.info("a preamble shared by a step's rows (the prompt template's) is computed once per step")
    meter = ProgressLog(total_steps, start_step, settings.logging_steps)
    log.info("training: %d steps (%d per epoch), micro-batch %d x %d accumulation, %s on %s",
             total_steps, plan.steps_per_epoch, settings.train_batch_size,
             settings.gradient_accumulation_steps, "packed" if settings.packing else "padded", device)
    model.train()
    for step in range(start_step, total_steps):
        batches = [make_batch([train_examples[i] for i in indices], settings.packing, pad_id)
                   for indices in plan.step(step)]
        loss, lr, tokens, slots = optimizer_step(model, causal_lm, batches, optimizer, scheduler,
                                                 settings.max_grad_norm, device, compute, share_prefix)
        done = step + 1
        meter.step_done(done, loss, lr, tokens, history)
        history[-1]["padded_tokens"] = slots
        if val_examples and settings.eval_steps and done % settings.eval_steps == 0 and done < total_steps:
            evals.append({"step": done, "eval_loss": evaluate(causal_lm, val_examples,
                          settings.train_batch_size, settings.packing, pad_id, device, compute)})
            log.info("step %d/%d  eval loss %.4f", done, total_steps, evals[-1]["eval_loss"])
        if settings.save_steps and done % settings.save_steps == 0 and done < total_steps:
            save_checkpoint(checkpoint_dir(output_dir, done), model, optimizer, scheduler, done,
                            {"history": history, "evals": evals})
            log.info("checkpoint saved: %s", checkpoint_dir(output_dir, done))

    if val_examples:
        evals.append({"step": total_steps, "eval_loss": evaluate(
            causal_lm, val_examples, settings.train_batch_size, settings.packing, pad_id, device, compute)})
        log.info("final eval loss %.4f", evals[-1]["eval_loss"])
    return _write_outputs(settings, output_dir, model, initial, template, causal_lm, history, evals,
                          data_stats, meter, started, start_step)


def _write_outputs(settings, output_dir, model, initial, template, causal_lm, history, evals,
                   data_stats, meter, started, start_step) -> TrainResult:
    import peft
    import transformers

    adapter_dir = output_dir / artifacts.ADAPTER_SUBDIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    # A resumed run may legitimately start from a trained adapter, so only a fresh run demands
    # that the weights moved from their initial values.
    artifacts.save_adapter(model, adapter_dir, initial if start_step == 0 else None)
    wall = time.perf_counter() - started
    metrics = {"history": history, "evals": evals,
               "final_train_loss": history[-1]["loss"] if history else None,
               "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
               "tokens_per_s": round(meter.tokens_per_s, 1), "wall_time_s": round(wall, 2),
               "padding_fraction": round(1 - sum(h["tokens"] for h in history) /
                                         max(sum(h.get("padded_tokens", 0) for h in history), 1), 4),
               "steps": len(history), **data_stats}
    config = {"settings": dataclasses.asdict(settings), "prompt_template": template.to_json(),
              "base_model": {"path": str(causal_lm.name_or_path),
                             "architecture": causal_lm.config.architectures,
                             "vocab_size": causal_lm.config.vocab_size},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}}
    artifacts.write_json(output_dir / artifacts.CONFIG_FILE, config)
    artifacts.write_json(output_dir / artifacts.METRICS_FILE, metrics)
    plot_loss(history, evals, output_dir / artifacts.PLOT_FILE,
              f"LoRA r={settings.lora_rank} on {Path(settings.train_data).name}")
    archive = artifacts.pack(output_dir)
    log.info("wrote %s (%.1f MB) in %.0f s", archive, archive.stat().st_size / 1e6, wall)
    return TrainResult(output_dir, archive, adapter_dir, metrics)
