"""Training throughput: alpaca-lora's recipe vs this project's trainer, side by side in one run.

    .venv/bin/python scripts/bench_train.py                 # both variants, then the comparison
    .venv/bin/python scripts/bench_train.py --examples 64   # smaller/faster
    .venv/bin/python scripts/bench_train.py --variants baseline,ours --rounds 2   # A B B A
    .venv/bin/python scripts/bench_train.py --variants ours,ours-no-cpu_attention --rounds 2
    .venv/bin/python scripts/bench_train.py --variants ours --nproc 2 --rounds 2   # 2 processes vs 1

Same machine, base model (the embedded SmolLM2 unless --base_model), data (a fixed, seeded mix of
GPTeacher role-play and GSM8K records from ../shared/data, whose lengths vary), and
hyperparameters (LoRA r=8 on q_proj,v_proj, lr 3e-4, cutoff_len 512, micro-batch 4 x 4
accumulation = 16, one epoch, linear schedule). Each variant runs in its own process, so peak RSS
is its own.

  baseline  alpaca-lora's finetune.py recipe: HF Trainer, DataCollatorForSeq2Seq padding each
            micro-batch to its longest example (pad_to_multiple_of=8), random order without
            length grouping, logits and loss over the full vocabulary at every position.
  ours      alpaca_tune.training with its defaults: length-grouped micro-batches (almost no
            padding), LM head and loss only at labelled positions and in chunks, bf16 base
            weights and LoRA products where the hardware has native bf16 (LoRA weights and the
            loss in fp32); on CPU also freed memory kept for reuse, cheaper dropout masks,
            blockwise causal attention in bf16 products and the template's preamble computed
            once per optimizer step (README, Performance).
  ours-nprocN  ours on N processes under torchrun (--nproc N; one thread each, as torchrun sets),
            each with 1/N of the accumulation, so the effective batch is the same 16.
  ours-*    the same with one setting changed (ours-fp32, ours-bf16, ours-packed,
            ours-no-grouping) or fast paths left off (ours-no-<name>, for each name in
            alpaca_tune/training/fast_paths.py's NAMES, or several joined by "+", through
            $ALPACA_TUNE_FAST_PATHS_OFF), to show what each one is worth in a whole run.

Both adapters are then scored by one evaluator on the same held-out records (mean loss per
response token), so "same result" is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
SOURCES = ("gpteacher_roleplay_alpaca.json", "gsm8k_alpaca.json")
HYPER = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_target_modules="q_proj,v_proj",
             learning_rate=3e-4, cutoff_len=512, train_batch_size=4, gradient_accumulation_steps=4,
             num_train_epochs=1.0, warmup_steps=1, lr_scheduler="linear", seed=42)


# Our trainer's variants: the defaults, then one setting changed, to show what pays.
VARIANTS = {"ours": {}, "ours-fp32": {"precision": "fp32"}, "ours-bf16": {"precision": "bf16"},
            "ours-packed": {"packing": True}, "ours-no-grouping": {"group_by_length": False}}
MIX_SEED = 0


def make_mix(examples: int, held_out: int, workdir: Path) -> tuple[Path, Path]:
    """A seeded mix of both sources: `examples` records to train on, `held_out` to evaluate."""
    rng = random.Random(MIX_SEED)
    train, evaluation = [], []
    for name in SOURCES:
        records = json.loads((SHARED / name).read_text())
        picked = rng.sample(records, examples // 2 + held_out // 2)
        train += picked[:examples // 2]
        evaluation += picked[examples // 2:]
    rng.shuffle(train)
    paths = workdir / "train.json", workdir / "eval.json"
    for path, records in zip(paths, (train, evaluation)):
        path.write_text(json.dumps(records))
    return paths


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline(train_path: Path, base_dir: Path, output_dir: Path) -> dict:
    """alpaca-lora's finetune.py, reduced to what matters for speed and result."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from alpaca_tune.base_model import load_tokenizer
    from alpaca_tune.data.prompts import load_template
    from alpaca_tune.data.records import load_records

    tokenizer = load_tokenizer(base_dir)
    template = load_template("alpaca")
    cutoff = HYPER["cutoff_len"]

    def tokenize(record):  # as alpaca-lora: the full text at once, prompt length from a re-tokenization
        prompt = template.render(record.instruction, record.input)
        ids = tokenizer(prompt + record.output, truncation=True, max_length=cutoff)["input_ids"]
        if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff:
            ids.append(tokenizer.eos_token_id)
        prompt_len = len(tokenizer(prompt, truncation=True, max_length=cutoff)["input_ids"])
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [-100] * prompt_len + ids[prompt_len:]}

    dataset = [tokenize(r) for r in load_records(train_path)]
    torch.manual_seed(HYPER["seed"])
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=HYPER["lora_rank"], lora_alpha=HYPER["lora_alpha"],
                                             lora_dropout=HYPER["lora_dropout"], bias="none",
                                             target_modules=HYPER["lora_target_modules"].split(","),
                                             task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    padded_tokens = []

    def counting_collator(features):
        batch = collator(features)
        padded_tokens.append(batch["input_ids"].numel())
        return batch

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=HYPER["train_batch_size"],
        gradient_accumulation_steps=HYPER["gradient_accumulation_steps"],
        num_train_epochs=HYPER["num_train_epochs"], learning_rate=HYPER["learning_rate"],
        warmup_steps=HYPER["warmup_steps"], lr_scheduler_type=HYPER["lr_scheduler"], logging_steps=1,
        optim="adamw_torch", save_strategy="no", eval_strategy="no", report_to=[],
        seed=HYPER["seed"], use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(), disable_tqdm=True)
    # transformers 5 has no group_by_length: the default random sampler is alpaca-lora's order
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(output_dir / "adapter"))
    real = sum(len(d["input_ids"]) for d in dataset)
    return {"seconds": seconds, "real_tokens": real, "padded_tokens": sum(padded_tokens),
            "adapter": str(output_dir / "adapter")}


def run_ours(train_path: Path, base_dir: Path, output_dir: Path, **extra) -> dict:
    from alpaca_tune.settings import TrainSettings
    from alpaca_tune.training.loop import run_training

    settings = TrainSettings(train_data=str(train_path), base_model=str(base_dir), output_dir=str(output_dir),
                             val_set_size=0, logging_steps=1, **{**HYPER, **extra})
    result = run_training(settings)
    if result is None:  # a torchrun rank other than 0
        return {}
    history = result.metrics["history"]
    seconds = history[-1]["elapsed_s"]
    return {"seconds": seconds, "real_tokens": sum(h["tokens"] for h in history),
            "padded_tokens": sum(h["padded_tokens"] for h in history),
            "adapter": str(result.adapter_dir)}


def evaluate_adapter(adapter: str, base_dir: Path, eval_path: Path) -> float:
    """One evaluator for both: mean loss per response token on the held-out records."""
    import torch

    from alpaca_tune.base_model import load_causal_lm, load_tokenizer
    from alpaca_tune.data.prompts import load_template
    from alpaca_tune.data.records import load_records
    from alpaca_tune.data.tokenization import tokenize_records
    from alpaca_tune.serving.transformers_decoder import load_adapter
    from alpaca_tune.training.steps import evaluate

    model = load_causal_lm(base_dir, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(base_dir)
    model = load_adapter(model, Path(adapter)).get_base_model()
    examples, _ = tokenize_records(load_records(eval_path), load_template("alpaca"), tokenizer,
                                   HYPER["cutoff_len"], False)
    return evaluate(model, examples, 4, False, tokenizer.pad_token_id, model.device)


def child(variant: str, train_path: Path, eval_path: Path, base_dir: Path, output_dir: Path) -> None:
    import torch

    torch.manual_seed(0)
    if variant == "baseline":
        result = run_baseline(train_path, base_dir, output_dir)
    elif variant.startswith("ours-nproc"):
        accumulation = HYPER["gradient_accumulation_steps"] // int(variant.removeprefix("ours-nproc"))
        result = run_ours(train_path, base_dir, output_dir, gradient_accumulation_steps=accumulation)
        if not result:
            return
    else:
        result = run_ours(train_path, base_dir, output_dir, **VARIANTS.get(variant, {}))
    result["peak_rss_mb"] = round(peak_rss_mb())
    result["eval_loss"] = evaluate_adapter(result["adapter"], base_dir, eval_path)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=128, help="training records (half from each source)")
    parser.add_argument("--held_out", type=int, default=32, help="evaluation records")
    parser.add_argument("--base_model", default="", help="default: the embedded SmolLM2")
    parser.add_argument("--variants", default="baseline,ours,ours-fp32",
                        help=f"comma-separated: baseline, {', '.join(VARIANTS)}, ours-no-<fast path>")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, the order reversed each round (A B, B A, ...), "
                             "so that a machine whose speed drifts slows each variant alike")
    parser.add_argument("--nproc", type=int, default=0,
                        help="also run ours on this many torchrun processes (variant ours-nprocN)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from alpaca_tune.base_model import resolve_base_dir

    base_dir = resolve_base_dir(args.base_model)
    if args.child:
        workdir = Path(args.workdir)
        child(args.child, workdir / "train.json", workdir / "eval.json", base_dir, workdir / args.child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    make_mix(args.examples, args.held_out, workdir)
    variants = args.variants.split(",") + ([f"ours-nproc{args.nproc}"] if args.nproc > 1 else [])
    from alpaca_tune.training.fast_paths import NAMES

    def known(variant: str) -> bool:
        if variant.startswith("ours-no-"):
            return set(variant.removeprefix("ours-no-").split("+")) <= set(NAMES)
        return variant in {"baseline", *VARIANTS} or (variant.startswith("ours-nproc")
                                                      and variant.removeprefix("ours-nproc").isdigit())

    if unknown := [v for v in variants if not known(v)]:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: baseline, {', '.join(VARIANTS)}, "
                 f"ours-no-<{'|'.join(NAMES)}>[+<...>]")
    runs = {variant: [] for variant in variants}  # one result per round
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            print(f"== {variant} (round {round_ + 1}/{args.rounds}) ...", flush=True)
            runs[variant].append(run_child(variant, workdir, base_dir))
    from alpaca_tune import device

    print(f"\nmachine: {device.describe_line()}")
    print(f"data: {' + '.join(SOURCES)} from ../shared/data, seed {MIX_SEED}")
    print(f"base {base_dir.name}, {args.examples} training / {args.held_out} held-out records, "
          f"{HYPER['train_batch_size']}x{HYPER['gradient_accumulation_steps']} batch, cutoff {HYPER['cutoff_len']}; "
          f"{args.rounds} round(s): tokens/s over all rounds' tokens and seconds")
    print(f"{'variant':10} {'tokens/s':>9} {'padding':>8} {'peak RSS':>9} {'eval loss':>10} {'seconds':>8}"
          "  tokens/s per round")
    results = {name: summarize(rounds) for name, rounds in runs.items()}
    for name, r in results.items():
        print(f"{name:10} {r['tokens_per_s']:9.1f} {r['padding']:8.1%} {r['peak_rss_mb']:7.0f}MB "
              f"{r['eval_loss']:10.4f} {r['seconds']:8.1f}  " + " ".join(f"{t:.1f}" for t in r["per_round"]))
    for name in [n for n in results if n.startswith("ours-nproc") and "ours" in results]:
        per_round = [n / o for n, o in zip(results[name]["per_round"], results["ours"]["per_round"])]
        print(f"\n{name} / ours (tokens/s): {results[name]['tokens_per_s'] / results['ours']['tokens_per_s']:.2f}x "
              f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)}); eval loss "
              f"{results[name]['eval_loss'] / results['ours']['eval_loss'] - 1:+.2%}")
    if {"baseline", "ours"} <= set(results):
        b, o = results["baseline"], results["ours"]
        per_round = [ours / base for ours, base in zip(o["per_round"], b["per_round"])]
        print(f"\nspeed-up (tokens/s, ours / baseline): {o['tokens_per_s'] / b['tokens_per_s']:.2f}x "
              f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)}); "
              f"eval loss ours vs baseline: {o['eval_loss'] / b['eval_loss'] - 1:+.2%}")


def run_child(variant: str, workdir: Path, base_dir: Path) -> dict:
    """One variant in its own process (its own peak RSS): its RESULT line."""
    from alpaca_tune.training.fast_paths import OFF_ENV

    env = dict(os.environ)
    if variant.startswith("ours-no-"):
        env[OFF_ENV] = variant.removeprefix("ours-no-").replace("+", ",")
    launch = [sys.executable]
    if variant.startswith("ours-nproc"):
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={variant.removeprefix('ours-nproc')}"]
    out = subprocess.run([*launch, __file__, "--child", variant, "--workdir", str(workdir),
                          "--base_model", str(base_dir)], capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summarize(rounds: list[dict]) -> dict:
    """A variant over its rounds: tokens/s over all tokens and seconds, the highest peak RSS, the
    mean eval loss (seeded runs give the same adapter each round), and each round's tokens/s."""
    real, padded, seconds = (sum(r[key] for r in rounds) for key in ("real_tokens", "padded_tokens", "seconds"))
    return {"tokens_per_s": real / seconds, "padding": 1 - real / padded, "seconds": seconds / len(rounds),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
            "eval_loss": sum(r["eval_loss"] for r in rounds) / len(rounds),
            "per_round": [r["real_tokens"] / r["seconds"] for r in rounds]}


if __name__ == "__main__":
    main()
