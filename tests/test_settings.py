import dataclasses
import inspect

import pytest

from alpaca_tune.settings import (
    GenerateSettings,
    SettingsError,
    TrainSettings,
    fields_of,
    parse_args,
    validate,
)

REQUIRED_TRAIN_INPUTS = {"train_data", "num_train_epochs", "max_steps", "learning_rate", "train_batch_size",
                         "gradient_accumulation_steps", "cutoff_len", "val_set_size", "lora_rank", "lora_alpha",
                         "lora_dropout", "lora_target_modules", "train_on_inputs", "prompt_template", "seed"}
REQUIRED_PREDICT_INPUTS = {"prompt", "input", "max_new_tokens", "temperature", "top_p", "top_k",
                           "repetition_penalty", "stop_sequences", "seed", "prompt_template"}


def _cog_params(function):
    return {name: p for name, p in inspect.signature(function).parameters.items() if name != "self"}


@pytest.mark.parametrize("entry, cls, required", [
    ("train:train", TrainSettings, REQUIRED_TRAIN_INPUTS),
    ("predict:Predictor.predict", GenerateSettings, REQUIRED_PREDICT_INPUTS),
])
def test_cog_inputs_mirror_the_settings(entry, cls, required):
    """One source of truth: every Cog input is a settings field with the same type, default and range."""
    import importlib

    module_name, attr = entry.split(":")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    params = _cog_params(target)
    fields = {f.name: f for f in fields_of(cls, cog_only=True)}
    assert required <= set(params)
    assert set(params) == set(fields)
    for name, param in params.items():
        field, cog_input = fields[name], param.default
        expected_type = "Path" if name == "train_data" else field.type
        assert getattr(param.annotation, "__name__", str(param.annotation)) == expected_type, name
        if field.default is not dataclasses.MISSING:
            assert cog_input.default == field.default, name
        assert cog_input.description == field.metadata["help"], name
        assert cog_input.ge == field.metadata["ge"] and cog_input.le == field.metadata["le"], name
        assert cog_input.choices == field.metadata["choices"], name
        assert cog_input.min_length == field.metadata["min_length"], name


def test_cli_uses_the_same_names_and_defaults():
    settings = parse_args(TrainSettings, ["--train_data", "x.json", "--lora_rank", "16",
                                          "--train_on_inputs", "true"], "t")
    assert settings.lora_rank == 16 and settings.train_on_inputs is True
    assert settings.learning_rate == TrainSettings(train_data="x").learning_rate


def test_cli_rejects_out_of_range_with_the_flag_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(TrainSettings, ["--train_data", "x.json", "--lora_rank", "0"], "t")
    assert exit_info.value.code == 2
    assert "lora_rank=0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"prompt": ""}, "prompt: a value is required|prompt: must be at least 1"),
])
def test_validate_names_the_setting(change, message):
    settings = dataclasses.replace(GenerateSettings(prompt="hi"), **change)
    with pytest.raises(SettingsError, match=message):
        validate(settings)


def test_choices_are_enforced():
    with pytest.raises(SettingsError, match="quantization='2bit'"):
        validate(TrainSettings(train_data="x", quantization="2bit"))
