"""GPU benchmark: a LLaMA-7B-shaped model with random weights (no download), on one CUDA device.

    python scripts/bench_gpu.py                 # on a GPU machine: all figures for BENCHMARKS.md
    python scripts/bench_gpu.py --tiny          # smoke test of the script itself (CPU is fine)
    python scripts/bench_gpu.py --only decode   # just the decoding figures (--only train: training)

The random model is saved once as safetensors and loaded the way train.py loads a base
(alpaca_tune.training.model.load_frozen_base: bf16, or NF4 through transformers' bitsandbytes integration), and
each step is the trainer's own (training/steps.py's optimizer_step: label-only head and loss, LoRA products
under bf16 autocast, AdamW on the LoRA weights). Reports, in this one run:
  - LoRA training (r=8, q_proj/v_proj) tokens/s, MFU and peak memory at seq 512 and 2048, for the
    bf16 base eager and with torch_compile's compiled layers, and for the 4-bit QLoRA base (with and
    without gradient checkpointing), and packed rows (four 512-token examples in one 2048 row,
    block-diagonal mask) against plain rows;
  - single-stream greedy decode tokens/s, eager, with CUDA graphs (what the Predictor does on a GPU)
    and with the step compiled before capture, against the HBM-bandwidth bound (weight bytes per
    token / device read bandwidth measured here). Each graph variant's first call, which records
    the graph (and compiles), is reported apart; later requests reuse it.
The 4-bit runs come first, so that nothing of the bf16 model is in their peak memory.
MFU counts the FLOPs LoRA training really does per token: forward 2N plus activation gradients
2N for N decoder parameters (the frozen weights get no gradients, so the usual 6N would overstate
it; gradient checkpointing's recomputation is not counted), plus causal attention; divided by
the device's dense bf16 peak (--peak_tflops; 989 for an H100 SXM). Half of each row is prompt
(no labels), as in instruction data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
# (quantization, gradient checkpointing, seq, rows, examples packed per row, torch.compile)
TRAIN_RUNS = [("none", False, 512, 1, 1, False), ("none", False, 512, 8, 1, False),
              ("none", False, 2048, 1, 1, False), ("none", False, 2048, 4, 1, False),
              ("none", False, 2048, 4, 4, False),
              ("none", False, 512, 8, 1, True), ("none", False, 2048, 4, 1, True),  # after decoding: compiled stays
              ("4bit", False, 512, 1, 1, False), ("4bit", True, 512, 1, 1, False), ("4bit", True, 512, 8, 1, False),
              ("4bit", True, 2048, 1, 1, False), ("4bit", True, 2048, 4, 1, False)]


def save_random_model(shape: dict, directory: Path, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batch(vocab: int, seq: int, rows: int, packed: int, device: torch.device) -> dict:
    """Rows of `packed` examples each; in every example the first half is prompt (no targets)."""
    ids = torch.randint(3, vocab, (rows, seq))
    targets = ids.roll(-1, dims=1)
    length = seq // packed
    position = torch.arange(seq) % length
    targets[:, (position < length // 2) | (position == length - 1)] = -100
    batch = {"input_ids": ids, "targets": targets}
    if packed > 1:
        batch["position_ids"] = position.expand(rows, seq).contiguous()
        batch["segment_ids"] = (torch.arange(seq) // length).expand(rows, seq).contiguous()
    return {k: v.to(device) for k, v in batch.items()}


def decoder_parameters(config) -> int:
    """N of the MFU formula: every decoder weight (what a 4-bit checkpoint packs is counted unpacked)."""
    head_dim = config.hidden_size // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = config.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (per_layer + 2 * config.hidden_size)


def train_figures(base, quantization: str, checkpointing: bool, seq: int, rows: int, packed: int, compiled: bool,
                  steps: int, device: torch.device, peak_tflops: float, profile: bool = False) -> dict:
    """One trainer step timed on `base` with a fresh LoRA adapter, which is removed again after
    (compiled layers stay compiled: those runs come last)."""
    from alpaca_tune.training.fast_paths import switch_on_fast_paths
    from alpaca_tune.training.model import attach_lora
    from alpaca_tune.training.steps import optimizer_step

    model = attach_lora(base, rank=8, alpha=16, dropout=0.05, target_modules="q_proj,v_proj", seed=0,
                        quantized=quantization != "none", gradient_checkpointing=checkpointing)
    compute = switch_on_fast_paths(model, device, base.dtype, quantized=quantization != "none",
                                   compile_layers=compiled).compute  # as train.py's torch_compile does (CUDA only)
    causal_lm = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = make_batch(causal_lm.config.vocab_size, seq, rows, packed, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step = lambda: optimizer_step(model, causal_lm, [batch], optimizer, scheduler, 1.0, device, compute)  # noqa: E731
    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if profile:  # where one step's time goes, by kernel
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    config = causal_lm.config
    example = seq // packed
    # forward 2N + activation gradients 2N; causal attention: QK^T and AV forward, twice that backward
    flops_per_token = 4 * decoder_parameters(config) + 6 * config.num_hidden_layers * config.hidden_size * example
    tokens = rows * seq
    result = {"quantization": quantization, "gradient_checkpointing": checkpointing, "seq": seq, "rows": rows,
              "examples_per_row": packed, "compiled": compiled, "tokens_per_s": round(tokens / seconds),
              "mfu": round(flops_per_token * tokens / seconds / (peak_tflops * 1e12), 3)}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    model.unload()  # the base without LoRA, for the next run
    if checkpointing:
        base.gradient_checkpointing_disable()
    del model, causal_lm, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second that a reduction over 2 GB reads (what decoding does with the weights)."""
    buffer = torch.empty(int(2e9) // 2, dtype=torch.bfloat16, device=device).fill_(1)
    buffer.sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        buffer.sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return buffer.numel() * 2 * 10 / (time.perf_counter() - started)


def decode_figures(model, new_tokens: int, device: torch.device) -> dict:
    """Greedy single-stream decoding through the Predictor's token loop: eager (transformers' dynamic
    cache), each step a CUDA graph replay, and the step compiled before capture. That replays compute
    what eager steps do is tested in tests/test_cuda.py on a tiny model; comparing tokens here would
    say little: a random 7B's logits are near-tied, and eager decoding on an H100 is not bit-for-bit
    repeatable itself (two eager runs part within 3 steps, measured)."""
    from alpaca_tune.serving.generation import generate_token_ids
    from alpaca_tune.serving.sampling import SamplingParams
    from alpaca_tune.serving.transformers_decoder import TransformersDecoder

    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = read_bandwidth(device) / weight_bytes
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    prompt = list(range(3, 67))
    result = {"weight_gb": round(weight_bytes / 1e9, 2), "bound_tokens_per_s": round(bound, 1)}
    variants = {"eager": dict(cuda_graphs=False), "cuda_graphs": dict(cuda_graphs=True),
                "compiled_cuda_graphs": dict(cuda_graphs=True, compile_step=True)}
    if device.type != "cuda":
        variants = {"eager": variants["eager"]}
    for name, options in variants.items():
        started = time.perf_counter()
        # warm-up: records the graph (and compiles) for this capacity, which later requests reuse
        decoder = TransformersDecoder(model, **options)
        list(generate_token_ids(decoder, prompt, params if options["cuda_graphs"] else SamplingParams(
            max_new_tokens=4, temperature=0.0), set()))
        result[f"{name}_first_call_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        count = len(list(generate_token_ids(decoder, prompt, params, set())))
        rate = count / (time.perf_counter() - started)
        result[f"{name}_tokens_per_s"] = round(rate, 1)
        result[f"{name}_fraction_of_bound"] = round(rate / bound, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script anywhere")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of the bf16 2048x4 step")
    parser.add_argument("--only", choices=["train", "decode"], help="run only these figures")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    from alpaca_tune.training.model import load_frozen_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAMA_7B
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": shape, "train": []}
    with tempfile.TemporaryDirectory(prefix="random-llama-") as directory:
        base_dir = Path(directory)
        save_random_model(shape, base_dir, device)
        # 4-bit first: nothing of the bf16 model (compiled code keeps references) is in its peak memory
        for quantization in ("4bit", "none") if device.type == "cuda" else ("none",):  # bitsandbytes: CUDA only
            if args.only == "decode" and quantization != "none":
                continue
            base = load_frozen_base(base_dir, quantization, device,
                                    torch.bfloat16 if device.type == "cuda" else torch.float32)
            for compiled in (False, True):
                for run in TRAIN_RUNS:
                    if run[0] == quantization and run[5] == compiled and args.only != "decode":
                        figures = train_figures(base, *run, steps=args.steps, device=device,
                                                peak_tflops=args.peak_tflops,
                                                profile=args.profile and run == ("none", False, 2048, 4, 1, False))
                        results["train"].append(figures)
                        print("train", json.dumps(figures), flush=True)
                if quantization == "none" and not compiled and args.only != "train":
                    with torch.inference_mode():
                        results["decode_bf16"] = decode_figures(base, args.new_tokens, device)
                    print("decode", json.dumps(results["decode_bf16"]), flush=True)
            del base
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
