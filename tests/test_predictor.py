"""predict.py's Predictor in-process, with an adapter trained here."""

import pytest
from conftest import TINY_RECORDS, drain

from alpaca_tune.serving import weights
from alpaca_tune.settings import TrainSettings
from alpaca_tune.training.loop import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    import json

    directory = tmp_path_factory.mktemp("trained")
    data = directory / "data.json"
    data.write_text(json.dumps(TINY_RECORDS * 4))
    settings = TrainSettings(train_data=str(data), base_model=str(tiny_model_dir), output_dir=str(directory / "out"),
                             max_steps=6, learning_rate=1e-2, train_batch_size=4, gradient_accumulation_steps=1,
                             val_set_size=0, lora_rank=4, prompt_template="alpaca_short", seed=1)
    return run_training(settings)


@pytest.fixture
def predictor_factory(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir))
    from predict import Predictor

    def make(weights):
        predictor = Predictor()
        predictor.setup(weights)
        return predictor
    return make


def _predict(predictor, **inputs):
    """Call predict() as Cog does: every input given, defaults filled in from the Input objects."""
    import inspect

    values = {name: p.default.default for name, p in inspect.signature(predictor.predict).parameters.items()
              if name != "prompt"}
    values.update(inputs)
    answer = predictor.predict(**values)
    assert inspect.iscoroutine(answer)  # async: coglet runs many at once
    return drain(answer)


def _as_weights(trained, form: str) -> str:
    if form == "data-uri":  # what POST /trainings returns, passed on as COG_WEIGHTS
        import base64

        return "data:application/gzip;base64," + base64.b64encode(trained.archive.read_bytes()).decode()
    return str(trained.archive if form == "archive" else trained.adapter_dir)


@pytest.mark.parametrize("form", ["archive", "directory", "data-uri"])
def test_predictor_streams_with_adapter(trained, predictor_factory, form):
    weights = _as_weights(trained, form)
    predictor = predictor_factory(weights)
    # the template recorded at training time is used automatically
    assert predictor.model.trained_template.name == "alpaca_short"
    output = _predict(predictor, prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=12)
    chunks = output
    text = "".join(chunks)
    assert chunks and "### Instruction" not in text and "Tell me about alpacas." not in text
    # same answer as the library path with the same template, i.e. the prompt was built the same way
    from alpaca_tune.settings import GenerateSettings

    again = "".join(predictor.model.stream(GenerateSettings(prompt="Tell me about alpacas.", temperature=0.0,
                                                            max_new_tokens=12, prompt_template="alpaca_short")))
    assert again == text


def test_adapter_changes_the_answer(trained, predictor_factory):
    with_adapter = predictor_factory(str(trained.archive))
    without = predictor_factory(None)
    inputs = dict(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=16, prompt_template="alpaca_short")
    assert "".join(_predict(with_adapter, **inputs)) != "".join(_predict(without, **inputs))


def test_stop_sequences_and_validation(trained, predictor_factory):
    predictor = predictor_factory(str(trained.archive))
    full = "".join(_predict(predictor, prompt="Name three colours.", temperature=0.0, max_new_tokens=20))
    if len(full) < 4:
        pytest.skip("the tiny model stopped too early to cut")
    stop = full[2:4]
    cut = "".join(_predict(predictor, prompt="Name three colours.", temperature=0.0, max_new_tokens=20,
                           stop_sequences=f"{stop},zzzz"))
    assert cut == full[:full.find(stop)]
    from alpaca_tune.settings import SettingsError

    with pytest.raises(SettingsError, match="top_k"):
        list(_predict(predictor, prompt="x", top_k=-3))


def test_corrupt_archive_fails_setup_clearly(tmp_path, predictor_factory):
    broken = tmp_path / "weights.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(weights.WeightsError, match="not a readable adapter archive"):
        predictor_factory(str(broken))
    with pytest.raises(weights.WeightsError, match="no such file"):
        predictor_factory(str(tmp_path / "missing.tar.gz"))
    with pytest.raises(weights.WeightsError, match="download failed"):
        predictor_factory("data:application/gzip;base64,@@not base64@@")


def test_lean_cpu_path_answers_as_transformers_does(trained, tiny_model_dir):
    """On CPU the Predictor serves through LeanLlama; keeping the adapter unmerged goes through
    transformers + PEFT instead. Both must give the same greedy answer and sampled answer."""
    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.serving.lean.llama import LeanLlama
    from alpaca_tune.settings import GenerateSettings

    lean = InstructModel.load(str(trained.archive), base_model=str(tiny_model_dir))
    peft = InstructModel.load(str(trained.archive), base_model=str(tiny_model_dir), merge=False)
    assert isinstance(lean.decoder, LeanLlama) and not isinstance(peft.decoder, LeanLlama)
    for settings in (GenerateSettings(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=20),
                     GenerateSettings(prompt="Name a colour.", temperature=0.9, top_k=20, top_p=0.8,
                                      repetition_penalty=1.2, seed=5, max_new_tokens=20)):
        assert "".join(lean.stream(settings)) == "".join(peft.stream(settings))


def test_a_base_without_tokenizer_json_is_served_with_transformers_tokenizer(tiny_model_dir, tiny_tokenizer_dir,
                                                                             tmp_path):
    """Older conversions ship only SentencePiece's tokenizer.model: transformers reads it instead."""
    import shutil

    from transformers import AutoTokenizer

    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.serving.tokenizer import ServingTokenizer
    from alpaca_tune.settings import GenerateSettings

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").unlink()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.model", tmp_path / "base")
    served = InstructModel.load(None, base_model=str(tmp_path / "base"))
    assert not isinstance(served.tokenizer, ServingTokenizer)
    settings = GenerateSettings(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=12)
    prompt = served.template_for(settings).render(settings.prompt, settings.input)
    assert served.prompt_ids(settings) == AutoTokenizer.from_pretrained(str(tmp_path / "base"))(prompt)["input_ids"]
    assert "".join(served.stream(settings))


def test_decoding_clean_up_is_left_to_transformers(tiny_model_dir, tmp_path):
    import json
    import shutil

    from alpaca_tune.serving.tokenizer import can_serve

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    assert can_serve(tmp_path / "base")
    config_path = tmp_path / "base" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clean_up_tokenization_spaces": True}))
    assert not can_serve(tmp_path / "base")


def test_prompts_longer_than_the_context_are_refused_and_answers_end_with_it(trained, tiny_model_dir):
    """The tiny model reads 512 positions: a longer prompt is refused by name; an answer that would
    run past the context ends with it (LeanLlama's cache would refuse position 513)."""
    from alpaca_tune.errors import UserError
    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.serving.lean.llama import LeanLlama
    from alpaca_tune.settings import GenerateSettings

    for merge in (True, False):  # the lean CPU path, and transformers + PEFT for an unmerged adapter
        served = InstructModel.load(str(trained.archive), base_model=str(tiny_model_dir), merge=merge)
        assert isinstance(served.decoder, LeanLlama) == merge and served.decoder.context_length == 512
        with pytest.raises(UserError, match=r"prompt \(with input and template\) is \d+ tokens; .* at most 512"):
            served.stream(GenerateSettings(prompt="alpaca " * 200))
        near_the_end = GenerateSettings(prompt="alpaca " * 120, temperature=0.0, max_new_tokens=400,
                                        prompt_template="none")
        assert 400 < len(served.prompt_ids(near_the_end)) < 512
        assert "".join(served.stream(near_the_end))
