"""Prepare the embedded base model (SmolLM2-135M-Instruct) in weights/ once, unless weights/ holds one.

    python scripts/prepare_base.py
    python scripts/prepare_base.py --dtype bfloat16 --output weights/smollm2-bf16

With --output, a copy of the base (as resolved: weights/ or the embedded one) is written there,
cast to --dtype: the bf16 checkpoint that BENCHMARKS.md's bf16 decoding figures are measured on
(`scripts/bench_generate.py --base_model weights/smollm2-bf16`).
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune.base_model import (  # noqa: E402
    WEIGHTS_DIR,
    is_model_dir,
    load_causal_lm,
    load_tokenizer,
    prepare_embedded,
    resolve_base_dir,
)
from alpaca_tune.cli import run_or_exit, setup_logging  # noqa: E402


def write_copy(output: Path, dtype: str) -> Path:
    """The resolved base, its weights cast to `dtype`, as HF safetensors + tokenizer in `output`."""
    import torch

    source = resolve_base_dir()
    model = load_causal_lm(source, torch.device("cpu"), getattr(torch, dtype))
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    load_tokenizer(source).save_pretrained(str(output))
    logging.getLogger(__name__).info("%s in %s written to %s", source, dtype, output)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write a copy of the base here (with --dtype)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="dtype of the copy written to --output (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.output:
        print(f"base model copy ready in {run_or_exit(write_copy, args.output, args.dtype)}")
    elif is_model_dir(WEIGHTS_DIR):
        print(f"{WEIGHTS_DIR} holds a converted model; it is the base model")
    else:
        print(f"embedded base model ready in {run_or_exit(prepare_embedded)}")


if __name__ == "__main__":
    main(sys.argv[1:])
