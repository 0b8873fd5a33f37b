"""Training attention on CPU: training/cpu/attention.py's blockwise bf16 products vs PyTorch's SDPA in fp32.

    .venv/bin/python scripts/bench_attention.py                     # SmolLM2's shapes
    .venv/bin/python scripts/bench_attention.py --lengths 128,512 --rounds 12

One layer's causal attention, forward + backward, with a micro-batch of --batch rows of each
length, q, k and v handed over as transformers does (bf16, transposed views of [B, T, heads, D]).
"sdpa-fp32" is what the trainer used before (SDPA on fp32 copies, grouped heads via enable_gqa);
"blocks" is alpaca_tune.training.cpu.attention. The two alternate within each round, so a drifting machine
slows both alike; the medians and their ratio are printed. Outputs are checked to agree first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from alpaca_tune import device  # noqa: E402
from alpaca_tune.training.cpu.attention import causal_block_attention  # noqa: E402


def sdpa_fp32(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1]).to(q.dtype)


def forward_backward_s(attention, q, k, v, d_out) -> float:
    started = time.perf_counter()
    attention(q, k, v).backward(d_out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,192,256,400,512")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv_heads", type=int, default=3)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    variants = {"sdpa-fp32": sdpa_fp32, "blocks": causal_block_attention}
    print(f"machine: {device.describe_line()}")
    print(f"one layer, forward + backward, {args.batch} rows, {args.heads} heads / {args.kv_heads} kv heads "
          f"of {args.head_dim}, bf16, {torch.get_num_threads()} threads; median of {args.rounds} rounds (ms)")
    print(f"{'tokens':>6}  " + "  ".join(f"{name:>10}" for name in variants) + "   speed-up")
    g = torch.Generator().manual_seed(0)
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(args.batch, length, n, args.head_dim, generator=g).to(torch.bfloat16)
                   .transpose(1, 2).requires_grad_() for n in (args.heads, args.kv_heads, args.kv_heads))
        d_out = torch.randn(q.shape, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            reference, ours = sdpa_fp32(q, k, v).float(), causal_block_attention(q, k, v).float()
        error = ((ours - reference).norm() / reference.norm()).item()
        if error > 2e-2:
            raise SystemExit(f"{length} tokens: outputs disagree (relative difference {error:.1e})")
        times = {name: [] for name in variants}
        for round_ in range(args.rounds + 1):
            for name, attention in variants.items():
                elapsed = forward_backward_s(attention, q, k, v, d_out)
                if round_:  # the first round warms up
                    times[name].append(elapsed)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{length:>6}  " + "  ".join(f"{m:>10.1f}" for m in medians.values())
              + f"   {medians['sdpa-fp32'] / medians['blocks']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
