"""train.py under torchrun on CPU (gloo): 2 processes give the 1-process adapter, a killed 2-process
run resumes (on 2 or on 1 process) to the uninterrupted adapter, and a rank that dies ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RECORDS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # each launch starts Python + torch in every process


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "data.json"
    path.write_text(json.dumps(TINY_RECORDS * 5))  # 20 records: 18 train, 2 validation
    return path


def command(data, base, out, nproc: int, accumulation: int, *extra: str) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launch, str(ROOT / "train.py"), "--train_data", str(data), "--base_model", str(base),
            "--output_dir", str(out), "--train_batch_size", "2", "--gradient_accumulation_steps", str(accumulation),
            "--lora_dropout", "0", "--precision", "fp32", "--learning_rate", "3e-3", "--warmup_steps", "0",
            "--val_set_size", "2", "--logging_steps", "1", *extra]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict, tolerance: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance


def test_two_processes_equal_one_with_the_same_effective_batch(tmp_path, data, tiny_model_dir):
    two = run(command(data, tiny_model_dir, tmp_path / "two", 2, 1, "--max_steps", "6"))
    run(command(data, tiny_model_dir, tmp_path / "one", 1, 2, "--max_steps", "6"))
    assert_same(adapter(tmp_path / "two"), adapter(tmp_path / "one"))
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one")]
    assert metrics[0]["final_eval_loss"] == pytest.approx(metrics[1]["final_eval_loss"], abs=1e-6)
    assert [h["tokens"] for h in metrics[0]["history"]] == [h["tokens"] for h in metrics[1]["history"]]
    assert "2 x 1 accumulation x 2 process(es) = 4 examples per step" in two.stderr
    assert two.stdout.count("adapter archive:") == 1  # rank 0 alone writes and reports
    untouched = load_file(str(tiny_model_dir / "model.safetensors"))
    assert untouched  # the base is read, never written


def test_killed_two_process_run_resumes_to_the_uninterrupted_adapter(tmp_path, data, tiny_model_dir):
    steps = ["--max_steps", "40", "--save_steps", "2"]
    uninterrupted = tmp_path / "uninterrupted"
    run(command(data, tiny_model_dir, uninterrupted, 1, 2, *steps))

    killed = tmp_path / "killed"
    job = subprocess.Popen(command(data, tiny_model_dir, killed, 2, 1, *steps), cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-000004").is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoints"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks, at once
    job.wait()
    assert not (killed / "adapter.tar.gz").exists()
    saved = sorted(p for p in (killed / "checkpoints").iterdir() if not p.name.endswith(".partial"))
    last = saved[-1]
    assert last.name < "step-000040"

    run(command(data, tiny_model_dir, tmp_path / "resumed2", 2, 1, *steps, "--resume_from_checkpoint", str(last)))
    assert_same(adapter(tmp_path / "resumed2"), adapter(uninterrupted))
    # written by 2 processes, resumed on 1 with the same micro-batches per step
    run(command(data, tiny_model_dir, tmp_path / "resumed1", 1, 2, *steps, "--resume_from_checkpoint", str(last)))
    assert_same(adapter(tmp_path / "resumed1"), adapter(uninterrupted))

    refused = subprocess.run(command(data, tiny_model_dir, tmp_path / "refused", 1, 1, *steps,
                                     "--resume_from_checkpoint", str(last)),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "made with 2 micro-batches per step (2 process(es) x 1 accumulation); this run takes 1" in refused.stderr


def test_a_rank_that_dies_stops_the_job_and_is_named(tmp_path, data, tiny_model_dir):
    import psutil

    job = subprocess.Popen(command(data, tiny_model_dir, tmp_path / "out", 2, 1, "--max_steps", "100000",
                                   "--logging_steps", "1000"),
                           cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        rank1 = None
        while rank1 is None:
            assert job.poll() is None and time.monotonic() < deadline
            for child in psutil.Process(job.pid).children():
                try:
                    if child.environ().get("RANK") == "1" and child.cpu_times().user > 3:  # training by now
                        rank1 = child
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        rank1.kill()
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "rank      : 1" in stderr and "Signal 9 (SIGKILL)" in stderr
    assert not (tmp_path / "out" / "adapter.tar.gz").exists()


def test_cog_train_with_num_devices_starts_torchrun_itself(tmp_path, data, tiny_model_dir, monkeypatch):
    """train() as Cog calls it, num_devices=2 on CPU: torchrun is started on train.py, and the
    archive holds the adapter a 1-process run with twice the accumulation gives."""
    import tarfile
    import tempfile

    from cog import Path as CogPath

    import train

    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    inputs = dict(max_steps=4, train_batch_size=2, lora_dropout=0.0, precision="fp32", learning_rate=3e-3,
                  warmup_steps=0, val_set_size=2.0)
    output = train.train(train_data=CogPath(data), num_devices=2, gradient_accumulation_steps=1, **inputs)
    with tarfile.open(output.weights) as tar:
        tar.extractall(tmp_path / "two", filter="data")
    run(command(data, tiny_model_dir, tmp_path / "one", 1, 2, "--max_steps", "4"))
    assert_same(adapter(tmp_path / "two"), adapter(tmp_path / "one"))


def test_fsdp_sharded_layers_give_the_one_process_adapter(tmp_path, data, tiny_model_dir):
    """sharding=fsdp: each decoder layer an FSDP2 unit over 2 gloo processes; the adapter gathered on
    rank 0 equals a 1-process run's, through an epoch's short last step (one rank idle) too."""
    sharded = run(command(data, tiny_model_dir, tmp_path / "fsdp", 2, 1, "--max_steps", "11", "--sharding", "fsdp"))
    run(command(data, tiny_model_dir, tmp_path / "one", 1, 2, "--max_steps", "11"))
    assert_same(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"))
    assert "FSDP2: 2 decoder layers sharded over 2 processes" in sharded.stderr
    lora = adapter(tmp_path / "one")  # only the adapter is gathered, never the frozen base
    assert f"gathered onto rank 0: {len(lora)} trained tensors" in sharded.stderr
    config = json.loads((tmp_path / "fsdp" / "training_config.json").read_text())
    assert config["ran"]["sharding"] == "fsdp" and config["ran"]["processes"] == 2


def test_fsdp_checkpoints_resume_sharded_and_unsharded_to_the_same_adapter(tmp_path, data, tiny_model_dir):
    """A sharded run's checkpoint (weights and AdamW moments gathered onto rank 0) resumes on 2
    sharded processes and on 1 process without sharding, both to the uninterrupted adapter."""
    steps = ["--max_steps", "8", "--save_steps", "2", "--lora_target_modules", "q_proj,v_proj,down_proj"]
    whole = tmp_path / "whole"
    run(command(data, tiny_model_dir, whole, 2, 1, *steps, "--sharding", "fsdp"))
    checkpoint = whole / "checkpoints" / "step-000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    moments = load_file(str(checkpoint / "optimizer.safetensors"))
    assert len([k for k in moments if k.endswith(".exp_avg")]) == len(adapter(whole))  # every LoRA weight's
    run(command(data, tiny_model_dir, tmp_path / "sharded", 2, 1, *steps, "--sharding", "fsdp",
                "--resume_from_checkpoint", str(checkpoint)))
    assert_same(adapter(tmp_path / "sharded"), adapter(whole))
    run(command(data, tiny_model_dir, tmp_path / "one", 1, 2, *steps, "--resume_from_checkpoint", str(checkpoint)))
    assert_same(adapter(tmp_path / "one"), adapter(whole))
