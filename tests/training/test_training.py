import dataclasses
import json
import tarfile

import pytest
import torch
from conftest import TINY_RECORDS
from safetensors.torch import load_file

from alpaca_tune.data.records import DataError
from alpaca_tune.settings import TrainSettings
from alpaca_tune.training import adapter as artifacts
from alpaca_tune.training.loop import run_training


@pytest.fixture
def settings(tmp_path, tiny_model_dir, write_json):
    data = write_json("train.json", TINY_RECORDS * 4)
    return TrainSettings(train_data=str(data), base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                         learning_rate=3e-3, max_steps=8, train_batch_size=2, gradient_accumulation_steps=2,
                         warmup_steps=0, val_set_size=2, lora_rank=4, lora_alpha=8, lora_dropout=0.1,
                         logging_steps=1, seed=3)


def test_loss_falls_and_outputs_are_complete(settings):
    result = run_training(dataclasses.replace(settings, max_steps=40, learning_rate=1e-2, lora_alpha=32,
                                              lora_target_modules="all-linear", lora_dropout=0.0))
    history = result.metrics["history"]
    assert len(history) == 40
    first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.9 * first  # a tiny random model learns slowly; 6.0 -> ~5.1 here
    with tarfile.open(result.archive) as tar:
        names = set(tar.getnames())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "training_config.json",
            "metrics.json", "loss.png"} <= names
    config = json.loads((result.output_dir / "training_config.json").read_text())
    assert config["prompt_template"]["name"] == "alpaca" and config["settings"]["lora_rank"] == 4
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["final_eval_loss"] > 0 and metrics["tokens_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert (result.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_round_trip_gives_the_same_logits(settings):
    """The saved directory is a plain PEFT adapter: PeftModel.from_pretrained reproduces the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_training(settings)
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)(input_ids=ids).logits
    assert (loaded_logits - plain).abs().max() > 1e-4  # the adapter does something ...
    # ... and it is exactly what training produced: rebuild by hand from the tensors
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base2 = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    manual = get_peft_model(base2, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    set_peft_model_state_dict(manual, weights)
    with torch.no_grad():
        torch.testing.assert_close(manual.eval()(input_ids=ids).logits, loaded_logits)


def test_resume_matches_an_uninterrupted_run(settings, tmp_path):
    full = run_training(dataclasses.replace(settings, save_steps=3))
    checkpoint = full.output_dir / "checkpoints" / "step-000003"
    assert checkpoint.is_dir()
    resumed = run_training(dataclasses.replace(settings, output_dir=str(tmp_path / "resumed"),
                                               resume_from_checkpoint=str(checkpoint)))
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert [h["loss"] for h in full.metrics["history"]] == pytest.approx(
        [h["loss"] for h in resumed.metrics["history"]], rel=1e-5)
    # a resume that restarted from zero (alpaca-lora's bug) would differ from step 4 on
    restarted = run_training(dataclasses.replace(settings, output_dir=str(tmp_path / "restart"), max_steps=5))
    assert not torch.allclose(restarted.metrics["history"][-1]["loss"] * torch.ones(1),
                              full.metrics["history"][4]["loss"] * torch.ones(1), rtol=1e-6)


@pytest.mark.parametrize("content, change, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', {}, "line 2: missing field 'output'"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]', {"val_set_size": 2},
     "val_set_size=2: holds out 2 of 2 records"),
    ('[{"instruction": "' + "a " * 40 + '", "output": "b"}]', {"cutoff_len": 8, "val_set_size": 0},
     "no example has a response token within cutoff_len=8"),
])
def test_bad_data_fails_before_the_model_loads(settings, tmp_path, monkeypatch, content, change, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    from alpaca_tune.training import loop

    monkeypatch.setattr(loop, "load_frozen_base", lambda *a, **k: pytest.fail("model loaded for bad data"))
    out = tmp_path / "refused"
    with pytest.raises(DataError, match=message):
        run_training(dataclasses.replace(settings, train_data=str(bad), output_dir=str(out), **change))
    assert not out.exists()


def test_an_unchanged_adapter_is_refused(settings, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(settings.base_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    initial = artifacts.snapshot_lora(model)
    with pytest.raises(artifacts.ArtifactError, match="no LoRA weight moved"):
        artifacts.save_adapter(model, tmp_path / "adapter", initial)
    expected = artifacts.expected_lora_shapes(model)
    assert len(expected) == 8 and all(len(shape) == 2 for shape in expected.values())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "empty" / "adapter_model.safetensors"))
    with pytest.raises(artifacts.ArtifactError, match="refusing to write an empty adapter"):
        artifacts.verify_adapter_dir(tmp_path / "empty", expected)


def test_all_linear_and_unknown_targets(settings):
    from alpaca_tune.training.model import ModelError

    result = run_training(dataclasses.replace(settings, max_steps=1, lora_target_modules="all-linear"))
    keys = load_file(str(result.adapter_dir / "adapter_model.safetensors")).keys()
    assert any("mlp.down_proj" in k for k in keys) and not any("lm_head" in k for k in keys)
    with pytest.raises(ModelError, match="Linear modules of this model: .*q_proj"):
        run_training(dataclasses.replace(settings, lora_target_modules="qkv"))


def test_quantization_on_cpu_is_a_clear_error(settings):
    from alpaca_tune.training.model import ModelError

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        run_training(dataclasses.replace(settings, quantization="4bit"))


def test_quantization_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    import importlib.util

    from alpaca_tune.training import model
    from alpaca_tune.training.model import ModelError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match="needs bitsandbytes: pip install bitsandbytes=="):
        model.quantization_config("8bit", torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize("steps", [1, 3])
def test_a_run_shorter_than_its_warmup_still_reaches_the_set_rate(settings, steps):
    """Warmup from lr 0 stops one step before the end at the latest: a 1-step run learns too."""
    result = run_training(dataclasses.replace(settings, max_steps=steps, warmup_steps=10, val_set_size=0))
    rates = [h["lr"] for h in result.metrics["history"]]
    assert len(rates) == steps and rates[-1] == pytest.approx(settings.learning_rate)
    assert all(rate > 0 for rate in rates[1:])


def test_lora_in_bf16_under_autocast_matches_fp32_lora_products(tiny_model_dir):
    """The bf16 LoRA products give the loss and LoRA gradients of PEFT's fp32 ones, to bf16
    precision, and the LoRA weights (what AdamW updates) stay fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alpaca_tune.data.batching import collate_padded
    from alpaca_tune.data.tokenization import Example
    from alpaca_tune.training.fast_paths import lora_in_base_dtype
    from alpaca_tune.training.loss import label_loss

    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, [-100] * 5 + ids[5:]) for ids in
                (torch.randint(3, 300, (n,), generator=g).tolist() for n in (20, 14))]
    batch = collate_padded(examples, pad_id=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    results = []
    for compute in (lora_in_base_dtype(model, torch.float32, torch.device("cpu")),  # a no-op
                    lora_in_base_dtype(model, torch.bfloat16, torch.device("cpu"))):
        model.zero_grad()
        with compute:
            loss_sum, n = label_loss(model.get_base_model(), batch)
        (loss_sum / n).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss_sum.item(), grads))
    (fp32_loss, fp32_grads), (bf16_loss, bf16_grads) = results
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0) > 0.99
    assert not torch.equal(bf16_grads, fp32_grads)  # the products did run in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tiny_model_dir):
    """torch_compile's compiled layers (used on GPUs; compiled here on CPU) compute what eager does."""
    from transformers import AutoModelForCausalLM

    from alpaca_tune.training.fast_paths import compile_decoder_layers
    from alpaca_tune.training.loss import label_loss
    from alpaca_tune.training.model import attach_lora

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj", seed=0)
    causal_lm = model.get_base_model()
    torch.manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (2, 24))
    targets = ids.roll(-1, dims=1)
    targets[:, :8] = -100
    batch = {"input_ids": ids, "targets": targets}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss_sum, count = label_loss(causal_lm, batch)
        (loss_sum / count).backward()
        return loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads()
    compile_decoder_layers(causal_lm)
    compiled_loss, compiled_grads = loss_and_grads()
    assert all(layer._compiled_call_impl is not None for layer in causal_lm.model.layers)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 0 for g in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_failing_compiler_leaves_the_layers_uncompiled_not_the_run_broken(tiny_model_dir, monkeypatch):
    import torch._inductor.config
    from transformers import AutoModelForCausalLM

    from alpaca_tune.training import fast_paths

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    torch._dynamo.reset()  # forget what earlier tests compiled with a working compiler
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        fast_paths.compile_decoder_layers(model)
        torch.testing.assert_close(model(input_ids=ids).logits, eager)
    # and on a GPU without Triton's C compiler the trainer does not even try
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    assert fast_paths.compiler_missing() in ("Triton is not installed",
                                           "no C compiler found (Triton needs one; set CC or install gcc)")


def test_mid_run_evaluation_is_the_loss_of_the_adapter_at_that_step(settings, tmp_path):
    """eval_steps=2 evaluates after steps 2, 4 and 6 and at the end; with a constant learning rate
    a run stopped at step 4 holds the adapter of step 4, whose final eval must equal the mid-run one."""
    constant = dataclasses.replace(settings, lr_scheduler="constant", lora_dropout=0.0, learning_rate=1e-2)
    run = run_training(dataclasses.replace(constant, eval_steps=2))
    evals = run.metrics["evals"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert len({round(e["eval_loss"], 6) for e in evals}) == 4  # the adapter moved between evaluations
    stopped = run_training(dataclasses.replace(constant, max_steps=4, output_dir=str(tmp_path / "four")))
    assert stopped.metrics["evals"] == [{"step": 4, "eval_loss": pytest.approx(evals[1]["eval_loss"], rel=1e-5)}]
    no_mid_run = run_training(dataclasses.replace(constant, output_dir=str(tmp_path / "end-only")))
    assert [e["step"] for e in no_mid_run.metrics["evals"]] == [8]


def test_training_config_records_what_ran(settings):
    from alpaca_tune.device import cpu_model

    result = run_training(dataclasses.replace(settings, max_steps=2, precision="fp32"))
    ran = json.loads((result.output_dir / "training_config.json").read_text())["ran"]
    assert ran["device"] == "cpu" and ran["base_dtype"] == "float32" and ran["attention"] == "sdpa"
    assert ran["machine"]["cpu"] == cpu_model() and ran["machine"]["cpu_cores"] >= 1
    # fp32 on CPU: dropout swapped for every adapted layer (2 layers x q, v); no bf16-only paths
    assert ran["fast_paths"]["cpu_dropout"] == 4 and ran["fast_paths"]["bf16_lora_products"] is False
    assert "cpu_attention" not in ran["fast_paths"] and ran["fast_paths"]["shared_preamble"] is False
    assert "precision_probe" not in ran  # precision was given, not measured
