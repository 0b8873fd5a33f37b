"""Decoding speed: the Predictor's generation vs plain `model.generate`, against the memory bound.

    .venv/bin/python scripts/bench_generate.py                # embedded SmolLM2, 128 new tokens
    .venv/bin/python scripts/bench_generate.py --new_tokens 64 --repeats 2
    .venv/bin/python scripts/prepare_base.py --dtype bfloat16 --output weights/smollm2-bf16
    .venv/bin/python scripts/bench_generate.py --base_model weights/smollm2-bf16   # a bf16 checkpoint

Single-stream greedy decoding is memory-bound: every new token reads every weight once. So the
ceiling is (memory bandwidth) / (weight bytes per token). The bandwidth is measured in the same
run (a large tensor read) just before each timed run, because this shared machine's bandwidth
flips between ~30 and ~50 GB/s from one second to the next. Reported: time to first token
(prompt processing + first token), tokens/s after the first, and the fraction of the bound
reached, each run against its own bound and against the highest bandwidth seen in the run (the
strictest reading); medians over the runs. EOS is ignored so both sides generate exactly the
same count.
With --batch N, more rows: N requests at once through the Predictor's scheduler
(serving/scheduler.py: one batched step a token for all of them), `generate` with N prompts in
one call, and the transformers path (serving/transformers_decoder.py: what a GPU or a non-Llama
model is served by) alone and with N requests through the scheduler (one padded batch a step);
the batch rows report aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_tune import device  # noqa: E402
from alpaca_tune.base_model import load_tokenizer, resolve_base_dir  # noqa: E402
from alpaca_tune.data.prompts import load_template  # noqa: E402
from alpaca_tune.data.tokenization import encode_prompt  # noqa: E402
from alpaca_tune.serving.generation import generate_token_ids  # noqa: E402
from alpaca_tune.serving.instruct import InstructModel  # noqa: E402
from alpaca_tune.serving.sampling import SamplingParams  # noqa: E402
from alpaca_tune.serving.threads import on_a_thread_of_its_own  # noqa: E402
from alpaca_tune.serving.transformers_decoder import TransformersDecoder  # noqa: E402

PROMPT = "Tell me about alpacas, their history in the Andes and how they differ from llamas."


def measure_bandwidth_gbs(buffer: torch.Tensor, repeats: int = 5) -> float:
    """Read bandwidth: summing a buffer far larger than the caches, best of a few runs."""
    time.sleep(0.5)  # OpenBLAS's threads spin for a while after a product and would slow the sum
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes read per decoded token: every parameter once (tied embeddings counted once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def alone(function, *args, **kwargs):
    """function on a thread of its own (in inference mode), which ends with it: every measurement
    then runs as the server runs its model, with no other thread's OpenMP team alive
    (alpaca_tune/serving/threads.py)."""
    def run():
        with torch.inference_mode():
            return function(*args, **kwargs)

    return on_a_thread_of_its_own(run)


def time_ours(decoder, prompt_ids, new_tokens) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    started = time.perf_counter()
    first = None
    count = 0
    for _ in generate_token_ids(decoder, prompt_ids, params, eos_ids=set()):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert count == new_tokens
    return first - started, (count - 1) / (end - first)


def time_ours_batched(served, prompt_ids, new_tokens, batch: int) -> tuple[float, float]:
    """`batch` identical requests submitted together to the Predictor's scheduler: (time to the
    first chunk of the first, aggregate tokens/s after it)."""
    scheduler = served.batching(batch)
    scheduler.eos_ids = frozenset()  # EOS ignored, as in the other rows
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    try:
        started = time.perf_counter()
        streams = [scheduler.submit(prompt_ids, params, []) for _ in range(batch)]
        chunks = iter(streams[0])
        next(chunks)
        first = time.perf_counter()
        for stream in [chunks, *streams[1:]]:
            list(stream)
        end = time.perf_counter()
    finally:
        scheduler.close()
    assert all(stream.output_tokens == new_tokens for stream in streams)
    return first - started, batch * (new_tokens - 1) / (end - first)


def time_hf(model, prompt_ids, new_tokens, batch: int = 1) -> tuple[float, float]:
    ids = torch.tensor([prompt_ids] * batch, device=model.device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = time.perf_counter() - started
    assert out.shape[1] - ids.shape[1] == new_tokens
    return ttft, batch * (new_tokens - 1) / (total - ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base_model", default="")
    parser.add_argument("--batch", type=int, default=8,
                        help="requests at once in the batch rows (ours through the scheduler, generate in one "
                             "call; 0: no batch rows)")
    parser.add_argument("--prompt_tokens", type=int, default=0,
                        help="repeat the instruction until the prompt has at least this many tokens, to time "
                             "decoding at a long context (the bound still counts weights only)")
    args = parser.parse_args()

    # ours: the model exactly as the Predictor serves it (LeanLlama on CPU); theirs: transformers'
    served = InstructModel.load(None, base_model=args.base_model)
    base_dir = resolve_base_dir(args.base_model)
    model, tokenizer = alone(TransformersDecoder.load, base_dir).model, load_tokenizer(base_dir)
    template, repeats = load_template("alpaca"), 1
    prompt_ids = encode_prompt(tokenizer, template.render(PROMPT))
    while len(prompt_ids) < args.prompt_tokens:
        repeats += 1
        prompt_ids = encode_prompt(tokenizer, template.render(" ".join([PROMPT] * repeats)))
    # correctness first: both sides produce the same greedy tokens
    ours_tokens = alone(lambda: list(generate_token_ids(served.decoder, prompt_ids,
                                                        SamplingParams(max_new_tokens=32, temperature=0.0), set())))
    hf_tokens = alone(model.generate, torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert ours_tokens == hf_tokens, "greedy tokens differ from transformers' generate"

    # Each decoder against the bytes it reads: transformers' model is fp32 on CPU, while ours keeps
    # a bf16/fp16 checkpoint in its dtype (the same bytes for the embedded fp32 SmolLM2).
    per_token = weight_bytes(model)
    ours_per_token = getattr(served.decoder, "weight_bytes", per_token)
    reads = {"ours": ours_per_token}  # the others read `per_token`
    buffer = alone(torch.ones, 1024 * 1024 * 1024 // 4, dtype=torch.float32)  # 1 GB, far beyond the caches

    def bound(gbs: float, weight_bytes_read: int = per_token) -> float:
        return gbs * 1e9 / weight_bytes_read  # tokens/s

    rows, bandwidths = {}, []
    hf_batch = functools.partial(time_hf, batch=args.batch)
    decoders = [("ours", time_ours, served.decoder), ("hf-generate", time_hf, model)]
    if args.batch:
        via_transformers = InstructModel(TransformersDecoder(model), tokenizer, None)
        decoders += [(f"ours x{args.batch}", functools.partial(time_ours_batched, batch=args.batch), served),
                     (f"hf-generate x{args.batch}", hf_batch, model),
                     ("tf-path", time_ours, via_transformers.decoder),
                     (f"tf-path x{args.batch}", functools.partial(time_ours_batched, batch=args.batch),
                      via_transformers)]
    for name, timer, subject in decoders:
        alone(timer, subject, prompt_ids, 8)  # warm-up
        runs = []
        for _ in range(args.repeats):
            bandwidths.append(alone(measure_bandwidth_gbs, buffer))
            ttft, rate = alone(timer, subject, prompt_ids, args.new_tokens)
            runs.append((ttft, rate, rate / bound(bandwidths[-1], reads.get(name, per_token))))
        rows[name] = tuple(statistics.median(run[i] for run in runs) for i in range(3))
    print(f"machine: {device.describe_line()}")
    print(f"model {model.config.architectures[0]} {per_token / 1e6:.0f} MB of weights ({model.dtype}), "
          f"prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    if ours_per_token != per_token:
        print(f"ours reads {ours_per_token / 1e6:.0f} MB a token (weights kept in the checkpoint's dtype)")
    low, high = min(bandwidths), max(bandwidths)
    print(f"memory bandwidth (read) {low:.1f}-{high:.1f} GB/s -> bound {bound(low):.1f}-{bound(high):.1f} "
          f"tokens/s for {per_token / 1e6:.0f} MB (measured before each run)")
    # "of bound": each run against the bandwidth measured just before it; "of peak": against the
    # highest bandwidth seen in this run, the strictest reading of a drifting machine
    print(f"{'decoder':16} {'TTFT':>8} {'tokens/s':>9} {'of bound':>9} {'of peak':>8}")
    for name, (ttft, rate, share) in rows.items():
        shown = f"{share:9.0%} {rate / bound(high, reads.get(name, per_token)):8.0%}" if "x" not in name else f"{'(batch)':>9}"
        print(f"{name:16} {ttft * 1000:6.0f}ms {rate:9.1f} {shown}")
    print(f"\nours / hf-generate: {rows['ours'][1] / rows['hf-generate'][1]:.2f}x tokens/s")
    if args.batch:
        batched = rows[f"ours x{args.batch}"][1]
        print(f"ours x{args.batch} / ours: {batched / rows['ours'][1]:.2f}x aggregate tokens/s; "
              f"ours x{args.batch} / hf-generate x{args.batch}: {batched / rows[f'hf-generate x{args.batch}'][1]:.2f}x")
        tf_batched = rows[f"tf-path x{args.batch}"][1]
        print(f"tf-path x{args.batch} / tf-path: {tf_batched / rows['tf-path'][1]:.2f}x aggregate tokens/s; "
              f"tf-path x{args.batch} / hf-generate x{args.batch}: "
              f"{tf_batched / rows[f'hf-generate x{args.batch}'][1]:.2f}x")


if __name__ == "__main__":
    main()
