"""Adapters are checked against the base before use: each way of being broken is a message naming
the adapter and the field or tensor, and real PEFT adapters (plain, DoRA, modules_to_save) pass."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alpaca_tune.adapter_check import AdapterError, check_adapter
from alpaca_tune.base_model import weight_shapes

ROOT = Path(__file__).resolve().parent.parent


def _peft_adapter(tiny_model_dir, directory: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = get_peft_model(base, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                               **config}))
    with torch.no_grad():  # a trained-looking adapter: B is not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return _peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def broken(adapter, tmp_path):
    """A copy of the adapter to break."""
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy


def _edit_config(directory: Path, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_a_real_adapter_passes(adapter, tiny_model_dir):
    assert check_adapter(adapter, weight_shapes(tiny_model_dir))["r"] == 8


@pytest.mark.parametrize("config", [
    {"use_dora": True},
    {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    {"rank_pattern": {"v_proj": 4}},
])
def test_other_peft_adapters_pass(config, tiny_model_dir, tmp_path):
    directory = _peft_adapter(tiny_model_dir, tmp_path / "adapter", **config)
    check_adapter(directory, weight_shapes(tiny_model_dir))


def _break_config_array(d):
    (d / "adapter_config.json").write_text("[1, 2]")


def _truncate_weights(d):
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("damage, message", [
    (_break_config_array, r"adapter_config.json: must be a JSON object, is a JSON list"),
    (lambda d: (d / "adapter_config.json").write_text("{"), r"adapter_config.json: not UTF-8 JSON"),
    (lambda d: _edit_config(d, r=16), r"tensor '.*lora_A.weight' has shape \(8, 64\); the base's .* and r=16 in "
                                      r"adapter_config.json need \(16, 64\)"),
    (lambda d: _edit_config(d, r="8"), r"field 'r' must be a positive integer, is '8'"),
    (lambda d: _edit_config(d, lora_alpha=None), r"field 'lora_alpha' must be a positive number"),
    (lambda d: _edit_config(d, target_modules=None), r"field 'target_modules'"),
    (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), r"only LoRA adapters"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(Q_B, t[Q_B][:, :4].contiguous())),
     r"lora_B.weight' has shape \(64, 4\); .* need \(64, 8\)"),
    (lambda d: _edit_tensors(d, lambda t: t[Q_A].fill_(float("nan"))), r"q_proj.lora_A.weight' holds NaN"),
    (lambda d: _edit_tensors(d, lambda t: t[Q_B].__setitem__((0, 0), float("inf"))), r"holds NaN or infinite"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(Q_B)), r"q_proj has no lora_B.weight beside"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(Q_A.replace("layers.0", "layers.7"), t[Q_A].clone())),
     r"adapts 'model.layers.7.self_attn.q_proj', which this base model does not have"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__("something.else", t[Q_A].clone())), r"'something.else' is not a tensor"),
    (_truncate_weights, r"adapter_model.safetensors: not a readable safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors: missing"),
])
def test_broken_adapters_are_named(broken, tiny_model_dir, damage, message):
    damage(broken)
    with pytest.raises(AdapterError, match=message) as err:
        check_adapter(broken, weight_shapes(tiny_model_dir), label="my-adapter.tar.gz")
    assert str(err.value).startswith("my-adapter.tar.gz: adapter_")


def _archive(directory: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(directory, arcname="adapter")
    return target


def test_the_command_line_names_the_archive_and_exits_2(broken, tiny_model_dir, tmp_path):
    _edit_config(broken, r=16)
    archive = _archive(broken, tmp_path / "mine.tar.gz")
    result = subprocess.run([sys.executable, "predict.py", "--prompt", "Hi", "--weights", str(archive),
                             "--base_model", str(tiny_model_dir)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert f"error: {archive}: adapter_model.safetensors: tensor" in result.stderr
    assert "Traceback" not in result.stderr and "/adapter-" not in result.stderr  # no temporary path


def test_a_recorded_template_that_is_a_string_names_the_archive(adapter, tiny_model_dir, tmp_path):
    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.serving.weights import WeightsError

    (tmp_path / "run").mkdir()
    shutil.copytree(adapter, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "training_config.json").write_text(json.dumps({"prompt_template": "alpaca"}))
    archive = tmp_path / "run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "run" / "adapter", arcname="adapter")
        tar.add(tmp_path / "run" / "training_config.json", arcname="training_config.json")
    with pytest.raises(WeightsError, match=rf"^{archive}: training_config.json: field 'prompt_template' must be"):
        InstructModel.load(str(archive), base_model=str(tiny_model_dir))
