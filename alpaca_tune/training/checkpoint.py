"""Resumable checkpoints: adapter, optimizer, scheduler, RNG and step, all in safetensors + JSON.

    checkpoints/step-000050/
        adapter/                   the PEFT adapter at that step (model/: the whole model, full fine-tuning)
        optimizer.safetensors      AdamW moments, flattened as state.<param index>.<name>
        trainer_state.json         step, scheduler state, optimizer param groups, metrics so far
        rng.safetensors            torch (and CUDA) generator states, so dropout continues the same
                                   (one per rank: torch.rank<R>, when several processes trained)
A resumed run recomputes the data order from (seed, epoch) and skips what was consumed, so it
ends with the same adapter as a run that was never interrupted.

Under sharding=fsdp the weights and optimizer state are gathered onto rank 0 (its CPU memory) and
written in this same layout, so a checkpoint resumes with or without sharding, on any number of
processes whose accumulation gives the same micro-batches per step. Resuming reads the weights into
the model before its layers are sharded and the optimizer state after the optimizer exists (each
rank then keeps its own shard of the moments).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter_check import AdapterError, check_adapter
from ..adapter_files import ADAPTER_SUBDIR, ADAPTER_WEIGHTS, MODEL_SUBDIR
from ..errors import UserError

STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(path: Path, peft_model, optimizer, scheduler, step: int, metrics: dict,
                    rng_states: list[torch.Tensor] | None = None, micro_batches_per_step: int | None = None,
                    gathered: tuple[dict, dict] | None = None) -> None:
    """rng_states: every rank's generator state (the LoRA weights and optimizer state are the same
    on every rank); micro_batches_per_step: what one step took over all ranks, which a resume must
    keep for the same data order; gathered: (model state, optimizer state) gathered from the ranks
    when the layers are sharded (distributed.full_state_dicts)."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    subdir = ADAPTER_SUBDIR if is_peft(peft_model) else MODEL_SUBDIR
    model_state, opt_state = gathered if gathered else (None, optimizer.state_dict())
    peft_model.save_pretrained(str(partial / subdir), safe_serialization=True, state_dict=model_state)
    if gathered:
        opt_state = _indexed(opt_state)
    tensors = {f"state.{index}.{name}": value.contiguous()
               for index, slots in opt_state["state"].items() for name, value in slots.items()}
    save_file(tensors, str(partial / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if rng_states and len(rng_states) > 1:
        rng.update({f"torch.rank{rank}": state for rank, state in enumerate(rng_states)})
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(partial / "rng.safetensors"))
    state = {"step": step, "scheduler": scheduler.state_dict(),
             "param_groups": opt_state["param_groups"], "metrics": metrics,
             "world_size": len(rng_states or [None]), "micro_batches_per_step": micro_batches_per_step}
    (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)  # a checkpoint dir either is complete or does not exist


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: dict  # trainer_state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def metrics(self) -> dict:
        return self.state["metrics"]


def open_checkpoint(path: Path, micro_batches_per_step: int | None = None) -> Checkpoint:
    """The checkpoint's trainer state, read and checked: a directory that is not a checkpoint, or
    one made with another number of micro-batches per step (accumulation x processes), is a
    CheckpointError saying what to do. A checkpoint written by N processes resumes on M."""
    where = f"resume_from_checkpoint={str(path)!r}"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{where}: no {STATE_FILE} there; expected a directory like "
                              f"OUTPUT/checkpoints/step-000050")
    try:
        state = json.loads(state_file.read_text())
        int(state["step"]), state["metrics"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_file}: not a readable trainer state ({err})") from None
    saved_per_step = state.get("micro_batches_per_step")
    if micro_batches_per_step and saved_per_step and saved_per_step != micro_batches_per_step:
        size = state.get("world_size", 1)
        raise CheckpointError(
            f"{where}: made with {saved_per_step} micro-batches per step ({size} process(es) x "
            f"{saved_per_step // max(size, 1)} accumulation); this run takes {micro_batches_per_step}. Resume with "
            f"gradient_accumulation_steps x processes = {saved_per_step} (e.g. --gradient_accumulation_steps "
            f"{saved_per_step} on one process) to keep the data order")
    return Checkpoint(path, state)


def load_weights(checkpoint: Checkpoint, peft_model, base_shapes: dict) -> None:
    """The adapter (or, full fine-tuning, the whole model) at that step, into the model before its
    layers are sharded. One made for another base (`base_shapes`: the base's parameter shapes) or
    with other LoRA settings is a CheckpointError naming the file."""
    if not is_peft(peft_model):
        _load_full_model(checkpoint.path, peft_model)
    else:
        _load_adapter(checkpoint.path, f"resume_from_checkpoint={str(checkpoint.path)!r}", peft_model, base_shapes)


def load_training_state(checkpoint: Checkpoint, model, optimizer, scheduler, world=None) -> None:
    """Optimizer moments, schedule and this rank's generator, into a run whose optimizer exists
    (its parameters sharded or not: world.sharded)."""
    _load_optimizer(checkpoint.path, checkpoint.state, model, optimizer, scheduler, world)
    _load_rng(checkpoint.path, checkpoint.state, world)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _load_full_model(path: Path, model) -> None:
    """Full fine-tuning's checkpoint: the model's own safetensors (a tied head is not stored)."""
    from safetensors import SafetensorError

    state = {}
    files = sorted((path / MODEL_SUBDIR).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path / MODEL_SUBDIR}: no model weights; a full fine-tuning checkpoint holds "
                              f"model/model.safetensors (a LoRA checkpoint cannot resume finetune_method=full)")
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{file}: cannot read the checkpoint's tensors ({err})") from None
    expected = dict(model.named_parameters())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state) - tied)
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"{path / MODEL_SUBDIR}: does not fit this base ({len(missing)} weights missing, "
                              f"{len(wrong)} of another shape, e.g. {(missing + wrong)[:2]})")
    model.load_state_dict(state, strict=False)


def _load_adapter(path: Path, where: str, peft_model, base_shapes: dict) -> None:
    from peft import set_peft_model_state_dict

    adapter = _read_tensors(path / ADAPTER_SUBDIR / ADAPTER_WEIGHTS)
    try:
        check_adapter(path / ADAPTER_SUBDIR, base_shapes, f"{where}: {ADAPTER_SUBDIR}")
    except AdapterError as err:
        raise CheckpointError(str(err)) from None
    expected = {name.replace(".default.", "."): tuple(value.shape)
                for name, value in peft_model.state_dict().items() if "lora_" in name}
    for name, value in adapter.items():
        if name in expected and tuple(value.shape) != expected[name]:
            raise CheckpointError(f"{path / ADAPTER_SUBDIR / ADAPTER_WEIGHTS}: {name} has shape "
                                  f"{tuple(value.shape)}, this run's LoRA has {expected[name]}: resume with the "
                                  f"lora_rank and lora_target_modules the checkpoint was made with")
    result = set_peft_model_state_dict(peft_model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{path}: adapter does not fit this model/LoRA settings "
                              f"(unexpected {result.unexpected_keys[:2]}); resume with the checkpoint's "
                              f"lora_target_modules")


def _load_optimizer(path: Path, state: dict, model, optimizer, scheduler, world) -> None:
    flat = _read_tensors(path / "optimizer.safetensors")
    slots: dict[int, dict] = {}
    for key, value in flat.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: unexpected tensor {key!r} (expected "
                                  f"state.<index>.<name>)")
        slots.setdefault(int(parts[1]), {})[parts[2]] = value
    try:
        if getattr(world, "sharded", False):
            _load_sharded_optimizer(model, optimizer, slots, state["param_groups"])
        else:
            optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{path}: optimizer state does not fit this run: {err}") from None


def _indexed(full: dict) -> dict:
    """A gathered optimizer state (keyed by parameter name, torch.distributed.checkpoint's form) in
    torch.optim's own form (keyed by the parameter's index in the optimizer), as checkpoints keep it."""
    names = [name for group in full["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups, start = [], 0
    for group in full["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {index[name]: slots for name, slots in full["state"].items()}, "param_groups": groups}


def _load_sharded_optimizer(model, optimizer, slots: dict[int, dict], param_groups: list[dict]) -> None:
    """The inverse of _indexed, handed to set_optimizer_state_dict: every rank reads the whole state
    and keeps its own shard of each moment."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = sum(len(group["params"]) for group in param_groups)
    if saved != len(names) or len(param_groups) != len(optimizer.param_groups):
        raise ValueError(f"{saved} parameters saved, this run trains {len(names)}")
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in param_groups]
    full = {"state": {names[i]: value for i, value in slots.items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _load_rng(path: Path, state: dict, world) -> None:
    rng = _read_tensors(path / "rng.safetensors")
    if "torch" not in rng:
        raise CheckpointError(f"{path / 'rng.safetensors'}: holds no torch generator state")
    rank = getattr(world, "rank", 0)
    same_world = state.get("world_size", 1) == getattr(world, "size", 1)
    try:
        torch.set_rng_state(rng[f"torch.rank{rank}"] if same_world and f"torch.rank{rank}" in rng else rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path / 'rng.safetensors'}: not a generator state ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({err}); the checkpoint is "
                              f"incomplete or damaged") from None
