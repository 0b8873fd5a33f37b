"""The web page: ask the model, compare two answers side by side, train on an uploaded file, export.

    python scripts/webui.py                                   # http://127.0.0.1:7860
    python scripts/webui.py --port 7860 --weights outputs/demo/adapter.tar.gz
    python scripts/webui.py --host 0.0.0.0                    # reachable from other machines
    make ui

The base is predict.py's (--base_model, else weights/, else the embedded SmolLM2). Adapters to
choose from: the one given with --weights, every outputs/*/adapter.tar.gz, and uploaded archives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune.base_model import PROJECT_ROOT  # noqa: E402
from alpaca_tune.cli import run_or_exit, setup_logging  # noqa: E402


def build(weights: str | None, base_model: str, outputs_dir: Path):
    from alpaca_tune.webui.app import WebUI
    from alpaca_tune.webui.models import ModelChoices

    choices = ModelChoices(base_model, weights, outputs_dir)
    choices.model(choices.default())  # load the first choice now: a bad --weights fails here, not on the page
    return WebUI(choices, outputs_dir).build()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--weights", help="an adapter archive or folder from train.py to offer first")
    parser.add_argument("--base_model", default="", help="base model folder (default: weights/ or the embedded one)")
    parser.add_argument("--outputs", type=Path, default=PROJECT_ROOT / "outputs",
                        help="where trainings, adapters and preferences.jsonl go (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    page = run_or_exit(build, args.weights, args.base_model, args.outputs)
    page.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   allowed_paths=[str(args.outputs)], show_error=False)


if __name__ == "__main__":
    main(sys.argv[1:])
