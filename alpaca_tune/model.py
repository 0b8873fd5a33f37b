"""Load the base model (dtype, device, 8/4-bit) and attach, load or merge LoRA adapters."""

from __future__ import annotations

from .errors import UserError

import logging
from pathlib import Path

import torch

from .base_model import resolve_base_dir

log = logging.getLogger(__name__)


class ModelError(UserError):
    """The base model or adapter cannot be loaded as asked; the message says why and what to do."""


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """For inference: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX512-BF16 / AMX CPUs


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype for training; LoRA weights and the loss stay fp32 either way.

    auto = bf16 where the hardware has native bf16 matmuls (recent GPUs, and CPUs with
    AVX512-BF16 or AMX, where it is ~2.5x faster than fp32), else fp32. fp16 is not offered for
    training: without loss scaling its gradients underflow.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        if not bf16_supported(device):
            raise ModelError(f"precision=bf16: this {device.type.upper()} has no native bf16 support; "
                             f"use precision=fp32 (or auto)")
        return torch.bfloat16
    return torch.float32


def _quantization_config(quantization: str, compute_dtype: torch.dtype, device: torch.device):
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ModelError(f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes' 8-bit and "
                         f"4-bit kernels); on this machine use quantization=none")
    import importlib.util

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


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do, EOS is always there
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_model: str | Path = "", quantization: str = "none", device: torch.device | None = None,
              dtype: torch.dtype | None = None):
    """(model, tokenizer) for the base: an explicit directory, weights/, or the embedded default."""
    base_dir = resolve_base_dir(base_model)
    return load_model(base_dir, quantization, device, dtype), load_tokenizer(base_dir)


def load_model(base_dir: Path, quantization: str = "none", device: torch.device | None = None,
               dtype: torch.dtype | None = None):
    """The base model in `base_dir` (a resolved directory), on `device` in `dtype`, maybe 8/4-bit."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    quant_config = _quantization_config(quantization, dtype, device)
    log.info("loading base model from %s (%s, %s%s)", base_dir, device, dtype,
             "" if quant_config is None else f", {quantization}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=dtype, attn_implementation="sdpa", quantization_config=quant_config,
            device_map={"": device} if quant_config is not None else None)
    except (OSError, ValueError) as err:
        raise ModelError(f"{base_dir}: cannot load the base model: {err}") from None
    if quant_config is None:
        model.to(device)
    model.config.use_cache = False  # training default; generation passes its own cache
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


def load_adapter(model, adapter_dir: Path, trainable: bool = False):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{adapter_dir}: not a LoRA adapter for this base model: {err}") from None


def merge_adapter(peft_model):
    """Fold LoRA into the base weights: same outputs, no LoRA overhead per token at generation."""
    return peft_model.merge_and_unload()
