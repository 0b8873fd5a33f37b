"""finetune_method=full: every weight trained, the whole model in the archive, served by predict.py in
place of the base; resumable; on two processes equal to one; the stanford_alpaca preset."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import ROOT, TINY_RECORDS, drain
from safetensors.torch import load_file

from alpaca_tune.data.tokenization import encode_prompt
from alpaca_tune.settings import GenerateSettings, TrainSettings, apply_preset
from alpaca_tune.training.loop import run_training


@pytest.fixture
def settings(tmp_path, tiny_model_dir, write_json):
    data = write_json("train.json", TINY_RECORDS * 4)
    return TrainSettings(train_data=str(data), base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                         finetune_method="full", precision="fp32", learning_rate=1e-3, max_steps=6,
                         train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0, val_set_size=2,
                         lora_dropout=0.0, logging_steps=1, seed=3)


def test_full_fine_tuning_trains_every_weight_and_predict_serves_it(settings, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    result = run_training(settings)
    history = result.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    with tarfile.open(result.archive) as tar:
        names = set(tar.getnames())
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json", "training_config.json",
            "loss.png"} <= names and not any(n.startswith("adapter") for n in names)
    trained, base = load_file(str(result.adapter_dir / "model.safetensors")), load_file(
        str(tiny_model_dir / "model.safetensors"))
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) == len(base)  # every weight moved, norms and embeddings too
    config = json.loads((result.output_dir / "training_config.json").read_text())
    assert config["ran"]["finetune_method"] == "full"

    import predict

    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir))
    predictor = predict.Predictor()
    predictor.setup(str(result.archive))
    answer = "".join(drain(predictor.predict(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=8)))
    # the same greedy answer transformers gives with the trained model, which is not the base's
    model = AutoModelForCausalLM.from_pretrained(str(result.adapter_dir), dtype=torch.float32)
    served = predictor.model
    ids = encode_prompt(served.tokenizer, served.template_for(GenerateSettings(prompt="x")).render(
        "Tell me about alpacas."))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    expected = served.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    assert answer == expected

    # the base is not read at all: a server whose base is gone serves the archive alike
    monkeypatch.setenv("ALPACA_TUNE_BASE", str(tiny_model_dir.parent / "no-such-base"))
    alone = predict.Predictor()
    alone.setup(str(result.archive))
    assert "".join(drain(alone.predict(prompt="Tell me about alpacas.", temperature=0.0, max_new_tokens=8))) == answer
    # and it is not an adapter: given per request, it fails that request with its own message
    from alpaca_tune.errors import UserError

    served.adapters.adapter_dir = str(result.output_dir)  # as $ALPACA_TUNE_ADAPTER_DIR would set it
    with pytest.raises(UserError, match=r"whole fine-tuned model \(finetune_method=full\), not an adapter: serve it "
                                        r"as COG_WEIGHTS"):
        served.adapters.get(result.archive.name)


def test_full_fine_tuning_resumes_exactly(settings, tmp_path):
    import dataclasses

    whole = run_training(settings)
    interrupted = dataclasses.replace(settings, output_dir=str(tmp_path / "first"), max_steps=6, save_steps=3)
    run_training(interrupted)
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000003"
    assert (checkpoint / "model" / "model.safetensors").is_file()
    resumed = run_training(dataclasses.replace(settings, output_dir=str(tmp_path / "resumed"),
                                               resume_from_checkpoint=str(checkpoint)))
    a, b = (load_file(str(r.adapter_dir / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stanford_alpaca_preset_fills_what_is_left_at_defaults(tiny_model_dir):
    chosen = apply_preset(TrainSettings(train_data="x.json", preset="stanford_alpaca", learning_rate=1e-4), 2)
    assert (chosen.finetune_method, chosen.num_train_epochs, chosen.cutoff_len, chosen.lr_scheduler) == \
        ("full", 3.0, 512, "cosine")
    assert chosen.learning_rate == 1e-4  # set by the user: kept
    assert chosen.warmup_ratio == 0.03 and chosen.weight_decay == 0.0 and chosen.sharding == "fsdp"
    assert chosen.train_batch_size * chosen.gradient_accumulation_steps * 2 == 128


def test_quantized_full_fine_tuning_is_refused(settings):
    import dataclasses

    from alpaca_tune.errors import UserError

    with pytest.raises(UserError, match="finetune_method=full trains every weight, which a 8bit base"):
        run_training(dataclasses.replace(settings, quantization="8bit"))


@pytest.mark.slow
def test_two_process_full_fine_tuning_equals_one_with_and_without_fsdp(tmp_path, settings, tiny_model_dir):
    """2 processes (plain, and with each decoder layer sharded) = 1 process at twice the accumulation;
    the sharded run's step-2 checkpoint resumes sharded to the same model."""
    args = ["--train_data", settings.train_data, "--base_model", str(tiny_model_dir), "--finetune_method", "full",
            "--precision", "fp32", "--learning_rate", "1e-3", "--max_steps", "4", "--train_batch_size", "2",
            "--warmup_steps", "0", "--val_set_size", "2", "--seed", "3"]
    two = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sharded = ["--sharding", "fsdp", "--save_steps", "2"]
    runs = (("two", two, 1, []), ("one", [], 2, []), ("fsdp", two, 1, sharded),
            ("resumed", two, 1, [*sharded, "--resume_from_checkpoint",
                                 str(tmp_path / "fsdp" / "checkpoints" / "step-000002")]))
    for out, launch, accumulation, extra in runs:
        done = subprocess.run([sys.executable, *launch, str(ROOT / "train.py"), *args, "--output_dir",
                               str(tmp_path / out), "--gradient_accumulation_steps", str(accumulation), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    models = {out: load_file(str(tmp_path / out / "model" / "model.safetensors")) for out, *_ in runs}
    for out in ("two", "fsdp", "resumed"):
        assert models[out].keys() == models["one"].keys()
        assert max((models[out][k] - models["one"][k]).abs().max().item() for k in models["one"]) < 1e-6, out
