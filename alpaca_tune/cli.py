"""What the command-line entry points share: log format and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

from .errors import UserError


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped lines on stderr (Cog forwards them to the prediction/training logs)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("alpaca_tune").setLevel(level)
    # peft still calls transformers' renamed is_gradient_checkpointing; the notice is for them
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run_or_exit(function, *args, **kwargs):
    """Call function; a UserError becomes 'error: ...' on stderr and exit status 2, no traceback."""
    try:
        return function(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", text.strip())
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])
