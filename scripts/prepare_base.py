"""Prepare the embedded base model (SmolLM2-135M-Instruct) in weights/ once, unless weights/ holds one.

    python scripts/prepare_base.py
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune.base_model import WEIGHTS_DIR, is_model_dir, prepare_embedded  # noqa: E402
from alpaca_tune.cli import run_or_exit, setup_logging  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    if is_model_dir(WEIGHTS_DIR):
        print(f"{WEIGHTS_DIR} holds a converted model; it is the base model")
    else:
        print(f"embedded base model ready in {run_or_exit(prepare_embedded)}")
