"""Serving throughput and latency over HTTP: the real Cog server (coglet), SSE clients at once.

    python scripts/bench_serve.py                                   # embedded SmolLM2, 1-16 clients
    python scripts/bench_serve.py --concurrency 1,8 --round 16 --max_new_tokens 32
    python scripts/bench_serve.py --concurrency 16 --adapters 1,4,16   # 16 clients, adapters mixed

The server is started as `make serve` starts it (tests/cog_server.py: scripts/serve.py's command
and environment, 16 slots). Every round serves the same `--round` streamed predictions (Accept:
text/event-stream), with prompts of mixed lengths drawn from ../shared/data's Alpaca sample
(seed 0), greedy, `--max_new_tokens` at most: at concurrency C, C clients share them, each
sending its next one when its last answer ended. So one client serves exactly the work that C
clients serve, one request at a time, and the ratio between rounds is the batching's alone.
Reported per C: aggregate output tokens/s (the server's own output_token_count over the wall time
of the round; a 409, which coglet answers for a few ms after each answer while it frees the slot,
is retried and counted), time to first chunk (p50/p99 over requests) and the gap between chunks
(p50/p99), aggregate tokens/s relative to the first round, and the requests in flight on
average (each one's time from sending to its answer's end, summed, over the round's wall time).
That stays below C for the round's tail, where fewer than C clients have a request left: the
default round of 96 gives each of 16 clients 6 requests, so the tail is a small part of it.
--repeats N runs every round N times, interleaved, and shows the median round of each level and
every run's figures. With --adapters K,...: the same at each concurrency with every request
naming one of K distinct adapters (lora_weights, round robin; random rank-8 LoRAs of q_proj and
v_proj made for the run and served from $ALPACA_TUNE_ADAPTER_DIR), relative to the first round.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from cog_server import CogServer, run_clients  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "alpaca_data_sample.json"


def prompts(count: int, seed: int = 0) -> list[dict]:
    records = json.loads(SAMPLE.read_text())
    random.Random(seed).shuffle(records)
    return [{"prompt": r["instruction"], "input": r.get("input") or ""} for r in records[:count]]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else float("nan")


def make_adapters(base: Path, count: int, directory: Path) -> list[str]:
    """`count` distinct random LoRA archives for `base` (rank 8 on q_proj and v_proj), as train.py
    lays them out; their names."""
    import tarfile

    import torch
    from safetensors.torch import save_file

    from alpaca_tune.base_model import weight_shapes

    shapes = weight_shapes(base)
    names = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
                module = "base_model.model." + name.removesuffix(".weight")
                tensors[module + ".lora_A.weight"] = torch.randn(8, shape[1], generator=generator) * 0.02
                tensors[module + ".lora_B.weight"] = torch.randn(shape[0], 8, generator=generator) * 0.02
        adapter = directory / f"adapter-{index}"
        adapter.mkdir(parents=True)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
        with tarfile.open(directory / f"adapter-{index}.tar.gz", "w:gz") as tar:
            tar.add(adapter, arcname="adapter")
        names.append(f"adapter-{index}.tar.gz")
    return names


def one_round(server: CogServer, clients: int, pool: list[dict], max_new_tokens: int,
              adapters: list[str] | None = None) -> dict:
    """Every request of `pool`, `clients` at a time (each client takes the next one left)."""
    firsts, gaps, tokens, failures, retries, spans = [], [], [], [], [], []
    lock = threading.Lock()
    left = iter(range(len(pool)))

    def client(number: int) -> None:
        while True:
            with lock:
                index = next(left, None)
            if index is None:
                return
            body = {"input": {**pool[index], "max_new_tokens": max_new_tokens, "temperature": 0.0}}
            if adapters:
                body["input"]["lora_weights"] = adapters[index % len(adapters)]
            started, last, final, busy = time.monotonic(), None, None, True
            mine_first, mine_gaps = None, []
            while busy:  # coglet frees a slot a few ms after its answer: a 409 then is retried
                busy = False
                for event, data, at in server.events("/predictions", body):
                    if event == "http" and data["status"] == 409:
                        busy = True
                        with lock:
                            retries.append(1)
                        time.sleep(0.02)
                    elif event == "http" and data["status"] != 200:
                        final = {"status": f"HTTP {data['status']}"}
                    elif event == "output":
                        if mine_first is None:
                            mine_first = at - started
                        else:
                            mine_gaps.append(at - last)
                        last = at
                    elif event == "completed":
                        final = data
            with lock:
                spans.append(time.monotonic() - started)
                if final is None or final.get("status") != "succeeded":
                    failures.append(final)
                    continue
                tokens.append(final["metrics"]["output_token_count"])
                if mine_first is not None:
                    firsts.append(mine_first)
                gaps.extend(mine_gaps)

    wall = run_clients(client, clients, timeout=3600)
    for failure in failures[:3]:
        print(f"failed: {json.dumps(failure)[:300]}", file=sys.stderr)
    return {"clients": clients, "requests": len(pool), "failed": len(failures), "retried": len(retries),
            "tokens": sum(tokens), "wall": wall, "tokens_per_s": sum(tokens) / wall,
            "ttft_p50": percentile(firsts, 0.5), "ttft_p99": percentile(firsts, 0.99),
            "gap_p50": percentile(gaps, 0.5), "gap_p99": percentile(gaps, 0.99),
            "in_flight": sum(spans) / wall}


def median_round(rounds: list[dict]) -> dict:
    """The round with the median tokens/s (failures and 409s summed over all of them)."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "failed": sum(r["failed"] for r in rounds),
            "retried": sum(r["retried"] for r in rounds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of clients at once")
    parser.add_argument("--round", type=int, default=96,
                        help="predictions in every round, the same ones at each concurrency (enough that "
                             "the round's tail, where fewer than C clients have one left, is a small part)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every round this many times, interleaved; report each level's median")
    parser.add_argument("--base_model", default="", help="base model directory (default: the embedded SmolLM2)")
    parser.add_argument("--adapters", default="", help="comma-separated numbers of distinct per-request adapters "
                                                      "to mix (e.g. 1,4,16); default: none")
    args = parser.parse_args(argv)
    from alpaca_tune import device
    from alpaca_tune.base_model import resolve_base_dir

    levels = [int(part) for part in args.concurrency.split(",")]
    base = resolve_base_dir(args.base_model)
    pool = prompts(args.round)
    print(f"machine: {device.describe_line()}")
    print(f"base {base.name}, {len(pool)} prompts from {SAMPLE.name} (seed 0), greedy, max_new_tokens "
          f"{args.max_new_tokens}, the same {len(pool)} predictions in every round")
    counts = [int(part) for part in args.adapters.split(",")] if args.adapters else []
    with tempfile.TemporaryDirectory(prefix="bench-serve-adapters-") as adapter_dir:
        names = make_adapters(base, max(counts), Path(adapter_dir)) if counts else []
        env = {"ALPACA_TUNE_BASE": str(base), "ALPACA_TUNE_ADAPTER_DIR": adapter_dir}
        with CogServer("predict", env=env) as server:
            server.wait_ready()
            one_round(server, 1, pool[:1], 8, names[:1])  # warm-up
            plan = [(f"{clients}x{count}", clients, names[:count]) for clients in levels for count in counts] \
                if counts else [(str(clients), clients, None) for clients in levels]
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
            for _ in range(args.repeats):  # interleaved, so a drifting machine moves every level alike
                for name, clients, adapters in plan:
                    runs[name].append(one_round(server, clients, pool, args.max_new_tokens, adapters))
            rows = [(name, median_round(runs[name])) for name, _, _ in plan]
    reference = rows[0][1]["tokens_per_s"] if rows else None
    print(f"{'clients' + ('x adapters' if counts else ''):>18} {'requests':>8} {'failed':>6} {'409s':>5} {'tokens':>7} "
          f"{'tokens/s':>9} {'vs first':>8} {'TTFT p50':>9} {'p99':>7} {'gap p50':>8} {'p99':>7} {'in flight':>9}")
    for name, row in rows:
        print(f"{name:>18} {row['requests']:8d} {row['failed']:6d} {row['retried']:5d} {row['tokens']:7d} {row['tokens_per_s']:9.1f} "
              f"{row['tokens_per_s'] / reference:7.2f}x {row['ttft_p50'] * 1000:7.0f}ms {row['ttft_p99'] * 1000:5.0f}ms "
              f"{row['gap_p50'] * 1000:6.1f}ms {row['gap_p99'] * 1000:5.1f}ms {row['in_flight']:9.2f}")
    if args.repeats > 1:
        first = runs[rows[0][0]]
        print("tokens/s of each run, and its ratio to the first level's in the same pass:")
        for name, _ in rows:
            print(f"{name:>18} " + "  ".join(f"{run['tokens_per_s']:.1f} ({run['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
                                          for run, base in zip(runs[name], first)))


if __name__ == "__main__":
    main(sys.argv[1:])
