"""Time from starting the Cog server (coglet) to READY and to the first streamed token.

    python scripts/bench_startup.py                       # trains a 1-step adapter once, 5 runs
    python scripts/bench_startup.py --weights outputs/run/adapter.tar.gz --runs 10

Each run starts `python -m cog.server.http` as `make serve` does (tests/cog_server.py), polls
/health-check every 10 ms and stops the server. Reported: wall time from process start to the
first READY answer, then to the first token of a streamed prediction (SSE, "Tell me about
alpacas.") posted at READY, and the phases from coglet's own log timestamps: worker spawn,
importing predict.py (torch, cog, the library), Predictor.setup (base model + adapter + merge).
The machine's load average is printed too: on a shared 2-core machine it moves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from cog_server import CogServer  # noqa: E402

DEFAULT_ADAPTER_DIR = ROOT / "outputs" / "bench-startup"
FIRST_PREDICTION = {"prompt": "Tell me about alpacas.", "max_new_tokens": 8, "temperature": 0}


def embedded_base() -> Path:
    from alpaca_tune.base_model import prepare_embedded

    return prepare_embedded()


def quick_adapter(base: Path, output_dir: Path = DEFAULT_ADAPTER_DIR) -> Path:
    """A 1-step LoRA adapter on the demo data (made once; training quality is beside the point)."""
    archive = output_dir / "adapter.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_data", str(ROOT / "data" / "alpaca_demo.json"),
                        "--max_steps", "1", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
                        "--val_set_size", "0", "--warmup_steps", "0", "--base_model", str(base),
                        "--output_dir", str(output_dir)], check=True, cwd=ROOT)
    return archive


def _log_times(log_text: str) -> dict[str, float]:
    """Seconds since the epoch of coglet's phase messages (its log is JSON lines)."""
    wanted = {"Starting coglet server": "http", "Loading predictor": "import", "Running setup": "setup",
              "Setup complete": "setup_done", "Server ready": "ready"}
    times = {}
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        message = entry.get("fields", {}).get("message", "")
        for prefix, name in wanted.items():
            if message.startswith(prefix) and name not in times:
                times[name] = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
    return times


def measure(base: Path, weights: Path) -> dict[str, float]:
    server = CogServer("predict", env={"ALPACA_TUNE_BASE": str(base)}, weights=weights)
    server.start()
    start_wall = time.time()
    try:
        health = server.wait_for(("READY", "SETUP_FAILED"), timeout=300, poll=0.01)
        ready = time.monotonic() - server.started_at
        if health["status"] != "READY":
            raise SystemExit(f"setup failed:\n{health['setup']['logs'][-2000:]}")
        first_token = None
        for event, _, at in server.events("/predictions", {"input": FIRST_PREDICTION}):
            if event == "output":
                first_token = at - server.started_at
                break
        marks = _log_times(server.log())
    finally:
        server.stop()
    result = {"ready": ready}
    if first_token is not None:
        result["first_token"] = first_token
    if {"import", "setup", "setup_done"} <= set(marks):
        result["spawn"] = marks["import"] - start_wall
        result["import"] = marks["setup"] - marks["import"]
        result["setup"] = marks["setup_done"] - marks["setup"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time from server start to READY and first token.")
    parser.add_argument("--weights", type=Path, help="adapter archive (default: train a 1-step one once)")
    parser.add_argument("--base", type=Path, help="base model directory (default: the embedded SmolLM2)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    base = args.base or embedded_base()
    weights = args.weights or quick_adapter(base)
    from alpaca_tune import device

    print(f"machine: {device.describe_line()}")
    print(f"base {base}\nadapter {weights} ({weights.stat().st_size / 1e6:.1f} MB)\n"
          f"cpus {os.cpu_count()}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    measure(base, weights)  # warm-up: file cache, .pyc files
    runs = [measure(base, weights) for _ in range(args.runs)]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'phase':<34}{'median':>8}{'min':>8}{'max':>8}")
    labels = {"ready": "start -> READY (seen by a client)", "first_token": "start -> first streamed token",
              "spawn": "  start -> worker imports predict.py",
              "import": "  import predict.py", "setup": "  Predictor.setup (base + adapter)"}
    for key, label in labels.items():
        values = [run[key] for run in runs if key in run]
        if values:
            print(f"{label:<34}{statistics.median(values):8.2f}{min(values):8.2f}{max(values):8.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
