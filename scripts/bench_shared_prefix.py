"""What sharing the template's preamble saves (alpaca_tune/training/cpu/shared_prefix.py), step by step.

    .venv/bin/python scripts/bench_shared_prefix.py              # the training benchmark's steps
    .venv/bin/python scripts/bench_shared_prefix.py --rounds 1   # faster

The optimizer steps of scripts/bench_train.py's "ours" (same data mix, model and hyperparameters,
LoRA dropout on), each computed twice in one process, with the preamble shared and with every row
whole, in alternating order: whole-run timings on this machine move by ~10% between runs, which
hides a gain of this size, while alternating the same step's two ways in one process does not.
Gradients are computed and dropped (no optimizer step), so both ways see the same weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=128, help="training records (half from each source)")
    parser.add_argument("--held_out", type=int, default=32, help="as bench_train.py's (it picks the mix)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the steps, each way")
    parser.add_argument("--base_model", default="", help="default: the embedded SmolLM2")
    args = parser.parse_args()

    import bench_train
    import torch

    from alpaca_tune import device as machine
    from alpaca_tune.base_model import load_tokenizer, resolve_base_dir
    from alpaca_tune.data.batching import make_batch
    from alpaca_tune.data.prompts import load_template
    from alpaca_tune.data.records import load_records
    from alpaca_tune.data.tokenization import tokenize_records
    from alpaca_tune.training.cpu.shared_prefix import plan_shared_prefix
    from alpaca_tune.training.fast_paths import switch_on_fast_paths
    from alpaca_tune.training.model import attach_lora, load_frozen_base
    from alpaca_tune.training.plan import StepPlan
    from alpaca_tune.training.steps import accumulate_gradients

    hyper = bench_train.HYPER
    train_path, _ = bench_train.make_mix(args.examples, args.held_out, Path(tempfile.mkdtemp()))
    base_dir = resolve_base_dir(args.base_model)
    tokenizer = load_tokenizer(base_dir)
    examples, _ = tokenize_records(load_records(train_path), load_template("alpaca"), tokenizer,
                                   hyper["cutoff_len"], False)
    device = torch.device("cpu")
    model = attach_lora(load_frozen_base(base_dir, "none", device, torch.bfloat16), hyper["lora_rank"],
                        hyper["lora_alpha"], hyper["lora_dropout"], hyper["lora_target_modules"],
                        hyper["seed"], quantized=False, gradient_checkpointing=False)
    compute = switch_on_fast_paths(model, device, torch.bfloat16, quantized=False).compute
    causal_lm = model.get_base_model()
    model.train()
    plan = StepPlan([len(e) for e in examples], hyper["train_batch_size"],
                    hyper["gradient_accumulation_steps"], hyper["seed"], True)
    steps = [[make_batch([examples[i] for i in indices], False, tokenizer.pad_token_id)
              for indices in plan.step(step)] for step in range(plan.steps_per_epoch)]

    tokens = sum(int(b["attention_mask"].sum()) for batches in steps for b in batches)
    shared = [plan_shared_prefix(batches) for batches in steps]
    saved = sum(p.length * (sum(len(r) for r in p.rows) - len(p.prompts)) for p in shared if p)
    kinds = Counter(f"{p.length} tokens x {len(p.prompts)} distinct" for p in shared if p)
    print(f"machine: {machine.describe_line()}")
    print(f"{len(steps)} steps, {tokens} tokens; preambles shared in {sum(p is not None for p in shared)} "
          f"steps ({', '.join(f'{n} steps: {kind}' for kind, n in kinds.items())}); "
          f"{saved} token positions ({saved / tokens:.1%}) not computed")
    seconds = {True: 0.0, False: 0.0}
    for round_ in range(args.rounds):
        for index, batches in enumerate(steps):
            for share in (True, False) if (index + round_) % 2 else (False, True):
                started = time.perf_counter()
                accumulate_gradients(causal_lm, batches, device, compute, share)
                seconds[share] += time.perf_counter() - started
                model.zero_grad(set_to_none=True)
        print(f"round {round_ + 1}: whole rows {seconds[False]:.1f} s, shared preamble {seconds[True]:.1f} s "
              f"(cumulative): {seconds[False] / seconds[True]:.3f}x")
    print(f"tokens/s: whole rows {tokens * args.rounds / seconds[False]:.1f}, shared preamble "
          f"{tokens * args.rounds / seconds[True]:.1f}; speed-up {seconds[False] / seconds[True]:.3f}x")


if __name__ == "__main__":
    main()
