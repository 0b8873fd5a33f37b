"""End to end on the real embedded base model (SmolLM2-135M-Instruct), on CPU."""

import pytest
from conftest import ROOT

from alpaca_tune.base_model import prepare_embedded
from alpaca_tune.serving.instruct import InstructModel
from alpaca_tune.settings import GenerateSettings, TrainSettings
from alpaca_tune.training.loop import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("full_threads")]


@pytest.fixture(scope="module")
def smollm2_dir():
    return prepare_embedded()  # once per machine; weights/ is git-ignored


def test_few_steps_on_the_real_alpaca_sample_then_predict(smollm2_dir, alpaca_sample, tmp_path):
    settings = TrainSettings(train_data=str(alpaca_sample), base_model=str(smollm2_dir),
                             output_dir=str(tmp_path / "run"), max_steps=3, train_batch_size=4,
                             gradient_accumulation_steps=2, val_set_size=8, logging_steps=1, cutoff_len=256)
    result = run_training(settings)
    assert result.metrics["records"] == 102 and result.metrics["val_examples"] == 8
    assert result.metrics["final_eval_loss"] < 4.0  # a real model: far below ln(49152) = 10.8
    model = InstructModel.load(str(result.archive), base_model=str(smollm2_dir))
    chunks = list(model.stream(GenerateSettings(prompt="Give three tips for staying healthy.",
                                                temperature=0.0, max_new_tokens=48)))
    assert len(chunks) > 1 and "".join(chunks).strip()
    assert "### Instruction" not in "".join(chunks)


def test_adapter_moves_answers_toward_the_training_data(smollm2_dir, tmp_path):
    """The demo data answers in a house style; after a short run the model answers that way and stops."""
    settings = TrainSettings(train_data=str(ROOT / "data" / "alpaca_demo.json"), base_model=str(smollm2_dir),
                             output_dir=str(tmp_path / "demo"), max_steps=24, learning_rate=2e-3,
                             warmup_steps=2, train_batch_size=4, gradient_accumulation_steps=1,
                             val_set_size=0, seed=0)
    result = run_training(settings)
    prompt = GenerateSettings(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=120)
    base_answer = "".join(InstructModel.load(None, base_model=str(smollm2_dir)).stream(prompt))
    tuned_answer = "".join(InstructModel.load(str(result.archive), base_model=str(smollm2_dir)).stream(prompt))
    assert not base_answer.startswith("Here is my answer")
    assert tuned_answer.startswith("Here is my answer:")
    assert tuned_answer.rstrip().endswith("I hope this helps!")  # stopped at EOS, not at max_new_tokens
