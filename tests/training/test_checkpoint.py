"""Resuming from a checkpoint that does not fit the run, or is damaged, is a message, not a traceback."""

import dataclasses
import json

import pytest
from conftest import TINY_RECORDS

from alpaca_tune.settings import TrainSettings
from alpaca_tune.training.checkpoint import CheckpointError
from alpaca_tune.training.loop import run_training


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_model_dir):
    """A short run that saved a checkpoint at step 2, and its settings."""
    directory = tmp_path_factory.mktemp("checkpointed")
    data = directory / "train.json"
    data.write_text(json.dumps(TINY_RECORDS * 2))
    settings = TrainSettings(train_data=str(data), base_model=str(tiny_model_dir),
                             output_dir=str(directory / "run"), max_steps=3, save_steps=2,
                             train_batch_size=2, gradient_accumulation_steps=1, val_set_size=0,
                             lora_rank=4, lora_alpha=8, warmup_steps=0, seed=1)
    run = run_training(settings)
    return settings, run.output_dir / "checkpoints" / "step-000002"


def _resume(settings, checkpoint, tmp_path, **change):
    return run_training(dataclasses.replace(settings, output_dir=str(tmp_path / "resumed"),
                                            resume_from_checkpoint=str(checkpoint), **change))


def _contents(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def unchanged(tmp_path):
    """Asserts, after the test, that a failed resume wrote nothing and left the checkpoint as it was."""
    watched = {}
    yield watched
    for checkpoint, before in watched.items():
        assert _contents(checkpoint) == before
    assert not (tmp_path / "resumed").exists()


def test_the_checkpoint_resumes(checkpointed, tmp_path):
    settings, checkpoint = checkpointed
    resumed = _resume(settings, checkpoint, tmp_path)
    assert [h["step"] for h in resumed.metrics["history"]] == [1, 2, 3]  # steps 1-2 from the checkpoint


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": 8}, r"lora_A.weight has shape \(4, 64\), this run's LoRA has \(8, 64\): resume with the "
                       r"lora_rank"),
    ({"lora_target_modules": "q_proj"}, "unexpected .*v_proj.*resume with the checkpoint's lora_target_modules"),
])
def test_other_lora_settings_are_refused_by_name(checkpointed, tmp_path, unchanged, change, message):
    settings, checkpoint = checkpointed
    unchanged[checkpoint] = _contents(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        _resume(settings, checkpoint, tmp_path, **change)


def _nan_adapter(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({name: value.fill_(float("nan")) for name, value in tensors.items()}, str(path))


@pytest.mark.parametrize("damage, message", [
    ("adapter/adapter_model.safetensors", "adapter_model.safetensors: cannot read the checkpoint's tensors"),
    (("adapter/adapter_model.safetensors", _nan_adapter), r"step-000002'?: adapter: adapter_model.safetensors: "
                                                           r"tensor .* holds NaN"),
    (("adapter/adapter_config.json", lambda p: p.write_text("[]")), "adapter_config.json: must be a JSON object"),
    (("trainer_state.json", lambda p: p.write_text('{"step": "x"}')), "trainer_state.json: not a readable"),
    ("optimizer.safetensors", "optimizer.safetensors: cannot read the checkpoint's tensors"),
    ("rng.safetensors", "rng.safetensors: cannot read the checkpoint's tensors"),
    ("trainer_state.json", "trainer_state.json: not a readable trainer state"),
])
def test_a_damaged_file_is_named(checkpointed, tmp_path, unchanged, damage, message):
    import shutil

    settings, original = checkpointed
    checkpoint = tmp_path / "step-000002"
    shutil.copytree(original, checkpoint)
    name, edit = damage if isinstance(damage, tuple) else (damage, None)
    path = checkpoint / name
    if edit is None:  # truncated
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        edit(path)
    unchanged[checkpoint] = _contents(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        _resume(settings, checkpoint, tmp_path)


def test_a_folder_that_is_no_checkpoint(checkpointed, tmp_path):
    settings, _ = checkpointed
    with pytest.raises(CheckpointError, match="no trainer_state.json there; expected a directory like"):
        _resume(settings, tmp_path, tmp_path)
