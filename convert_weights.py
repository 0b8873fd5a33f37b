"""Convert Meta's LLaMA download (unconverted-weights/) into a Hugging Face model (weights/).

    python convert_weights.py                       # the only model in unconverted-weights/
    python convert_weights.py --model-size 13B --llama-version 2
    cog exec python convert_weights.py

See docs/CONVERT.md for the folder layout, output, time and memory per model size.
"""

import argparse
import resource
import sys
import time

from alpaca_tune.cli import parse_size
from alpaca_tune.conversion import ConversionError
from alpaca_tune.conversion.convert import convert_checkpoint
from alpaca_tune.conversion.params import VERSIONS

DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", default="unconverted-weights", help="Meta's files (default: %(default)s)")
    parser.add_argument("--output-dir", default="weights", help="where the HF model goes (default: %(default)s)")
    parser.add_argument("--model-size", help="subfolder of --input-dir to convert (7B, 13B, ...) when it holds several")
    parser.add_argument("--llama-version", choices=VERSIONS,
                        help="required when the files do not tell (LLaMA 1 vs 2 without GQA, 3.1 vs 3.2)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--rope-scaling-factor", type=float,
                        help="LLaMA 3.1/3.2 rope scaling factor (default: params.json's, else 8 as in Meta's "
                             "reference model code; 32 gives Hugging Face's published 3.2 configs)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace a model already in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import torch  # after argparse, so --help is instant

    start = time.monotonic()
    try:
        convert_checkpoint(
            args.input_dir, args.output_dir, model_size=args.model_size, llama_version=args.llama_version,
            dtype=getattr(torch, args.dtype) if args.dtype else None, rope_scaling_factor=args.rope_scaling_factor,
            force=args.force,
            max_file_bytes=args.max_shard_size, progress=not args.no_progress,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    print(f"done in {time.monotonic() - start:.0f} s, peak memory {peak_gb:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
