"""Time and peak memory of scripts/export.py on a 7B-shaped model, per format.

Builds a random LLaMA-2-7B-shaped HF model (bf16 safetensors: hidden 4096, 32 layers, ffn 11008,
vocab 32000, a tiny SentencePiece tokenizer) and a random LoRA adapter in PEFT's format (r 16 on
q_proj and v_proj, alpaca-lora's default), then exports each format in a child process and prints
its wall time and peak resident memory next to the model's size. An exporter that held the model
would peak above it; this one reads one tensor at a time.

    python scripts/bench_export.py                      # 7B shape: ~13.5 GB model, ~60 GB of disk in all
    python scripts/bench_export.py --layers 4           # the same layers, fewer of them
    python scripts/bench_export.py --formats hf,gguf-lora

Outputs are removed after each format; the model too, unless --workdir is given.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_convert import child_peak_rss, write_tokenizer  # noqa: E402

from alpaca_tune.device import describe_line  # noqa: E402

RUNS = [("hf", []), ("meta", []), ("gguf", ["--outtype", "f16"]), ("gguf", ["--outtype", "q8_0"]), ("gguf-lora", [])]


def build(model_dir: Path, adapter_dir: Path, layers: int, rank: int) -> None:
    """The random model and adapter, one tensor at a time (this child never holds the model)."""
    import torch
    from transformers import LlamaConfig

    from alpaca_tune.conversion.safetensors_writer import StreamingSafetensors
    from alpaca_tune.conversion.tokenizer import convert_sentencepiece, save_tokenizer

    hidden, ffn, vocab = 4096, 11008, 32000
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    model_dir.mkdir(parents=True)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
    plan = [("model.embed_tokens.weight", (vocab, hidden), torch.bfloat16)]
    for i in range(layers):
        plan += [(f"model.layers.{i}.{name}.weight", shape, torch.bfloat16) for name, shape in shapes.items()]
        plan += [(f"model.layers.{i}.{name}.weight", (hidden,), torch.bfloat16)
                 for name in ("input_layernorm", "post_attention_layernorm")]
    plan += [("model.norm.weight", (hidden,), torch.bfloat16), ("lm_head.weight", (vocab, hidden), torch.bfloat16)]
    writer = StreamingSafetensors(model_dir, plan, 5 * 10**9)
    for name, shape, dtype in plan:
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape) * 0.02
        writer.write(name, tensor.to(dtype))
    writer.close()
    config.save_pretrained(str(model_dir))
    write_tokenizer(model_dir / "tokenizer.model")
    save_tokenizer(convert_sentencepiece(model_dir / "tokenizer.model"), model_dir, 4096)

    from safetensors.torch import save_file

    adapter_dir.mkdir(parents=True)
    lora = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(hidden, rank) * 0.01
    save_file(lora, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"],
         "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default %(default)s: 7B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--formats", default="hf,meta,gguf,gguf-lora",
                        help="which to run (gguf runs f16 and q8_0; default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the child that writes the model
    args = parser.parse_args()
    if args.build_only:
        build(args.build_only / "model", args.build_only / "adapter", args.layers, args.rank)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export-"))
    try:
        if not (work / "model" / "config.json").is_file():
            _, seconds = child_peak_rss([sys.executable, __file__, "--layers", str(args.layers), "--rank",
                                         str(args.rank), "--build-only", str(work)])
            print(f"built in {seconds:.0f} s")
        size = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
        print(f"machine: {describe_line()}")
        print(f"model: {args.layers} layers of LLaMA-2-7B's shape, bf16, {size / 1e9:.2f} GB; adapter r={args.rank} "
              f"on q_proj, v_proj")
        baseline, _ = child_peak_rss([sys.executable, "-c", "import torch, transformers, gguf, alpaca_tune.export.run"])
        print(f"baseline: python + torch + transformers + gguf imported: {baseline / 1e9:.2f} GB")
        wanted = set(args.formats.split(","))
        for fmt, extra in [run for run in RUNS if run[0] in wanted]:
            out = work / "out"
            peak, seconds = child_peak_rss([
                sys.executable, "scripts/export.py", "--weights", str(work / "adapter"), "--base_model",
                str(work / "model"), "--format", fmt, *extra, "--output-dir", str(out), "--no-progress"])
            written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"{fmt} {' '.join(extra)}: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB "
                  f"({peak / size:.0%} of the model), wrote {written / 1e9:.2f} GB")
            shutil.rmtree(out)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
