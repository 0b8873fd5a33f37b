"""GPU benchmark: a LLaMA-7B-shaped model with random weights (no download), on one CUDA device.

    python scripts/bench_gpu.py                 # on a GPU machine: all figures for BENCHMARKS.md
    python scripts/bench_gpu.py --tiny          # smoke test of the script itself (CPU is fine)

Reports, each in this one run:
  - LoRA training (r=8, q_proj/v_proj, bf16 base) tokens/s and MFU at seq 512 and 2048, with peak
    memory; the same for 4-bit QLoRA (NF4 base, bitsandbytes);
  - single-stream greedy decode tokens/s against the HBM-bandwidth bound (weight bytes per token
    / measured device bandwidth).
MFU counts the FLOPs LoRA training really does per token: forward 2N plus activation gradients
2N for N decoder parameters (the frozen weights get no gradients, so the usual 6N would overstate
it), plus causal attention; divided by the device's dense bf16 peak (--peak_tflops; 989 for an
H100 SXM). Peak memory at batch 1 is what the QLoRA <= 6 GB target is about.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)


def build_model(shape: dict, quantization: str, device: torch.device):
    """Random-initialised Llama in bf16 (or NF4 via bitsandbytes, quantizing the random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if quantization == "4bit":
        import bitsandbytes as bnb

        # swap every decoder Linear for an NF4 one holding the same (random) weights
        for name, module in list(model.model.layers.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                  compute_dtype=torch.bfloat16, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                         quant_type="nf4").to(device)
                    setattr(module, child_name, quantized)
        torch.cuda.empty_cache()
    return model


def train_step_figures(model, seq: int, batch: int, steps: int, device, peak_tflops: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from alpaca_tune.loss import label_loss

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    causal_lm = peft_model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    batch_data = {"input_ids": torch.randint(3, vocab, (batch, seq), device=device),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    targets = batch_data["input_ids"].roll(-1, dims=1)
    targets[:, : seq // 2] = -100  # half prompt, half response, as instruction data
    batch_data["targets"] = targets
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss_sum, n = label_loss(causal_lm, batch_data)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    config = model.config
    params = sum(p.numel() for p in model.model.layers.parameters())
    # forward 2N + activation gradients 2N per token (LoRA skips the frozen weights' gradients)
    flops_per_token = 4 * params + 12 * config.num_hidden_layers * config.hidden_size * seq // 2
    tokens = batch * seq
    result = {"seq": seq, "batch": batch, "tokens_per_s": round(tokens / seconds),
              "mfu": round(flops_per_token * tokens / seconds / (peak_tflops * 1e12), 3)}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    peft_model.unload()
    return result


def decode_figures(model, new_tokens: int, device) -> dict:
    from alpaca_tune.generation import generate_token_ids
    from alpaca_tune.sampling import SamplingParams

    model.config.use_cache = True
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer = torch.empty(int(2e9) // 2, dtype=torch.bfloat16, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        buffer.sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
    bandwidth = buffer.numel() * 2 * 10 / (time.perf_counter() - started)
    del buffer
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    prompt = list(range(3, 67))
    list(generate_token_ids(model, prompt, SamplingParams(max_new_tokens=4, temperature=0.0), set()))
    started = time.perf_counter()
    count = sum(1 for _ in generate_token_ids(model, prompt, params, set()))
    rate = count / (time.perf_counter() - started)
    bound = bandwidth / weight_bytes
    return {"tokens_per_s": round(rate, 1), "bandwidth_gbs": round(bandwidth / 1e9), "bound_tokens_per_s":
            round(bound, 1), "fraction_of_bound": round(rate / bound, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script anywhere")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAMA_7B
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape}
    for quantization in ("none", "4bit") if device.type == "cuda" else ("none",):
        for seq, batch in ((512, 1), (512, 8), (2048, 1), (2048, 4)):
            model = build_model(shape, quantization, device)
            figures = train_step_figures(model, seq, batch, args.steps, device, args.peak_tflops)
            results[f"train_{quantization}_seq{seq}_batch{batch}"] = figures
            print(quantization, figures, flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model = build_model(shape, "none", device).eval()
    with torch.inference_mode():
        results["decode_bf16"] = decode_figures(model, 128, device)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
