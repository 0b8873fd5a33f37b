"""convert_weights.py / alpaca_tune.convert: tiny random Meta checkpoints of every version and
shard layout, converted and run through transformers, must give the logits of an independent
model-parallel reference forward pass (tests/meta_reference.py) in fp32."""

import json
import subprocess
import sys
from pathlib import Path

import meta_reference as ref
import pytest
import torch
from convert_fixtures import (
    LLAMA3_TOKENIZER,
    LLAMA3_VOCAB,
    llama_params,
    random_weights,
    shard,
    train_sentencepiece,
    write_download,
)
from safetensors.torch import load_file

from alpaca_tune.conversion import ConversionError, state_dict
from alpaca_tune.conversion import convert as conversion_run
from alpaca_tune.conversion import params as meta_params
from alpaca_tune.conversion.convert import convert_checkpoint
from alpaca_tune.conversion.params import MetaParams, resolve_version

REPO = Path(__file__).resolve().parents[2]
SP_VOCAB = 400
TOLERANCE = 1e-4  # max |logit difference| in fp32
ROPE_FACTOR = {"3.1": 8.0, "3.2": 8.0}  # Meta's reference model.py (see alpaca_tune/conversion/params.py)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=SP_VOCAB)


def make_download(root: Path, version: str, sp_model: Path, n_shards: int = 1, heads: int = 4,
                  kv_heads: int | None = 2, output: bool = True, dtype=torch.float32, vocab: int | None = None,
                  **extra):
    """A Meta download under root/<size>/; LLaMA 1/2 keep tokenizer.model one level up, as Meta's do."""
    llama3 = version.startswith("3")
    params = llama_params(version, n_heads=heads, n_kv_heads=kv_heads, **extra)
    vocab = vocab or (LLAMA3_VOCAB if llama3 else SP_VOCAB)
    shards = shard(random_weights(params, vocab, output=output, dtype=dtype, rope_freqs=not llama3), n_shards, version)
    model_dir = write_download(root / "7B", params, shards, LLAMA3_TOKENIZER if llama3 else sp_model,
                               tokenizer_in_parent=not llama3)
    return model_dir, params, shards


def ref_config(params: dict, version: str) -> ref.RefConfig:
    return ref.RefConfig(
        n_layers=params["n_layers"], n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
        vocab_parallel_embedding=version.startswith("3"), rope_scaling_factor=ROPE_FACTOR.get(version),
    )


def max_logit_error(out_dir: Path, shards, params: dict, version: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    fp32_shards = [{k: v.float() for k, v in s.items()} for s in shards]
    expected = ref.forward(fp32_shards, ref_config(params, version), tokens)
    with torch.no_grad():
        got = model(tokens).logits
    return (got - expected).abs().max().item()


def assert_matches_reference(out_dir: Path, shards, params: dict, version: str) -> None:
    from transformers import AutoModelForCausalLM

    error = max_logit_error(out_dir, shards, params, version)
    assert error <= TOLERANCE, f"max |logit difference| {error:.2e}"
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    prompt = [3, 17, 42, 99, 7]
    expected = ref.greedy(shards, ref_config(params, version), prompt, steps=6)
    model.generation_config.eos_token_id = None  # random weights may well pick EOS; keep going
    got = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert got[0, len(prompt):].tolist() == expected


def assert_lean_serving_matches_reference(out_dir: Path, shards, params: dict, version: str) -> None:
    """The CPU serving path (LeanLlama) on the converted model, prompt then token by token through its
    KV cache, against Meta's reference forward."""
    from alpaca_tune.serving.lean.llama import LeanLlama

    lean = LeanLlama.load(out_dir)
    tokens = torch.randint(0, lean.head.shape[0], (1, 12), generator=torch.Generator().manual_seed(1))
    expected = ref.forward([{k: v.float() for k, v in s.items()} for s in shards], ref_config(params, version), tokens)[0]
    ids = tokens[0].tolist()
    cache = lean.new_cache(len(ids))
    got = torch.stack([lean.forward(ids[:6], cache)] + [lean.forward([token], cache) for token in ids[6:]])
    error = (got - expected[5:]).abs().max().item()
    assert error <= TOLERANCE, f"LeanLlama: max |logit difference| {error:.2e}"


def run(model_dir: Path, out: Path, **kwargs):
    messages = []
    result = convert_checkpoint(model_dir.parent, out, progress=False, log=messages.append, **kwargs)
    return result, "\n".join(messages)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("version,n_shards,heads,kv_heads", [
    ("1", 1, 4, None),  # MHA, fp16-era layout, tokenizer in the parent folder
    ("2", 2, 4, 2),  # 13B-like: 2 shards, GQA
    ("2", 4, 8, 4),  # 30B-like: 4 shards
    ("2", 8, 8, 8),  # 65B/70B-like: 8 shards, one kv head each
    ("3", 2, 4, 2),  # tiktoken, embedding cut along the vocabulary
    ("3.1", 1, 4, 2),  # llama3 rope scaling, factor 8
])
def test_logits_and_greedy_match_meta_reference(tmp_path, sp_model, version, n_shards, heads, kv_heads):
    model_dir, params, shards = make_download(tmp_path / "in", version, sp_model, n_shards, heads, kv_heads)
    result, log = run(model_dir, tmp_path / "out", llama_version=version)
    assert result.version == version
    assert_matches_reference(tmp_path / "out", shards, params, version)
    assert_lean_serving_matches_reference(tmp_path / "out", shards, params, version)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == {"1": 2048, "2": 4096, "3": 8192, "3.1": 131072}[version]
    assert config["num_key_value_heads"] == (kv_heads or heads)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == params.get("rope_theta", 10000.0)
    assert config["tie_word_embeddings"] is False
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    if version.startswith("3"):
        assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
        # Meta's generate() stops on end of text, end of turn, and (3.1+) end of message.
        assert generation["eos_token_id"] == ([128001, 128009] if version == "3" else [128001, 128008, 128009])
    else:
        assert (config["bos_token_id"], config["eos_token_id"], generation["eos_token_id"]) == (1, 2, 2)
    if version == "3.1":
        assert config["rope_parameters"]["rope_type"] == config["rope_scaling"]["rope_type"] == "llama3"
        assert config["rope_parameters"]["factor"] == 8.0


def test_llama32_without_output_is_tied(tmp_path, sp_model):
    model_dir, params, shards = make_download(tmp_path / "in", "3.2", sp_model, n_shards=2, output=False)
    result, log = run(model_dir, tmp_path / "out")  # no output.weight + scaled rope: 3.2, detected
    assert result.version == "3.2" and "tied embeddings" in log
    assert_matches_reference(tmp_path / "out", shards, params, "3.2")
    assert_lean_serving_matches_reference(tmp_path / "out", shards, params, "3.2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["factor"] == 8.0
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")


def test_rope_scaling_factor_override_reaches_config_and_logits(tmp_path, sp_model):
    """--rope-scaling-factor 32 (HF's published 3.2 configs) is exact against a reference run at 32."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    model_dir, params, shards = make_download(tmp_path / "in", "3.2", sp_model, n_shards=1, output=False)
    run(model_dir, tmp_path / "out", llama_version="3.2", rope_scaling_factor=32.0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 32.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 11]])
    reference = dataclasses.replace(ref_config(params, "3.2"), rope_scaling_factor=32.0)
    expected = ref.forward([{k: v.float() for k, v in s.items()} for s in shards], reference, tokens)
    with torch.no_grad():
        assert (model(tokens).logits - expected).abs().max() <= TOLERANCE
        default = dataclasses.replace(reference, rope_scaling_factor=8.0)  # and the factor matters
        assert (model(tokens).logits - ref.forward([{k: v.float() for k, v in s.items()} for s in shards],
                                                   default, tokens)).abs().max() > TOLERANCE


def test_llama32_output_kept_unless_it_equals_the_embeddings(tmp_path, sp_model):
    """An output.weight of its own is kept (tying would change the logits); a copy is tied."""
    model_dir, params, shards = make_download(tmp_path / "in", "3.2", sp_model)
    run(model_dir, tmp_path / "own", llama_version="3.2")
    assert json.loads((tmp_path / "own" / "config.json").read_text())["tie_word_embeddings"] is False
    assert max_logit_error(tmp_path / "own", shards, params, "3.2") <= TOLERANCE

    shards[0]["output.weight"] = shards[0]["tok_embeddings.weight"].clone()
    torch.save(shards[0], model_dir / "consolidated.00.pth")
    run(model_dir, tmp_path / "copy", llama_version="3.2")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["tie_word_embeddings"] is True
    assert max_logit_error(tmp_path / "copy", shards, params, "3.2") <= TOLERANCE


def test_negative_control_without_rotary_permutation(tmp_path, sp_model, monkeypatch):
    """The comparison above would catch a converter that skips the wq/wk permutation."""
    model_dir, params, shards = make_download(tmp_path / "in", "2", sp_model, n_shards=2)
    monkeypatch.setattr(state_dict, "permute_rotary", lambda weight, n_heads: weight)
    run(model_dir, tmp_path / "out", llama_version="2")
    assert max_logit_error(tmp_path / "out", shards, params, "2") > 100 * TOLERANCE
    with pytest.raises(AssertionError):
        assert_matches_reference(tmp_path / "out", shards, params, "2")


def test_bf16_kept_and_fp32_cast_is_exact(tmp_path, sp_model):
    model_dir, params, shards = make_download(tmp_path / "in", "2", sp_model, n_shards=2, dtype=torch.bfloat16)
    run(model_dir, tmp_path / "keep", llama_version="2")
    weights = load_file(tmp_path / "keep" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["dtype"] == "bfloat16"
    # Upcasting bf16 to fp32 is exact, so the converted model is the reference model.
    assert max_logit_error(tmp_path / "keep", shards, params, "2") <= TOLERANCE

    _, log = run(model_dir, tmp_path / "fp16", llama_version="2", dtype=torch.float16)
    assert "torch.bfloat16 -> torch.float16" in log and "lossy" in log
    _, log = run(model_dir, tmp_path / "fp32", llama_version="2", dtype=torch.float32)
    assert "lossy" not in log


def test_streamed_shards_equal_the_pure_conversion(tmp_path, sp_model):
    """Small --max-shard-size: many files plus an index, read back by safetensors itself."""
    model_dir, params, shards = make_download(tmp_path / "in", "2", sp_model, n_shards=2)
    result, _ = run(model_dir, tmp_path / "out", llama_version="2", max_file_bytes=40_000)
    assert len(result.files) > 3 and result.files[0] == f"model-00001-of-{len(result.files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.files
    written = {}
    for name in result.files:
        written.update(load_file(tmp_path / "out" / name))
    expected = state_dict.convert_state_dict(shards, meta_params.parse_params(params), "2")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.itemsize for t in expected.values())
    assert max_logit_error(tmp_path / "out", shards, params, "2") <= TOLERANCE


# --------------------------------------------------------------------------- output folder


def test_output_folder_readme_kept_and_existing_model_needs_force_and_leftovers_go(tmp_path, sp_model):
    model_dir, _, _ = make_download(tmp_path / "in", "2", sp_model, n_shards=2)
    out = tmp_path / "weights"
    out.mkdir()
    (out / "README.md").write_text("tracked readme\n")
    run(model_dir, out, llama_version="2", max_file_bytes=40_000)
    sharded = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(sharded) > 1 and (out / "README.md").read_text() == "tracked readme\n"

    with pytest.raises(ConversionError, match="already holds a model.*--force"):
        run(model_dir, out, llama_version="2")
    (out / ".converting-killed").mkdir()  # what a conversion killed outright leaves behind
    (out / ".converting-killed" / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    run(model_dir, out, llama_version="2", force=True)  # one file now: the old shards must go
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json",  # LLaMA 2's SentencePiece file copied, as HF's repos ship it
    ]


def test_failure_midway_leaves_no_output(tmp_path, sp_model, monkeypatch):
    model_dir, _, _ = make_download(tmp_path / "in", "2", sp_model)

    def broken_layer(shards, layer, params):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(conversion_run, "convert_layer", broken_layer)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(model_dir, tmp_path / "new", llama_version="2")
    assert not (tmp_path / "new").exists()

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "README.md").write_text("x")
    with pytest.raises(RuntimeError):
        run(model_dir, tmp_path / "weights", llama_version="2")
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["README.md"]


# --------------------------------------------------------------------------- bad input


def _drop(path: Path):
    path.unlink()


def _append_key(model_dir: Path, key: str):
    state = torch.load(model_dir / "consolidated.00.pth")
    state[key] = torch.zeros(3)
    torch.save(state, model_dir / "consolidated.00.pth")


def _edit_params(model_dir: Path, **changes):
    params = json.loads((model_dir / "params.json").read_text())
    (model_dir / "params.json").write_text(json.dumps({**params, **changes}))


def _perturb_norm_in_shard_1(model_dir: Path):
    state = torch.load(model_dir / "consolidated.01.pth")
    state["layers.1.ffn_norm.weight"] += 1
    torch.save(state, model_dir / "consolidated.01.pth")


BAD_INPUTS = {
    "missing folder": (lambda d: d.parent.rename(d.parent.with_name("moved")), {}, "no such folder"),
    "missing params.json": (lambda d: _drop(d / "params.json"), {}, "no params.json"),
    "params not json": (lambda d: (d / "params.json").write_text("{"), {}, "params.json: not readable JSON"),
    "params missing dim": (lambda d: (d / "params.json").write_text('{"n_layers": 2, "n_heads": 4}'), {}, "missing 'dim'"),
    "no shards": (lambda d: [_drop(p) for p in d.glob("*.pth")], {}, "no consolidated.00.pth"),
    "missing shard": (lambda d: _drop(d / "consolidated.01.pth"), {}, r"missing shard\(s\) consolidated.01.pth of 2"),
    "extra shard": (lambda d: (d / "consolidated.02.pth").write_bytes((d / "consolidated.01.pth").read_bytes()), {},
                    "3 shards cannot split layers.0.attention.wk.weight"),
    "shapes disagree with params": (lambda d: _edit_params(d, dim=128), {}, r"has shape .* expected"),
    "more layers than params": (lambda d: _edit_params(d, n_layers=1), {}, r"unknown keys layers.1.*n_layers 1"),
    "unknown key": (lambda d: _append_key(d, "layers.0.attention.bias"), {}, "unknown keys layers.0.attention.bias"),
    "replicated norm differs": (_perturb_norm_in_shard_1, {}, "layers.1.ffn_norm.weight differs"),
    "corrupt shard": (lambda d: (d / "consolidated.01.pth").write_bytes(b"not a zip"), {}, "consolidated.01.pth: cannot load"),
    "no tokenizer": (lambda d: _drop(d.parent / "tokenizer.model"), {}, "no tokenizer.model in"),
    "corrupt tokenizer": (lambda d: (d.parent / "tokenizer.model").write_bytes(b"\x00\xff" * 50), {},
                          "tokenizer.model: not a SentencePiece model"),
    "version 3 on sentencepiece": (lambda d: None, {"llama_version": "3"}, "does not fit the files: tokenizer.model is SentencePiece"),
    "version 3.1 without scaled rope": (lambda d: (d.parent / "tokenizer.model").write_bytes(LLAMA3_TOKENIZER.read_bytes()),
                                        {"llama_version": "3.1"}, "lacks use_scaled_rope"),
    "version 1 or 2 not told": (lambda d: _edit_params(d, n_kv_heads=None), {}, "pass --llama-version 1 or --llama-version 2"),
    "unknown model size": (lambda d: None, {"model_size": "13B"}, r"no such folder \(--model-size 13B\); found: 7B"),
    "several models": (lambda d: (d.parent / "13B").mkdir() or (d.parent / "13B" / "params.json").write_text("{}"), {},
                       "holds several models .7B, 13B.; pick one with --model-size"),
    "scaling factor on llama 2": (lambda d: None, {"llama_version": "2", "rope_scaling_factor": 8.0}, "3.1 and 3.2 only"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, sp_model, case):
    model_dir, _, _ = make_download(tmp_path / "in", "2", sp_model, n_shards=2)
    mutate, kwargs, message = BAD_INPUTS[case]
    mutate(model_dir)
    kwargs = {"llama_version": "2", **kwargs} if "version" not in case else kwargs
    with pytest.raises(ConversionError, match=message):
        run(model_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_embeddings(tmp_path, sp_model):
    model_dir, _, _ = make_download(tmp_path / "in", "2", sp_model, vocab=SP_VOCAB - 10)
    with pytest.raises(ConversionError, match="400 tokens, but tok_embeddings.weight has only 390 rows"):
        run(model_dir, tmp_path / "out", llama_version="2")


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("dim,multiple_of,multiplier,expected", [
    (4096, 256, None, 11008),  # LLaMA 7B
    (5120, 256, None, 13824),  # LLaMA 13B
    (8192, 256, None, 22016),  # LLaMA 65B
    (8192, 4096, 1.3, 28672),  # LLaMA 2 70B
    (4096, 1024, 1.3, 14336),  # LLaMA 3 8B
    (16384, 4096, 1.2, 53248),  # LLaMA 3.1 405B
    (2048, 256, 1.5, 8192),  # LLaMA 3.2 1B
    (3072, 256, 1.0, 8192),  # LLaMA 3.2 3B
])
def test_ffn_dim_of_published_models(dim, multiple_of, multiplier, expected):
    params = MetaParams(dim=dim, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=-1, multiple_of=multiple_of,
                        ffn_dim_multiplier=multiplier)
    assert params.ffn_dim == expected


def _params(**changes) -> MetaParams:
    return MetaParams(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": -1, **changes})


@pytest.mark.parametrize("requested,params,kind,has_output,expected", [
    (None, _params(), "tiktoken", True, "3"),
    (None, _params(use_scaled_rope=True), "tiktoken", False, "3.2"),
    (None, _params(n_kv_heads=2), "sentencepiece", True, "2"),
    ("1", _params(), "sentencepiece", True, "1"),
    ("3.2", _params(use_scaled_rope=True), "tiktoken", True, "3.2"),
    (None, _params(use_scaled_rope=True), "tiktoken", True, "pass --llama-version 3.1 or --llama-version 3.2"),
    (None, _params(vocab_size=128256), "sentencepiece", True, "vocab_size 128256"),
    ("2", _params(), "tiktoken", True, "tokenizer.model is a tiktoken file"),
    ("3", _params(use_scaled_rope=True), "tiktoken", True, "only LLaMA 3.1 and 3.2 use"),
    ("1", _params(n_kv_heads=2), "sentencepiece", True, "LLaMA 1 never had"),
    ("3.1", _params(use_scaled_rope=True), "tiktoken", False, "only LLaMA 3.2 ties"),
])
def test_version_detection(requested, params, kind, has_output, expected):
    if expected in meta_params.VERSIONS:
        assert resolve_version(requested, params, kind, has_output) == expected
    else:
        with pytest.raises(ConversionError, match=expected):
            resolve_version(requested, params, kind, has_output)


def test_permute_rotary_turns_pairs_into_halves():
    rows = torch.arange(8.0)[:, None]  # one head of 8: pairs (0,1) (2,3) (4,5) (6,7)
    assert state_dict.permute_rotary(rows, n_heads=1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# --------------------------------------------------------------------------- command line


def test_command_line(tmp_path, sp_model):
    model_dir, _, _ = make_download(tmp_path / "in", "2", sp_model, n_shards=2, kv_heads=None)
    command = [sys.executable, str(REPO / "convert_weights.py"), "--input-dir", str(model_dir.parent),
               "--output-dir", str(tmp_path / "out"), "--no-progress"]
    failed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: SentencePiece tokenizer without grouped-query attention")
    assert "Traceback" not in failed.stderr and not (tmp_path / "out").exists()

    done = subprocess.run(command + ["--llama-version", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "LLaMA 2 (given)" in done.stdout and "peak memory" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("version,kv_heads,tokenizer_in_parent", [("1", None, True), ("3.1", 2, False)])
def test_command_line_on_the_model_folder_itself(tmp_path, sp_model, version, kv_heads, tokenizer_in_parent):
    """--input-dir may name the folder that holds params.json (tokenizer beside it or one level up)."""
    model_dir, params, shards = make_download(tmp_path / "in", version, sp_model, n_shards=2, kv_heads=kv_heads)
    assert (model_dir / "params.json").is_file()
    assert (model_dir.parent / "tokenizer.model").is_file() == tokenizer_in_parent
    done = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), "--input-dir", str(model_dir),
                           "--output-dir", str(tmp_path / "out"), "--llama-version", version, "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_matches_reference(tmp_path / "out", shards, params, version)
