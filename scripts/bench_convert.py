"""Peak memory of convert_weights.py against the size of the checkpoint it converts.

Builds a synthetic Meta-format LLaMA 2 checkpoint (bf16, several model-parallel shards, random
weights, a tiny SentencePiece tokenizer) of about --size-gb on disk, converts it in a child
process, and prints the child's peak resident memory next to the checkpoint's size. A
converter that loads whole shards would peak above the checkpoint size; this one maps the
shards and works one layer at a time.

    python scripts/bench_convert.py --size-gb 1.5 --shards 4

Each step runs in its own child, measured with wait4: Linux carries a parent's memory high-water
mark into a child it forks, so this parent stays small (it never imports torch).
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alpaca_tune.device import describe_line  # noqa: E402

LAYER_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}


def ffn_dim(dim: int, multiple_of: int = 256) -> int:
    return multiple_of * -(-int(8 * dim / 3) // multiple_of)


def write_checkpoint(model_dir: Path, dim: int, n_layers: int, n_shards: int, vocab: int) -> int:
    """One shard at a time (so this process never holds the whole model); returns bytes on disk."""
    import torch

    model_dir.mkdir(parents=True)
    heads, ffn = dim // 128, ffn_dim(dim)
    params = {"dim": dim, "n_layers": n_layers, "n_heads": heads, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
    (model_dir / "params.json").write_text(json.dumps(params))
    full = {"wq": (dim, dim), "wk": (dim, dim), "wv": (dim, dim), "wo": (dim, dim),
            "w1": (ffn, dim), "w2": (dim, ffn), "w3": (ffn, dim)}
    group = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
             "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}

    def part(shape, split):
        shape = list(shape)
        shape[split] //= n_shards
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    total = 0
    for rank in range(n_shards):
        state = {"tok_embeddings.weight": part((vocab, dim), 1), "output.weight": part((vocab, dim), 0),
                 "norm.weight": torch.ones(dim, dtype=torch.bfloat16)}
        for i in range(n_layers):
            for name, shape in full.items():
                state[f"layers.{i}.{group[name]}.{name}.weight"] = part(shape, LAYER_SPLIT[name])
            state[f"layers.{i}.attention_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
            state[f"layers.{i}.ffn_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        path = model_dir / f"consolidated.{rank:02d}.pth"
        torch.save(state, path)
        total += path.stat().st_size
        del state
    return total


def write_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    sentences = ["The quick brown fox jumps over the lazy dog.", "Alpacas and llamas are camelids.",
                 "Convert the weights, then train an adapter."] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
                                   vocab_size=100, minloglevel=2)
    path.write_bytes(model.getvalue())


def child_peak_rss(command: list[str]) -> tuple[int, float]:
    """Run one child; its own peak RSS in bytes (Linux reports KiB) and wall seconds."""
    start = time.monotonic()
    child = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return usage.ru_maxrss * 1024, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.5, help="checkpoint size on disk (default %(default)s)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the child that writes the checkpoint
    args = parser.parse_args()

    layer_bytes = 2 * (4 * args.dim * args.dim + 3 * args.dim * ffn_dim(args.dim))
    n_layers = max(1, round((args.size_gb * 1e9 - 4 * args.vocab * args.dim) / layer_bytes))
    if args.build_only:
        write_checkpoint(args.build_only, args.dim, n_layers, args.shards, args.vocab)
        write_tokenizer(args.build_only.parent / "tokenizer.model")
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert-"))
    try:
        model_dir = work / "unconverted" / "bench"
        _, seconds = child_peak_rss([sys.executable, __file__, *sys.argv[1:], "--build-only", str(model_dir)])
        size = sum(p.stat().st_size for p in model_dir.glob("consolidated.*.pth"))
        print(f"machine: {describe_line()}")
        print(f"checkpoint: {args.shards} shards, {n_layers} layers, dim {args.dim}, bf16: "
              f"{size / 1e9:.2f} GB on disk (built in {seconds:.0f} s)")

        baseline, _ = child_peak_rss([sys.executable, "-c", "import torch, transformers, alpaca_tune.conversion.convert"])
        print(f"baseline: python + torch + transformers imported: {baseline / 1e9:.2f} GB")
        peak, seconds = child_peak_rss([
            sys.executable, "convert_weights.py", "--input-dir", str(model_dir.parent), "--output-dir",
            str(work / "weights"), "--llama-version", "2", "--no-progress",
        ])
        print(f"conversion: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB = {peak / size:.0%} of the checkpoint "
              f"({(peak - baseline) / 1e9:.2f} GB above the baseline; one layer is {layer_bytes / 1e9:.2f} GB, "
              f"the embedding {2 * args.vocab * args.dim / 1e9:.2f} GB)")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
