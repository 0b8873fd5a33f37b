"""The training output: a verified PEFT adapter, packed with what is needed to use and judge it.

The archive's layout is adapter_files.py's. Saving checks the adapter is real (alpaca-lora's
state_dict monkeypatch once wrote 443-byte adapters with no weights in them).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch

from ..adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_SUBDIR,
    ADAPTER_WEIGHTS,
    ARCHIVE_NAME,
    CONFIG_FILE,
    EXPORT_SUBDIR,
    METRICS_FILE,
    MODEL_SUBDIR,
    PLOT_FILE,
)
from ..errors import UserError


class ArtifactError(UserError):
    """An adapter or archive is unusable; the message names the file and the problem."""


def expected_lora_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every LoRA tensor, enumerated from the modules (independently of PEFT's
    own state-dict helper, which is what the check guards)."""
    shapes = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not lora_a:
            continue
        for adapter_name in lora_a:
            prefix = name if adapter_name == "default" else f"{name}.{adapter_name}"
            shapes[f"{prefix}.lora_A.weight"] = tuple(lora_a[adapter_name].weight.shape)
            shapes[f"{prefix}.lora_B.weight"] = tuple(module.lora_B[adapter_name].weight.shape)
    return shapes


def snapshot_lora(peft_model) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, to prove later that training changed them."""
    return {n: p.detach().clone().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}


def verify_adapter_dir(adapter_dir: Path, expected: dict[str, tuple[int, ...]],
                       initial: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file

    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not weights_file.is_file():
        raise ArtifactError(f"{adapter_dir}: {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} missing")
    saved = load_file(str(weights_file))
    want = {_saved_key(key): shape for key, shape in expected.items()}
    missing = sorted(set(want) - set(saved))
    if not saved or missing:
        raise ArtifactError(f"{weights_file}: {len(saved)} tensors saved, {len(missing)} LoRA tensors "
                            f"missing (e.g. {missing[:2]}); refusing to write an empty adapter")
    for key, shape in want.items():
        if tuple(saved[key].shape) != shape:
            raise ArtifactError(f"{weights_file}: {key} has shape {tuple(saved[key].shape)}, "
                                f"expected {shape}")
    if initial is not None:
        before = {_saved_key(key): value for key, value in initial.items()}
        lora_b = [k for k in want if k.endswith("lora_B.weight")]
        unchanged = [k for k in lora_b if k in before and torch.equal(saved[k].float(), before[k].float())]
        if len(unchanged) == len(lora_b):
            raise ArtifactError(f"{weights_file}: no LoRA weight moved from its initial value; "
                                f"training did not update the adapter")


def _saved_key(name: str) -> str:
    """PEFT saves keys without the adapter name: "...q_proj.lora_A.default.weight" -> "...lora_A.weight"."""
    return name.replace(".default.", ".")


def save_adapter(peft_model, adapter_dir: Path, initial: dict[str, torch.Tensor] | None = None,
                 state_dict: dict | None = None) -> Path:
    """Write the PEFT adapter directory and check its contents before anyone relies on it.
    state_dict: the model's whole state, when its own parameters are FSDP shards."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, state_dict=state_dict)
    verify_adapter_dir(adapter_dir, expected_lora_shapes(peft_model), initial)
    return adapter_dir


def fingerprint(model, state_dict: dict | None = None) -> dict[str, float]:
    """Full fine-tuning: each weight's sum, to prove later that training changed the model
    without keeping a second copy of it (state_dict: the model's, gathered when it is sharded)."""
    if state_dict is not None:
        names = [name for name, _ in model.named_parameters()]
        return {n: float(state_dict[n].double().sum()) for n in names if n in state_dict}
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def save_full_model(causal_lm, tokenizer, model_dir: Path, initial: dict[str, float],
                    state_dict: dict | None = None) -> Path:
    """Full fine-tuning's output: the whole model (safetensors, config, generation config) and the
    tokenizer, loadable with from_pretrained and servable as a base; refused if no weight moved.
    state_dict: the model's whole state, when its own parameters are FSDP shards."""
    after = fingerprint(causal_lm, state_dict)
    if after == initial:
        raise ArtifactError(f"{model_dir}: no weight moved from the base's; training did not update the model")
    model_dir.mkdir(parents=True, exist_ok=True)
    causal_lm.config.use_cache = True  # as a served model wants it
    causal_lm.save_pretrained(str(model_dir), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(model_dir))
    return model_dir


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pack(output_dir: Path) -> Path:
    """adapter.tar.gz in output_dir with the adapter (or the fully fine-tuned model) and the run's
    config, metrics and plot."""
    archive = output_dir / ARCHIVE_NAME
    partial = output_dir / (ARCHIVE_NAME + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for name in (ADAPTER_SUBDIR, MODEL_SUBDIR, CONFIG_FILE, METRICS_FILE, PLOT_FILE, EXPORT_SUBDIR):
            if (output_dir / name).exists():
                tar.add(output_dir / name, arcname=name)
    partial.rename(archive)
    return archive
