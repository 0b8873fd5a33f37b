"""Adapters made with PEFT itself on the tiny Llama (random, non-zero B), and llama.cpp runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from alpaca_tune.data.prompts import load_template

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["Tell me about alpacas. 12345 + 678 = ?", "Translate to French: bonjour, merci!\n\n### Response:\n"]


def make_adapter(base_dir: Path, run_dir: Path, seed: int = 0, **lora):
    """A PEFT LoRA adapter of the base in run_dir/adapter (+ training_config.json with the alpaca
    template, as train.py writes it); returns the PEFT model (unmerged) as the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "lora_dropout": 0.0} | lora
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(str(run_dir / "adapter"))
    template = load_template("alpaca").to_json()
    (run_dir / "training_config.json").write_text(json.dumps({"prompt_template": template}))
    return peft_model.eval()


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def greedy_hf(model, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def llama_cpp(path: Path, lora: Path | None = None):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=256,
                 n_threads=1, verbose=False, seed=0)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def greedy_llama_cpp(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def nmse(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(((ours - reference) ** 2).mean() / (reference ** 2).mean())


def load_peft_reference(adapter_dir: Path):
    """PEFT's own model of a saved adapter on its base (unmerged), in fp32."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
