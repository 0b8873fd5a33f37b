"""The entry points as a user runs them: python train.py / predict.py, exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RECORDS


def _run(args, env=None, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": ""}]', "record 0: field 'output' is empty"),
    ("not json at all", "not valid JSON"),
])
def test_train_refuses_bad_data_without_traceback(tmp_path, tiny_model_dir, content, message):
    data = tmp_path / "data.json"
    data.write_text(content)
    result = _run(["train.py", "--train_data", str(data), "--base_model", str(tiny_model_dir),
                   "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert message in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "adapter.tar.gz").exists()


@pytest.mark.parametrize("damage, message", [
    ("nested", "nested too deeply to be Alpaca records"),
    ("surrogate", "record 0: field 'output' holds an unpaired surrogate"),
    ("truncated base", "model.safetensors: not a readable safetensors file"),
    ("template path", "not a template name (alpaca, alpaca_short, none) nor an inline JSON template"),
    ("template file", "mine.json: template file: not UTF-8 JSON"),
])
def test_train_names_the_bad_file_exits_2_and_leaves_nothing(tmp_path, tiny_model_dir, damage, message):
    import shutil

    data, base = tmp_path / "data.json", tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data.write_text(json.dumps(TINY_RECORDS))
    extra = []
    if damage == "nested":
        data.write_text("[" * 200_000 + "]" * 200_000)
    elif damage == "surrogate":
        data.write_text('[{"instruction": "a", "output": "b\\ud800"}]')
    elif damage == "truncated base":
        weights = base / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "template path":
        (tmp_path / "mine.json").write_text("{}")
        extra = ["--prompt_template", str(tmp_path / "mine.json")]
    else:
        (tmp_path / "mine.json").write_text("{")
        extra = ["--prompt_template_file", str(tmp_path / "mine.json")]
    out = tmp_path / "runs" / "out"
    result = _run(["train.py", "--train_data", str(data), "--base_model", str(base), "--output_dir", str(out),
                   "--max_steps", "1", *extra])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing made, not even the folders above the output


def test_train_then_predict_from_the_command_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TINY_RECORDS))
    trained = _run(["train.py", "--train_data", str(data), "--base_model", str(tiny_model_dir),
                    "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1",
                    "--val_set_size", "1"])
    assert trained.returncode == 0, trained.stderr
    for needle in ("step 1/2", "loss", "tokens/s", "ETA", "eval loss"):
        assert needle in trained.stderr
    archive = tmp_path / "out" / "adapter.tar.gz"
    assert archive.is_file()
    answered = _run(["predict.py", "--prompt", "Tell me about alpacas.", "--temperature", "0",
                     "--max_new_tokens", "8", "--base_model", str(tiny_model_dir)],
                    env={"COG_WEIGHTS": str(archive)})
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() and "### Response" not in answered.stdout


def test_predict_rejects_out_of_range_flags():
    result = _run(["predict.py", "--prompt", "x", "--temperature", "9"])
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr
