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
