"""Merging a saved LoRA adapter (PEFT's file format) straight into a base state dict.

W' = W + scaling * B @ A for every adapted Linear, which is what PEFT's merge computes, without
importing PEFT (~2.7 s of the server's start-up). Adapters with features this does not implement
(DoRA, extra trained modules, biases, per-module ranks) are reported, so the caller can serve them
through PEFT instead. The adapter has been checked against the base (adapter_check.py) before. tests/serving/lean/test_llama.py checks the result against PEFT's unmerged model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...adapter_check import PEFT_PREFIX, AdapterError, read_adapter_config, scaling_of
from ...adapter_files import ADAPTER_WEIGHTS


def unmergeable_reason(config: dict) -> str | None:
    """Why this module cannot merge the adapter (None: it can)."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')}"
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            return flag
    if config.get("modules_to_save"):
        return "modules_to_save"
    if config.get("bias", "none") != "none":
        return f"bias {config.get('bias')}"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "per-module ranks"
    return None


def lora_pairs(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module (HF name) -> (A [r, in], scaling * B [out, r]), both fp32: the adapter's update of
    that module is their product. For an adapter unmergeable_reason accepts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)  # checked: a positive integer r and a lora_alpha
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"{path}: cannot read the adapter weights: {err}") from None
    pairs = {}
    for key in sorted(tensors):
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight") or not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{path}: unexpected tensor {key} (only LoRA A/B pairs on Linear layers are served)")
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise AdapterError(f"{path}: {module} has no lora_B")
        pairs[module] = (tensors[key].float(), scaling_of(module, config) * up.float())
    if not pairs:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return pairs


def merge_lora(state: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Add the adapter's products into `state` (HF parameter names); each merged weight becomes
    fp32, whatever the base's dtype. Returns the pairs merged (lora_pairs)."""
    pairs = lora_pairs(adapter_dir)
    for module, (down, up) in pairs.items():
        target = state.get(module + ".weight")
        if target is None or target.shape != (up.shape[0], down.shape[1]):
            raise AdapterError(f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: {module} does not fit the base model "
                               f"(wrong base for this adapter?)")
        # in fp32: rounding W + scaling * B @ A back to a bf16 base would lose most of the adapter
        state[module + ".weight"] = target.float() + up @ down
    return pairs
