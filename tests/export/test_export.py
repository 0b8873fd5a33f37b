"""scripts/export.py's formats, each read back by the program it is for: transformers and PEFT (hf),
convert_weights.py (meta), llama.cpp through llama-cpp-python (gguf, gguf-lora), a Modelfile parser
(ollama); and bad input refused with nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA
from export_fixtures import (
    ALL_LINEAR,
    TEXTS,
    greedy_hf,
    greedy_llama_cpp,
    llama_cpp,
    llama_cpp_logits,
    logits,
    make_adapter,
    nmse,
)

from alpaca_tune.errors import UserError
from alpaca_tune.export import ExportError
from alpaca_tune.export.run import ExportOptions, export


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("run")
    return run, make_adapter(tiny_model_dir, run)


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """The tiny Llama with its SentencePiece tokenizer.model beside tokenizer.json, as HF's LLaMA 2
    repositories and convert_weights.py's output hold it (tiny_model_dir has tokenizer.json only)."""
    import shutil

    directory = tmp_path_factory.mktemp("spm") / "model"
    shutil.copytree(tiny_model_dir, directory)
    shutil.copyfile(tiny_tokenizer_dir / "tokenizer.model", directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir, spm_model_dir):
    """Every format of the tiny Llama + adapter, written once (gguf in f32, as the checks want)."""
    out = tmp_path_factory.mktemp("exported") / "all"
    export("hf,meta,gguf,gguf-lora,ollama", out, str(run_dir[0]), str(spm_model_dir),
           ExportOptions(outtype="f32", shards=2, progress=False))
    return out


@pytest.mark.parametrize("case", ["plain", "rslora-patterns", "dora", "embedding-and-modules_to_save"])
def test_hf_merge_equals_peft(tmp_path, tiny_model_dir, tiny_tokenizer, case):
    lora = {"plain": {}, "rslora-patterns": {"use_rslora": True, "rank_pattern": {"q_proj": 2},
                                             "alpha_pattern": {"down_proj": 3}},
            "dora": {"use_dora": True},
            "embedding-and-modules_to_save": {"target_modules": ALL_LINEAR + ["embed_tokens"],
                                              "modules_to_save": ["lm_head"]}}[case]
    reference = make_adapter(tiny_model_dir, tmp_path, **lora)
    export("hf", tmp_path / "hf", str(tmp_path), str(tiny_model_dir), ExportOptions(progress=False))
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    ours, theirs = logits(load_hf(tmp_path / "hf"), ids), logits(reference, ids)
    assert abs(ours - theirs).max() < 1e-5
    assert abs(ours - logits(load_hf(tiny_model_dir), ids)).max() > 1e-3  # the adapter did something


def test_hf_folder_serves_and_trains_like_the_adapter(exported, run_dir, tiny_model_dir):
    from alpaca_tune.serving.instruct import InstructModel
    from alpaca_tune.settings import GenerateSettings

    hf = exported / "hf"
    assert {"config.json", "tokenizer.json", "generation_config.json", "training_config.json",
            "prompt_template.json"} <= {p.name for p in hf.iterdir()}
    settings = GenerateSettings(prompt="Tell me about alpacas.", temperature=0, max_new_tokens=12)
    served = "".join(InstructModel.load(str(run_dir[0]), str(tiny_model_dir)).stream(settings))
    merged = InstructModel.load(None, str(hf))
    merged.trained_template = InstructModel.load(str(run_dir[0]), str(tiny_model_dir)).trained_template
    assert "".join(merged.stream(settings)) == served


def test_hf_shards_above_the_size(tmp_path, run_dir, tiny_model_dir):
    export("hf", tmp_path / "hf", str(run_dir[0]), str(tiny_model_dir), ExportOptions(shard_bytes=100_000, progress=False))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = [1, 5, 9, 33]
    assert abs(logits(load_hf(tmp_path / "hf"), ids) - logits(run_dir[1], ids)).max() < 1e-5


def test_meta_round_trip_through_convert_weights_is_exact(exported, tmp_path):
    from safetensors.torch import load_file

    from alpaca_tune.conversion.convert import convert_checkpoint

    meta = exported / "meta"
    assert sorted(p.name for p in meta.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json",
                                                       "tokenizer.model"]
    convert_checkpoint(meta, tmp_path / "back", llama_version="2", progress=False, log=lambda _: None)
    back, merged = load_file(tmp_path / "back" / "model.safetensors"), load_file(exported / "hf" / "model.safetensors")
    assert back.keys() == merged.keys()
    assert all(torch.equal(back[k], merged[k]) for k in merged)


def test_meta_shards_run_in_metas_reference_forward_like_the_merged_model(exported, tiny_tokenizer):
    """The exported shards, read by an independent model-parallel forward written after Meta's
    model.py (tests/meta_reference.py), give the merged HF model's logits."""
    import meta_reference as ref

    meta = exported / "meta"
    params = json.loads((meta / "params.json").read_text())
    shards = [torch.load(meta / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(2)]
    cfg = ref.RefConfig(n_layers=params["n_layers"], n_heads=params["n_heads"], n_kv_heads=params["n_kv_heads"],
                        norm_eps=params["norm_eps"], rope_theta=params["rope_theta"], vocab_parallel_embedding=False)
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    theirs = ref.forward(shards, cfg, torch.tensor([ids]))[0].numpy()
    assert abs(theirs - logits(load_hf(exported / "hf"), ids)).max() < 1e-4


def test_a_full_fine_tuning_archive_exports_as_the_model_itself(tmp_path, tiny_model_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")  # what finetune_method=full leaves in its archive
    (run / "training_config.json").write_text(json.dumps({"prompt_template": {"name": "t", "prompt_input":
                                                          "{instruction} {input}", "prompt_no_input": "{instruction}",
                                                          "response_split": ""}}))
    export("gguf,ollama", tmp_path / "out", str(run), "", ExportOptions(outtype="f32", progress=False))
    check_gguf_against_hf(tmp_path / "out" / "gguf" / "model-f32.gguf", tiny_model_dir, TEXTS[:1], 1e-4)
    assert "TEMPLATE \"\"\"{{ if .System }}{{ .Prompt }} {{ .System }}" in (tmp_path / "out" / "ollama" / "Modelfile").read_text()


def test_meta_refuses_shards_that_do_not_divide(tmp_path, run_dir, tiny_model_dir):
    with pytest.raises(ExportError, match="--shards 3: .*n_heads 4"):
        export("meta", tmp_path / "m", str(run_dir[0]), str(tiny_model_dir), ExportOptions(shards=3, progress=False))
    assert not list(tmp_path.iterdir())


def check_gguf_against_hf(gguf_path, hf_dir, texts, tolerance, greedy_steps=0):
    from transformers import AutoTokenizer

    tokenizer, model, llm = AutoTokenizer.from_pretrained(str(hf_dir)), load_hf(hf_dir), llama_cpp(gguf_path)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        ours, theirs = llama_cpp_logits(llm, ids), logits(model, ids)
        assert nmse(ours, theirs) < tolerance
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
        if greedy_steps:
            assert greedy_llama_cpp(llm, ids, greedy_steps) == greedy_hf(model, ids, greedy_steps)


def test_gguf_f32_runs_in_llama_cpp_like_transformers(exported):
    check_gguf_against_hf(exported / "gguf" / "model-f32.gguf", exported / "hf", TEXTS, 1e-4, greedy_steps=32)


@pytest.mark.parametrize("outtype, tolerance", [("f16", 1e-4), ("q8_0", 1e-3)])
def test_gguf_quantized_stays_close(tmp_path, run_dir, tiny_model_dir, exported, outtype, tolerance):
    export("gguf", tmp_path / "g", str(run_dir[0]), str(tiny_model_dir), ExportOptions(outtype=outtype, progress=False))
    check_gguf_against_hf(tmp_path / "g" / f"model-{outtype}.gguf", exported / "hf", TEXTS[:1], tolerance)


def test_gguf_lora_beside_the_base_equals_the_merged_gguf(tmp_path, exported, tiny_model_dir, tiny_tokenizer):
    export("gguf", tmp_path / "base", None, str(tiny_model_dir), ExportOptions(outtype="f32", progress=False))
    ids = tiny_tokenizer(TEXTS[1])["input_ids"]
    with_lora = llama_cpp(tmp_path / "base" / "model-f32.gguf", exported / "gguf-lora" / "adapter.gguf")
    merged = llama_cpp(exported / "gguf" / "model-f32.gguf")
    plain = llama_cpp(tmp_path / "base" / "model-f32.gguf")
    assert greedy_llama_cpp(with_lora, ids, 32) == greedy_llama_cpp(merged, ids, 32)
    assert nmse(llama_cpp_logits(with_lora, ids), llama_cpp_logits(merged, ids)) < 1e-8
    assert nmse(llama_cpp_logits(plain, ids), llama_cpp_logits(merged, ids)) > 1e-4  # the LoRA is applied


def test_gguf_lora_with_per_module_scales(tmp_path, tiny_model_dir, tiny_tokenizer):
    make_adapter(tiny_model_dir, tmp_path, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 5})
    export("gguf,gguf-lora", tmp_path / "out", str(tmp_path), str(tiny_model_dir), ExportOptions(outtype="f32", progress=False))
    export("gguf", tmp_path / "base", None, str(tiny_model_dir), ExportOptions(outtype="f32", progress=False))
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    with_lora = llama_cpp(tmp_path / "base" / "model-f32.gguf", tmp_path / "out" / "gguf-lora" / "adapter.gguf")
    merged = llama_cpp(tmp_path / "out" / "gguf" / "model-f32.gguf")
    assert nmse(llama_cpp_logits(with_lora, ids), llama_cpp_logits(merged, ids)) < 1e-8


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory):
    """A tiny Llama with LLaMA 3.1's real tokenizer (byte-level BPE, converted from Meta's tiktoken
    file) and llama3 rope scaling."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from alpaca_tune.conversion.tokenizer import convert_tiktoken, save_tokenizer

    source = SHARED_DATA / "llama3_tokenizer.model"
    if not source.is_file():
        pytest.skip(f"shared data not found at {source}")
    directory = tmp_path_factory.mktemp("llama31")
    save_tokenizer(convert_tiktoken(source, "3.1"), directory, 131072)
    torch.manual_seed(1)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = tiny_llama_config(128256, bos_token_id=128000, eos_token_id=128001, rope_parameters=rope,
                               max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def test_gguf_llama3_tokenizer_and_rope_scaling(tmp_path, llama31_dir):
    texts = TEXTS + ["code: def f(x):\n    return x ** 2  # ünïcödé 日本語 <|eot_id|>"]
    export("gguf", tmp_path / "g", None, str(llama31_dir), ExportOptions(outtype="f32", progress=False))
    check_gguf_against_hf(tmp_path / "g" / "model-f32.gguf", llama31_dir, texts, 1e-4, greedy_steps=8)


def test_meta_llama3_tokenizer_model_is_the_tiktoken_file(tmp_path, llama31_dir):
    export("meta", tmp_path / "m", None, str(llama31_dir), ExportOptions(progress=False))
    original = (SHARED_DATA / "llama3_tokenizer.model").read_text().split()
    assert (tmp_path / "m" / "tokenizer.model").read_text().split() == original
    assert json.loads((tmp_path / "m" / "params.json").read_text())["use_scaled_rope"] is True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: INSTRUCTION value, a value on one line or in triple quotes."""
    commands, position = [], 0
    pattern = re.compile(r'\s*(FROM|ADAPTER|TEMPLATE|PARAMETER|SYSTEM|LICENSE|MESSAGE)\s+("""(.*?)"""|[^\n]*)', re.S)
    while position < len(text.rstrip()):
        match = pattern.match(text, position)
        assert match, f"not a Modelfile instruction at {text[position:position + 40]!r}"
        commands.append((match.group(1), match.group(3) if match.group(3) is not None else match.group(2).strip()))
        position = match.end()
    return commands


def render_go(template: str, fields: dict[str, str]) -> str:
    """The part of Go's text/template a Modelfile TEMPLATE uses: {{ .X }}, {{ "lit" }},
    {{ if .X }}...{{ else }}...{{ end }} (no nesting)."""
    def action(match):
        inner = match.group(1).strip()
        return fields.get(inner[1:], "") if inner.startswith(".") else json.loads(inner)

    def branch(match):
        return match.group(2) if fields.get(match.group(1)) else match.group(3)

    template = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}", branch, template, flags=re.S)
    return re.sub(r"\{\{(.*?)\}\}", action, template)


def test_ollama_modelfile_renders_the_predictors_prompt(exported):
    from alpaca_tune.data.prompts import load_template

    commands = parse_modelfile((exported / "ollama" / "Modelfile").read_text())
    assert commands[0] == ("FROM", "./model-f32.gguf") and (exported / "ollama" / "model-f32.gguf").is_file()
    template = dict(commands)["TEMPLATE"]
    alpaca = load_template("alpaca")
    assert render_go(template, {"Prompt": "Name a colour."}) == alpaca.render("Name a colour.")
    assert render_go(template, {"Prompt": "Translate.", "System": "merci"}) == alpaca.render("Translate.", "merci")
    stops = [value for command, value in commands if command == "PARAMETER"]
    assert stops == ['stop "### Instruction:"', 'stop "### Input:"', 'stop "### Response:"', 'stop "</s>"']


def test_ollama_escapes_go_braces():
    from alpaca_tune.data.prompts import PromptTemplate
    from alpaca_tune.export.ollama import go_template

    template = PromptTemplate("t", "{{{{x}}}} {instruction} / {input}", "{{{{x}}}} {instruction}", "")
    assert render_go(go_template(template), {"Prompt": "hi"}) == template.render("hi")


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), "--no-progress", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_command_line_writes_and_refuses_a_non_empty_output(tmp_path, run_dir, tiny_model_dir):
    args = ["--weights", str(run_dir[0]), "--base_model", str(tiny_model_dir), "--format", "gguf-lora",
            "--output-dir", str(tmp_path / "out")]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "wrote 1 file(s)" in done.stdout and (tmp_path / "out" / "adapter.gguf").is_file()
    again = run_cli(*args)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr and "Traceback" not in again.stderr
    assert run_cli(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize("case", ["unknown format", "not an adapter", "other base", "untrained", "lora without adapter"])
def test_bad_input_is_refused_and_writes_nothing(tmp_path, tiny_model_dir, case):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    weights, fmt = tmp_path / "run", "hf"
    weights.mkdir()
    if case == "unknown format":
        make_adapter(tiny_model_dir, weights)
        fmt, message = "hf,safetensors", "--format safetensors: unknown"
    elif case == "not an adapter":
        (weights / "adapter.tar.gz").write_bytes(b"not a tar")
        weights, message = weights / "adapter.tar.gz", "not a readable adapter archive"
    elif case == "other base":
        other = tmp_path / "other"
        LlamaForCausalLM(tiny_llama_config(400, hidden_size=32, intermediate_size=64)).save_pretrained(str(other))
        make_adapter(other, weights)
        message = "has shape .* the base's"
    elif case == "untrained":
        from peft import LoraConfig, get_peft_model

        get_peft_model(load_hf(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            str(weights / "adapter"))
        message = "changed no weight of the base"
    else:
        weights, fmt, message = None, "gguf-lora", "writes an adapter: give it with --weights"
    with pytest.raises(UserError, match=message):  # ExportError, AdapterError, WeightsError
        export(fmt, tmp_path / "out", str(weights) if weights else None, str(tiny_model_dir),
               ExportOptions(progress=False))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "exporting" in p.name]


@pytest.mark.slow
def test_embedded_smollm2_exports_to_llama_cpp_and_hf(tmp_path, full_threads):
    """The real embedded base (byte-level BPE, tied head) with an adapter: merged HF equals PEFT,
    and llama.cpp's f32 GGUF tokenizes and predicts like transformers."""
    from alpaca_tune.base_model import resolve_base_dir

    base = resolve_base_dir()
    reference = make_adapter(base, tmp_path, target_modules=["q_proj", "v_proj"])
    export("hf,gguf", tmp_path / "out", str(tmp_path), str(base), ExportOptions(outtype="f32", progress=False))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXTS[0])["input_ids"]
    assert abs(logits(load_hf(tmp_path / "out" / "hf"), ids) - logits(reference, ids)).max() < 1e-4
    check_gguf_against_hf(tmp_path / "out" / "gguf" / "model-f32.gguf", tmp_path / "out" / "hf", TEXTS, 1e-4,
                          greedy_steps=32)


def test_too_little_disk_space_is_refused_before_writing(tmp_path, run_dir, tiny_model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ExportError, match=r"needs about 0\.\d GB free, has 0\.0 GB"):
        export("hf", tmp_path / "out", str(run_dir[0]), str(tiny_model_dir), ExportOptions(progress=False))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_midway_leaves_nothing(tmp_path, run_dir, tiny_model_dir, monkeypatch):
    import errno

    from alpaca_tune.conversion import safetensors_writer

    def full_disk(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_writer.StreamingSafetensors, "write", full_disk)
    with pytest.raises(ExportError, match="no space left on the disk; nothing written"):
        export("hf", tmp_path / "out", str(run_dir[0]), str(tiny_model_dir), ExportOptions(progress=False))
    assert list(tmp_path.iterdir()) == []
