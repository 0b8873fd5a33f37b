"""Export the base (+ a trained adapter) for other programs: merged HF, Meta, GGUF, GGUF LoRA, Ollama.

    python scripts/export.py --weights outputs/demo/adapter.tar.gz --format hf --output-dir exports/hf
    python scripts/export.py --weights outputs/demo/adapter.tar.gz --format gguf --outtype q8_0 --output-dir exports/gguf
    python scripts/export.py --weights outputs/demo/adapter.tar.gz --format gguf-lora --output-dir exports/lora
    python scripts/export.py --format gguf --output-dir exports/base      # the base alone (for --lora)
    cog exec python scripts/export.py ...

--format takes one format or several, comma-separated (each then in a subfolder of --output-dir):
hf, meta, gguf, gguf-lora, ollama. The base is predict.py's: --base_model, else weights/, else the
embedded SmolLM2. See README.md ("Export") for what to do with each result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune.cli import parse_size, run_or_exit, setup_logging  # noqa: E402
from alpaca_tune.export import FORMATS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", required=True, help=f"one or more of {', '.join(FORMATS)}, comma-separated")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the files go (created)")
    parser.add_argument("--weights", help="the adapter: an archive or folder from train.py, or a URL "
                                          "(as COG_WEIGHTS); without it the base alone is exported")
    parser.add_argument("--base_model", default="", help="base model folder (default: weights/ or the embedded one)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="hf/meta: dtype of the weights (default: the base's)")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="gguf/ollama: tensor type (default: %(default)s; norms stay f32)")
    parser.add_argument("--shards", type=int, default=1, help="meta: model-parallel shards (default: %(default)s)")
    parser.add_argument("--shard-size", type=parse_size, default="5GB",
                        help="hf: largest safetensors file (default: %(default)s)")
    parser.add_argument("--prompt_template", default="",
                        help="ollama: template name or inline JSON (default: the adapter's, else alpaca)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging()

    import resource

    from alpaca_tune.export.run import ExportOptions, export

    options = ExportOptions(dtype=args.dtype, outtype=args.outtype, shards=args.shards, shard_bytes=args.shard_size,
                            prompt_template=args.prompt_template, progress=not args.no_progress)
    start = time.monotonic()
    files = run_or_exit(export, args.format, args.output_dir, args.weights, args.base_model, options, args.overwrite)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    print(f"wrote {len(files)} file(s) to {args.output_dir} in {time.monotonic() - start:.1f} s, "
          f"peak memory {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
