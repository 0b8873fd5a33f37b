"""train() and Predictor.predict() called as plain Python functions, with only some inputs given.

Cog fills in every input's default before calling; a direct call must get the same defaults
rather than Cog's Input objects.
"""

import json
import tempfile

import pytest
from cog import Path
from conftest import TINY_RECORDS, drain

from alpaca_tune.data.records import DataError


@pytest.fixture
def tiny_base(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where train() puts its run
    (tmp_path / "tmp").mkdir()
    return tmp_path


def test_train_then_predict_with_defaults_for_what_is_left_out(tiny_base):
    import predict
    import train

    data = tiny_base / "data.json"
    data.write_text(json.dumps(TINY_RECORDS))
    output = train.train(train_data=Path(data), max_steps=2, val_set_size=0)
    assert output.weights.name == "adapter.tar.gz" and output.weights.is_file()

    predictor = predict.Predictor()
    predictor.setup(str(output.weights))
    answer = "".join(drain(predictor.predict(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=6)))
    assert answer.strip()
    with pytest.raises(TypeError, match="'prompt' is required"):
        drain(predictor.predict(max_new_tokens=3))


def test_train_data_as_a_server_path_is_not_read(tiny_base):
    """Over HTTP coglet hands a plain string through when train_data is no URL or data: URI."""
    import train
    from alpaca_tune.settings import SettingsError

    (tiny_base / "fifo").unlink(missing_ok=True)
    import os

    os.mkfifo(tiny_base / "fifo")  # opening it would block: the test would hang
    for given in ("/etc/passwd", str(tiny_base / "fifo"), str(tiny_base / "missing.json")):
        with pytest.raises(SettingsError, match="^train_data: send the data file itself") as err:
            train.train(train_data=given, max_steps=1)
        assert given not in str(err.value)
    assert list((tiny_base / "tmp").iterdir()) == []


def test_train_with_bad_data_raises_a_clear_error_and_leaves_nothing(tiny_base):
    import train

    data = tiny_base / "data.json"
    data.write_text('[{"instruction": "a", "output": ""}]')
    with pytest.raises(DataError, match=r"record 0: field 'output' is empty"):
        train.train(train_data=Path(data))
    assert list((tiny_base / "tmp").iterdir()) == []


def test_train_with_export_formats_returns_the_exports_in_its_archive(tiny_base):
    """export_formats: the archive holds export/<format>/ beside the adapter; the GGUF LoRA and
    the merged model in it are the trained adapter's."""
    import tarfile

    import train
    from alpaca_tune.settings import SettingsError

    data = tiny_base / "data.json"
    data.write_text(json.dumps(TINY_RECORDS))
    with pytest.raises(SettingsError, match="export_formats='gguf-lora,onnx': onnx unknown"):
        train.train(train_data=Path(data), max_steps=2, val_set_size=0, export_formats="gguf-lora,onnx")
    assert list((tiny_base / "tmp").iterdir()) == []  # refused before anything ran

    output = train.train(train_data=Path(data), max_steps=2, val_set_size=0, learning_rate=1e-2,
                         export_formats="gguf-lora,hf")
    with tarfile.open(output.weights) as tar:
        names = set(tar.getnames())
        tar.extractall(tiny_base / "unpacked", filter="data")
    assert {"adapter/adapter_config.json", "export/gguf-lora/adapter.gguf", "export/hf/model.safetensors",
            "export/hf/config.json", "export/hf/training_config.json"} <= names

    import torch
    from export_fixtures import load_peft_reference, logits
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tiny_base / "unpacked" / "export" / "hf"), dtype=torch.float32)
    reference = load_peft_reference(tiny_base / "unpacked" / "adapter")
    ids = [1, 7, 42, 99]
    assert abs(logits(merged, ids) - logits(reference, ids)).max() < 1e-5
