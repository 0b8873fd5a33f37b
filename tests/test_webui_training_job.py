"""The page's training job on its own: train.py in a child, its step lines parsed, Cancel = Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import TINY_RECORDS

from alpaca_tune.webui.training_job import TrainingJob

pytestmark = pytest.mark.slow  # a real train.py run in a child process


def wait(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


# A stand-in for train.py that writes into its output folder, removes it on Ctrl-C, and drops
# the first `argv[2]` Ctrl-Cs (as Python drops a KeyboardInterrupt raised inside a finalizer);
# -1: it never heeds one.
STUBBORN = """
import pathlib, shutil, signal, sys, time
out, drops = pathlib.Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(); (out / "partial").write_text("x")
dropped = 0
def on_interrupt(number, frame):
    global dropped
    dropped += 1
    if drops < 0 or dropped <= drops:
        return
    raise KeyboardInterrupt
signal.signal(signal.SIGINT, on_interrupt)
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    shutil.rmtree(out)
    raise
"""


def stubborn_job(tmp_path, drops: int) -> TrainingJob:
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", STUBBORN, str(out), str(drops)])
    job = TrainingJob(out, process, made_output_dir=True)
    wait(lambda: out.exists() and (out / "partial").exists(), 30)
    return job


def test_a_job_reports_steps_and_cancel_leaves_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TINY_RECORDS * 4))
    arguments = {"train_data": str(data), "base_model": str(tiny_model_dir), "max_steps": 100000,
                 "logging_steps": 1, "val_set_size": 0, "save_steps": 0}
    job = TrainingJob.start(arguments, tmp_path / "out")
    wait(lambda: len(job.steps) >= 3)
    assert job.total_steps == 100000 and job.steps[0][0] == 1 and job.status().startswith("training: step")
    assert 0 < job.fraction() < 0.01
    job.cancel()
    assert not job.running and job.status() == "cancelled; nothing was kept" and job.archive is None
    assert not (tmp_path / "out").exists()  # train.py removed what it had written


def test_a_finished_job_offers_its_archive(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TINY_RECORDS * 4))
    job = TrainingJob.start({"train_data": str(data), "base_model": str(tiny_model_dir), "max_steps": 3,
                             "logging_steps": 1, "val_set_size": 0}, tmp_path / "out")
    wait(lambda: not job.running)
    assert job.archive == tmp_path / "out" / "adapter.tar.gz" and job.status().startswith("done")
    assert [step for step, _ in job.steps] == [1, 2, 3] and job.fraction() == 1.0


def test_a_failed_job_says_why(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a", "output": ""}]')
    job = TrainingJob.start({"train_data": str(data), "base_model": str(tiny_model_dir)}, tmp_path / "out")
    wait(lambda: not job.running)
    assert "field 'output' is empty" in job.status() and job.archive is None


def test_cancel_asks_again_when_a_ctrl_c_is_dropped(tmp_path):
    job = stubborn_job(tmp_path, drops=2)
    started = time.monotonic()
    job.cancel()
    assert not job.running and job.process.returncode != 0 and time.monotonic() - started < 15
    assert job.status() == "cancelled; nothing was kept" and not job.output_dir.exists()  # its own cleanup ran


def test_cancel_kills_a_run_that_never_heeds_ctrl_c_and_removes_its_output(tmp_path):
    job = stubborn_job(tmp_path, drops=-1)
    job.cancel(grace=3)
    assert not job.running and job.process.returncode == -9
    assert job.status() == "cancelled; nothing was kept" and not job.output_dir.exists()
