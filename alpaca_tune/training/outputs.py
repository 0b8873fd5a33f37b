"""What a finished run writes: the verified adapter, training_config.json, metrics.json, the
loss plot, and the archive holding them (adapter_files.py names them)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_files import (
    ADAPTER_SUBDIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_SUBDIR,
    PLOT_FILE,
)
from . import adapter
from .progress import plot_loss

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    archive: Path
    adapter_dir: Path
    metrics: dict


@contextlib.contextmanager
def removed_on_failure(output_dir: Path):
    """Create output_dir; if the body fails, remove what it added there and the folders made for
    it, so a failed run leaves nothing behind. Checkpoints it wrote stay: they are what a rerun
    resumes from."""
    made = [p for p in (output_dir, *output_dir.parents) if not p.exists()]  # innermost first
    before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for entry in set(output_dir.iterdir()) - before:
            if entry.name == "checkpoints" and any(entry.iterdir()):
                log.warning("the run failed; its checkpoints stay in %s for resume_from_checkpoint", entry)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: checkpoints, or someone else's files
                directory.rmdir()
        raise


def write_outputs(settings, output_dir, model, initial, template, causal_lm, ran: dict, history, evals,
                  data_stats, meter, started, start_step, tokenizer=None, state_dict=None) -> TrainResult:
    """`ran`: what actually ran (device, dtype, attention, each fast path), for training_config.json;
    state_dict: the whole model's, gathered from the ranks when its layers are sharded (FSDP)."""
    import peft
    import transformers

    full = settings.finetune_method == "full"
    adapter_dir = output_dir / (MODEL_SUBDIR if full else ADAPTER_SUBDIR)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    # A resumed run may legitimately start from a trained adapter, so only a fresh run demands
    # that the weights moved from their initial values.
    if full:
        adapter.save_full_model(causal_lm, tokenizer, adapter_dir, initial if start_step == 0 else {}, state_dict)
    else:
        adapter.save_adapter(model, adapter_dir, initial if start_step == 0 else None, state_dict)
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
              "ran": ran,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}}
    adapter.write_json(output_dir / CONFIG_FILE, config)
    adapter.write_json(output_dir / METRICS_FILE, metrics)
    plot_loss(history, evals, output_dir / PLOT_FILE,
              f"{'full fine-tuning' if full else f'LoRA r={settings.lora_rank}'} on {Path(settings.train_data).name}")
    archive = adapter.pack(output_dir)
    log.info("wrote %s (%.1f MB) in %.0f s", archive, archive.stat().st_size / 1e6, wall)
    return TrainResult(output_dir, archive, adapter_dir, metrics)
