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
def test_every_setting_is_a_cog_input_of_the_entry_point(entry, cls, required):
    """The signatures are written by hand: a setting added without its parameter (or with another
    type, or out of order, which reorders the API's inputs) fails here."""
    import importlib

    module_name, attr = entry.split(":")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    params = _cog_params(target)
    fields = fields_of(cls, cog_only=True)
    assert required <= set(params)
    assert list(params) == [f.name for f in fields]
    for field in fields:
        annotation = params[field.name].annotation
        expected_type = "Path" if field.name == "train_data" else field.type
        assert getattr(annotation, "__name__", str(annotation)) == expected_type, field.name


def _bounded(cls):
    return [(f.name, f.metadata["ge"], f.metadata["le"], f.type) for f in fields_of(cls)
            if f.metadata["ge"] is not None]


@pytest.mark.parametrize("name, low, high, kind", _bounded(TrainSettings))
def test_every_train_bound_is_enforced_on_the_command_line(name, low, high, kind, capsys):
    """Each bound holds at its value and fails one step past it, with the flag's name."""
    step = 1 if kind == "int" else 1e-9 * max(1.0, abs(high))
    base = ["--train_data", "x.json"] if name != "train_data" else []
    for value in (low, high):
        assert getattr(parse_args(TrainSettings, base + [f"--{name}={value}"], "t"), name) == value
    for value in (low - step, high + step):
        with pytest.raises(SystemExit):
            parse_args(TrainSettings, base + [f"--{name}={value!r}"], "t")
        assert f"{name}={value!r}: must be" in capsys.readouterr().err


@pytest.mark.parametrize("name, low, high, kind", _bounded(GenerateSettings))
def test_every_generate_bound_is_enforced(name, low, high, kind):
    step = 1 if kind == "int" else 1e-9 * max(1.0, abs(high))
    for value in (low, high):
        validate(dataclasses.replace(GenerateSettings(prompt="hi"), **{name: value}))
    for value in (low - step, high + step):
        with pytest.raises(SettingsError, match=f"{name}="):
            validate(dataclasses.replace(GenerateSettings(prompt="hi"), **{name: value}))


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
    ({"prompt": "hi \ud800"}, r"prompt: holds an unpaired surrogate"),
    ({"stop_sequences": "\udfff"}, r"stop_sequences: holds an unpaired surrogate"),
])
def test_validate_names_the_setting(change, message):
    settings = dataclasses.replace(GenerateSettings(prompt="hi"), **change)
    with pytest.raises(SettingsError, match=message):
        validate(settings)


def test_choices_are_enforced():
    with pytest.raises(SettingsError, match="quantization='2bit'"):
        validate(TrainSettings(train_data="x", quantization="2bit"))
