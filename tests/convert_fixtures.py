"""Tiny Meta-format LLaMA downloads built on the fly: params.json, consolidated.NN.pth, checklist.chk
and a tokenizer.model, laid out as Meta's download scripts lay them out.

Shards are cut the way fairscale's model-parallel layers own them (see meta_reference.py):
column-parallel rows, row-parallel columns, the embedding by columns (LLaMA 1/2) or by
vocabulary rows (3.x), norms copied into every shard.
"""

import hashlib
import io
import json
from pathlib import Path

import torch
from conftest import SHARED_DATA

LLAMA3_TOKENIZER = SHARED_DATA / "llama3_tokenizer.model"
LLAMA3_VOCAB = 128256

# Meta key under layers.{i}. -> dim that model parallelism cuts (None: replicated).
LAYER_SPLIT = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}


def sample_texts() -> list[str]:
    """Real instruction data (../shared/data) plus text that trips tokenizers."""
    records = json.loads((SHARED_DATA / "alpaca_data_sample.json").read_text())
    texts = [" ".join(filter(None, (r["instruction"], r["input"], r["output"]))) for r in records]
    return texts + [
        "Hello world", " Hello world", "  two leading spaces", "trailing space ", "a  b   c    d",
        "", " ", "\n", "\t tab\tand\nnewline\r\nCRLF", "Digits 1234567890 and 3.14159, -42, 1e10",
        "unicode: café naïve Ärger 日本語のテキスト Ελληνικά русский עברית", "emoji 🤖🦙🎉 and 𝔘𝔫𝔦",
        "I'M HERE, you're there; we'LL see. Don't!", "code: def f(x):\n    return x ** 2  # square",
        "x" * 500, "!!!???...,,,;;;", "\u00a0non-breaking\u3000ideographic space",
    ]


def train_sentencepiece(path: Path, vocab_size: int = 400, **options) -> Path:
    """A tiny SentencePiece model; defaults follow LLaMA's tokenizer.model (BPE, byte fallback,
    split digits, identity normalization, dummy prefix, whitespace kept)."""
    import sentencepiece as spm

    settings = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True, character_coverage=0.9995, unk_id=0, bos_id=1,
                    eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    settings.update(options)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts()[:100]), model_writer=model, **settings)
    path.write_bytes(model.getvalue())
    return path


def llama_params(version: str, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = 2,
                 vocab_size: int = -1, **extra) -> dict:
    """params.json as Meta writes it for that version (LLaMA 1 has no n_kv_heads, 3.x rope_theta...)."""
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": 32,
              "norm_eps": 1e-6 if version == "1" else 1e-5, "vocab_size": vocab_size}
    if n_kv_heads is not None and version != "1":
        params["n_kv_heads"] = n_kv_heads
    if version.startswith("3"):
        params.update(vocab_size=LLAMA3_VOCAB, rope_theta=500000.0, ffn_dim_multiplier=1.3)
    if version in ("3.1", "3.2"):
        params["use_scaled_rope"] = True
    params.update(extra)
    return params


def ffn_dim(params: dict) -> int:
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return params["multiple_of"] * -(-hidden // params["multiple_of"])


def random_weights(params: dict, vocab: int, seed: int = 0, output: bool = True, dtype=torch.float32,
                   rope_freqs: bool = False) -> dict:
    """Full (unsharded) Meta state dict, scaled so that attention is far from uniform and the
    rotary layout matters. LLaMA 1/2 files also carry the `rope.freqs` buffer (rope_freqs)."""
    gen = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    head_dim, kv = dim // heads, params.get("n_kv_heads") or heads
    ffn = ffn_dim(params)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def norm():
        return (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype)

    state = {"tok_embeddings.weight": rand(vocab, dim, scale=1 / dim**0.5), "norm.weight": norm()}
    for i in range(params["n_layers"]):
        state.update({
            f"layers.{i}.attention.wq.weight": rand(heads * head_dim, dim, scale=2 / dim**0.5),
            f"layers.{i}.attention.wk.weight": rand(kv * head_dim, dim, scale=2 / dim**0.5),
            f"layers.{i}.attention.wv.weight": rand(kv * head_dim, dim, scale=1 / dim**0.5),
            f"layers.{i}.attention.wo.weight": rand(dim, heads * head_dim, scale=1 / dim**0.5),
            f"layers.{i}.feed_forward.w1.weight": rand(ffn, dim, scale=1 / dim**0.5),
            f"layers.{i}.feed_forward.w2.weight": rand(dim, ffn, scale=1 / ffn**0.5),
            f"layers.{i}.feed_forward.w3.weight": rand(ffn, dim, scale=1 / dim**0.5),
            f"layers.{i}.attention_norm.weight": norm(),
            f"layers.{i}.ffn_norm.weight": norm(),
        })
    if output:
        state["output.weight"] = rand(vocab, dim, scale=1 / dim**0.5)
    if rope_freqs:
        state["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return state


def split_dim(key: str, version: str) -> int | None:
    if key.startswith("layers."):
        return LAYER_SPLIT[key.split(".", 2)[2]]
    return {"tok_embeddings.weight": 0 if version.startswith("3") else 1, "output.weight": 0}.get(key)


def shard(state: dict, n: int, version: str) -> list[dict]:
    shards = [{} for _ in range(n)]
    for key, tensor in state.items():
        dim = split_dim(key, version)
        parts = [tensor] * n if dim is None else tensor.chunk(n, dim=dim)
        for rank, part in enumerate(parts):
            shards[rank][key] = part.clone()
    return shards


def write_download(model_dir: Path, params: dict, shards: list[dict], tokenizer: Path | None,
                   tokenizer_in_parent: bool = False) -> Path:
    """The files of one model as Meta's download leaves them; returns model_dir."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "params.json").write_text(json.dumps(params))
    lines = []
    for rank, state in enumerate(shards):
        path = model_dir / f"consolidated.{rank:02d}.pth"
        torch.save(state, path)
        lines.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {path.name}")
    lines.append(f"{hashlib.md5((model_dir / 'params.json').read_bytes()).hexdigest()}  params.json")
    (model_dir / "checklist.chk").write_text("\n".join(lines) + "\n")
    if tokenizer is not None:
        target = (model_dir.parent if tokenizer_in_parent else model_dir) / "tokenizer.model"
        target.write_bytes(tokenizer.read_bytes())
    return model_dir
