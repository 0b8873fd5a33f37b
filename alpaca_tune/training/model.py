"""The model a training run trains: the frozen base (dtype, device, 8/4-bit) with fresh LoRA weights,
or (full fine-tuning) every weight of the base."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..base_model import load_causal_lm
from ..errors import UserError

log = logging.getLogger(__name__)


class ModelError(UserError):
    """The base model cannot be loaded or adapted as asked; the message says why and what to do."""


def quantization_config(quantization: str, compute_dtype: torch.dtype, device: torch.device):
    """bitsandbytes' settings for an 8-bit or 4-bit (QLoRA, NF4) frozen base; None for none."""
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ModelError(f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes' 8-bit and "
                         f"4-bit kernels); on this machine use quantization=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"quantization={quantization!r} needs bitsandbytes: pip install "
                         f"bitsandbytes==0.50.2 (the Cog image has it)")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":  # QLoRA: NF4 weights, double-quantized scales, compute in bf16/fp16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    raise ModelError(f"quantization={quantization!r}: must be none, 8bit or 4bit")


def load_frozen_base(base_dir: Path, quantization: str, device: torch.device, dtype: torch.dtype):
    """The base model to train LoRA on, maybe 8/4-bit; its KV cache off (training passes none)."""
    quant_config = quantization_config(quantization, dtype, device)
    log.info("loading base model from %s (%s, %s%s)", base_dir, device, dtype,
             "" if quant_config is None else f", {quantization}")
    model = load_causal_lm(base_dir, device, dtype, quant_config)
    model.config.use_cache = False
    return model


def parse_target_modules(text: str) -> list[str] | str:
    text = text.strip()
    if text == "all-linear":
        return "all-linear"
    modules = [name.strip() for name in text.split(",") if name.strip()]
    if not modules:
        raise ModelError("lora_target_modules is empty: name modules (e.g. q_proj,v_proj) or all-linear")
    return modules


def attach_lora(model, rank: int, alpha: int, dropout: float, target_modules: str, seed: int,
                quantized: bool = False, gradient_checkpointing: bool = False):
    """Freeze the base and add fresh LoRA weights; LoRA init is seeded so runs are reproducible."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        task_type="CAUSAL_LM", target_modules=parse_target_modules(target_modules))
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise ModelError(f"lora_target_modules={target_modules!r}: {err}. Linear modules of this "
                         f"model: {', '.join(names)} (or all-linear)") from None


def make_fully_trainable(model, gradient_checkpointing: bool = False):
    """Full fine-tuning: every weight of the base is trained (in fp32, as loaded for it)."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
