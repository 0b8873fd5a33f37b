"""What the command-line entry points share: log format and turning user errors into exit 2."""

from __future__ import annotations

import logging
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
