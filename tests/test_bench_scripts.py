"""The benchmark scripts still run and still check what they compare (tiny models: never timings)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA


def run_script(*args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_generate_checks_equal_tokens_and_reports_both_decoders(tiny_model_dir):
    out = run_script("scripts/bench_generate.py", "--base_model", str(tiny_model_dir), "--new_tokens", "6",
                     "--repeats", "1", "--batch", "2")
    assert "memory bandwidth (read)" in out and "ours / hf-generate:" in out
    assert all(name in out for name in ("ours", "hf-generate", "ours x2", "hf-generate x2"))
    assert "ours x2 / ours:" in out


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "alpaca_data_sample.json").exists(), reason="needs ../shared/data")
def test_bench_serve_drives_the_real_server_at_each_concurrency(tiny_model_dir):
    out = run_script("scripts/bench_serve.py", "--base_model", str(tiny_model_dir), "--concurrency", "1,3",
                     "--round", "6", "--max_new_tokens", "6")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "6", "0"), ("3", "6", "0")]  # clients, requests, failed
    assert all(int(row[4]) > 0 for row in rows)  # tokens the server counted
    assert rows[0][4] == rows[1][4]  # the same greedy predictions in both rounds: the same tokens
    in_flight = [float(row[-1]) for row in rows]  # requests at once, on average over the round
    assert 0 < in_flight[0] <= 1.0 < in_flight[1] <= 3.0
    out = run_script("scripts/bench_serve.py", "--base_model", str(tiny_model_dir), "--concurrency", "3",
                     "--round", "6", "--max_new_tokens", "6", "--adapters", "1,3")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[2]) for row in rows] == [("3x1", "0"), ("3x3", "0")]  # every request with its adapter


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_alpaca.json").exists(), reason="needs ../shared/data")
def test_bench_train_runs_both_recipes_on_the_same_data(tiny_model_dir):
    out = run_script("scripts/bench_train.py", "--base_model", str(tiny_model_dir), "--examples", "48",
                     "--held_out", "4", "--variants", "baseline,ours", "--rounds", "2")
    assert "speed-up (tokens/s, ours / baseline):" in out and "(per round: " in out
    order = [line.split()[1] for line in out.splitlines() if line.startswith("== ")]
    assert order == ["baseline", "ours", "ours", "baseline"]  # each round reverses the order
    rows = [line.split() for line in out.splitlines() if line.startswith(("baseline ", "ours "))]
    assert [row[0] for row in rows] == ["baseline", "ours"]
    assert all(float(row[4]) > 0 for row in rows)  # an eval loss for each


@pytest.mark.slow
def test_bench_gpu_tiny_runs_anywhere():
    out = run_script("scripts/bench_gpu.py", "--tiny", "--steps", "1")
    assert "decode" in out.lower()


def test_bench_attention_checks_agreement_and_reports_both():
    out = run_script("scripts/bench_attention.py", "--lengths", "20,70", "--rounds", "1", "--heads", "4",
                     "--kv_heads", "2", "--head_dim", "16")
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [row[0] for row in rows] == ["20", "70"]
    assert all(row[-1].endswith("x") and float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_alpaca.json").exists(), reason="needs ../shared/data")
def test_bench_shared_prefix_times_both_ways_of_the_same_steps(tiny_model_dir):
    out = run_script("scripts/bench_shared_prefix.py", "--base_model", str(tiny_model_dir), "--examples", "32",
                     "--rounds", "1")
    assert "preambles shared in" in out and "token positions" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("tokens/s: whole rows") and last.endswith("x")


@pytest.mark.slow
def test_bench_export_reports_time_and_peak_memory_per_format():
    out = run_script("scripts/bench_export.py", "--layers", "1", "--rank", "4", "--formats", "hf,gguf-lora")
    assert "model: 1 layers of LLaMA-2-7B's shape, bf16" in out
    lines = [line for line in out.splitlines() if line.startswith(("hf", "gguf-lora"))]
    assert len(lines) == 2 and all("peak RSS" in line and "wrote" in line for line in lines)
