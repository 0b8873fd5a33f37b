"""Meta's LLaMA checkpoints (1, 2, 3, 3.1, 3.2) -> Hugging Face Llama weights, config, tokenizer.

Meta ships `consolidated.NN.pth` files, one per model-parallel rank, each holding a slice of
every weight (fairscale's layout): column-parallel weights (wq, wk, wv, w1, w3, output) are
cut along their output rows, row-parallel ones (wo, w2) along their input columns, the token
embedding along the model dim in LLaMA 1/2 (ParallelEmbedding) and along the vocabulary in
LLaMA 3 (VocabParallelEmbedding), and the norms are copied whole into every file.

Meta's rotary embedding rotates adjacent pairs (x0, x1), (x2, x3), ... as complex numbers;
transformers' rotates x[i] with x[i + head_dim/2]. Reordering each head's rows of wq and wk
from pair order to half-split order makes the two compute the same attention scores.

The numerical work is pure functions over dicts of tensors (`convert_layer`,
`convert_state_dict`); `convert_checkpoint` is the file edge: it memory-maps the shards,
converts one layer at a time and streams safetensors to a temporary folder that only becomes
the output once everything is written.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import convert_tokenizer as tok
from .allocator import release_freed_memory
from .errors import UserError

VERSIONS = ("1", "2", "3", "3.1", "3.2")
MAX_POSITIONS = {"1": 2048, "2": 4096, "3": 8192, "3.1": 131072, "3.2": 131072}
DEFAULT_ROPE_THETA = {"1": 10000.0, "2": 10000.0, "3": 500000.0, "3.1": 500000.0, "3.2": 500000.0}
# "llama3" rope scaling. Meta's reference model definition (llama3 / llama-models model.py) hard-codes
# factor 8 for every 3.x model, and exactness against that definition is what we promise, so 8 is
# the default for 3.2 too. Hugging Face's published 3.2 (1B, 3B) configs use 32, which Meta called
# the trained value (llama-models issues 166, 241): --rope-scaling-factor 32 gives that instead.
# params.json's rope_scaling_factor, if a checkpoint has one, or --rope-scaling-factor wins.
ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPE_SCALING_FACTOR = {"3.1": 8.0, "3.2": 8.0}
LLAMA3_VOCAB = 128256

# Meta name under layers.{i}. -> (HF name under model.layers.{i}., dim the shards are cut on;
# None: replicated in every shard).
LAYER_KEYS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
DROPPED_KEYS = {"rope.freqs"}  # a buffer Meta's code recomputes anyway
MODEL_FILES = (  # what a converted model folder holds; --force replaces exactly these
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
Named = tuple[str, torch.Tensor]


class ConversionError(UserError):
    """Input that cannot be converted; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- params.json


@dataclass(frozen=True)
class MetaParams:
    """params.json, with the defaults of Meta's ModelArgs for keys it leaves out."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # -1 in LLaMA 1/2: the tokenizer decides
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float | None = None  # None: the version's default
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None  # None: the version's default

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def parse_params(raw: Mapping, source: str = "params.json") -> MetaParams:
    raw = raw.get("model", raw)  # some exports nest the arguments (transformers' old converter allowed it)
    unsupported = {"quantization_args", "vision_chunk_size", "vision_num_cross_attention_layers", "moe_args"}
    if found := sorted(unsupported & raw.keys()):
        raise ConversionError(f"{source}: {', '.join(found)}: quantized, vision and MoE checkpoints are not supported")
    try:
        dim, n_layers, n_heads = int(raw["dim"]), int(raw["n_layers"]), int(raw["n_heads"])
        n_kv_heads = int(raw.get("n_kv_heads") or n_heads)
        params = MetaParams(
            dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=int(raw.get("vocab_size", -1)),
            multiple_of=int(raw.get("multiple_of", 256)),
            ffn_dim_multiplier=_optional_float(raw, "ffn_dim_multiplier"),
            norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=_optional_float(raw, "rope_theta"),
            use_scaled_rope=bool(raw.get("use_scaled_rope", False)),
            rope_scaling_factor=_optional_float(raw, "rope_scaling_factor"),
        )
    except KeyError as exc:
        raise ConversionError(f"{source}: missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{source}: {exc}") from exc
    if min(dim, n_layers, n_heads, n_kv_heads, params.multiple_of) <= 0:
        raise ConversionError(f"{source}: dim, n_layers, n_heads, n_kv_heads and multiple_of must be positive")
    if dim % n_heads or n_heads % n_kv_heads or params.head_dim % 2:
        raise ConversionError(
            f"{source}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}: need dim divisible by n_heads "
            "into an even head size, and n_heads divisible by n_kv_heads"
        )
    return params


def _optional_float(raw: Mapping, key: str) -> float | None:
    return None if raw.get(key) is None else float(raw[key])


def resolve_version(requested: str | None, params: MetaParams, tokenizer_kind: str, has_output: bool) -> str:
    """The LLaMA version: checked against the files when given, read from them when they tell."""
    llama3 = tokenizer_kind == tok.TIKTOKEN
    if params.vocab_size == LLAMA3_VOCAB and not llama3:
        raise ConversionError("params.json has vocab_size 128256 (LLaMA 3.x) but tokenizer.model is SentencePiece")
    if requested is not None:
        wrong = None
        if requested.startswith("3") != llama3:
            kind = "a tiktoken file (LLaMA 3.x)" if llama3 else "SentencePiece (LLaMA 1/2)"
            wrong = f"tokenizer.model is {kind}"
        elif requested in ("3.1", "3.2") and not params.use_scaled_rope:
            wrong = "params.json lacks use_scaled_rope, which every LLaMA 3.1 and 3.2 checkpoint sets"
        elif requested in ("1", "2", "3") and params.use_scaled_rope:
            wrong = "params.json sets use_scaled_rope, which only LLaMA 3.1 and 3.2 use"
        elif requested == "1" and params.n_kv_heads != params.n_heads:
            wrong = "params.json has n_kv_heads (grouped-query attention), which LLaMA 1 never had"
        elif requested != "3.2" and not has_output:
            wrong = "the checkpoint has no output.weight; only LLaMA 3.2 ties it to the embeddings"
        if wrong:
            raise ConversionError(f"--llama-version {requested} does not fit the files: {wrong}")
        return requested
    if llama3 and not params.use_scaled_rope:
        return "3"
    if llama3 and not has_output:
        return "3.2"
    if not llama3 and params.n_kv_heads != params.n_heads:
        return "2"
    if llama3:
        raise ConversionError(
            "params.json has use_scaled_rope: LLaMA 3.1 or 3.2, which the files do not tell apart (3.2 small "
            "models tie the output head to the embeddings); pass --llama-version 3.1 or --llama-version 3.2"
        )
    raise ConversionError(
        "SentencePiece tokenizer without grouped-query attention: LLaMA 1 or 2, which the files do not tell apart "
        "(context 2048 vs 4096); pass --llama-version 1 or --llama-version 2"
    )


# --------------------------------------------------------------------------- pure conversion


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved rotary pairs to HF's half-split order, per head.

    Each head's rows come as [re0, im0, re1, im1, ...]; HF wants [re0, re1, ..., im0, im1, ...].
    """
    out_dim, in_dim = weight.shape  # [n_heads * head_dim, dim]
    pairs = out_dim // n_heads // 2
    return weight.view(n_heads, pairs, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def merge_shards(parts: Sequence[torch.Tensor], split_dim: int | None, name: str) -> torch.Tensor:
    """One weight from its model-parallel slices; replicated ones must agree in every shard."""
    if split_dim is not None:
        return torch.cat(list(parts), dim=split_dim) if len(parts) > 1 else parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if not torch.equal(part, parts[0]):
            raise ConversionError(f"{name} differs between consolidated.00.pth and consolidated.{index:02d}.pth; "
                                  "Meta's shards each hold the same copy")
    return parts[0]


def embedding_split_dim(version: str) -> int:
    return 0 if version.startswith("3") else 1  # VocabParallelEmbedding vs ParallelEmbedding


def convert_layer(shards: Sequence[Mapping[str, torch.Tensor]], layer: int, params: MetaParams) -> Iterator[Named]:
    """Transformer block `layer`: (HF name, tensor) pairs, one at a time so that a caller
    writing them out holds a single merged weight, not a whole layer."""
    for meta_key, (hf_key, split_dim) in LAYER_KEYS.items():
        name = f"layers.{layer}.{meta_key}"
        weight = merge_shards([shard[name] for shard in shards], split_dim, name)
        if meta_key == "attention.wq.weight":
            weight = permute_rotary(weight, params.n_heads)  # [n_heads * head_dim, dim]
        elif meta_key == "attention.wk.weight":
            weight = permute_rotary(weight, params.n_kv_heads)  # [n_kv_heads * head_dim, dim]
        yield f"model.layers.{layer}.{hf_key}", weight


def convert_embeddings(shards: Sequence[Mapping[str, torch.Tensor]], version: str) -> torch.Tensor:
    parts = [shard["tok_embeddings.weight"] for shard in shards]
    return merge_shards(parts, embedding_split_dim(version), "tok_embeddings.weight")  # [vocab, dim]


def convert_head(shards: Sequence[Mapping[str, torch.Tensor]], tied: bool) -> Iterator[Named]:
    """Final norm and, unless tied to the embeddings, the output projection."""
    yield "model.norm.weight", merge_shards([s["norm.weight"] for s in shards], None, "norm.weight")
    if not tied:
        yield "lm_head.weight", merge_shards([s["output.weight"] for s in shards], 0, "output.weight")


def convert_state_dict(shards: Sequence[Mapping[str, torch.Tensor]], params: MetaParams, version: str,
                       tied: bool = False) -> dict:
    """The whole model at once (tests, small models); convert_checkpoint streams the same pieces."""
    out = {"model.embed_tokens.weight": convert_embeddings(shards, version)}
    for layer in range(params.n_layers):
        out.update(convert_layer(shards, layer, params))
    out.update(convert_head(shards, tied))
    return out


def expected_shapes(params: MetaParams, vocab: int) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every Meta tensor, [out, in] as nn.Linear stores it."""
    q_dim, kv_dim, ffn = params.n_heads * params.head_dim, params.n_kv_heads * params.head_dim, params.ffn_dim
    per_layer = {
        "attention.wq.weight": (q_dim, params.dim), "attention.wk.weight": (kv_dim, params.dim),
        "attention.wv.weight": (kv_dim, params.dim), "attention.wo.weight": (params.dim, q_dim),
        "feed_forward.w1.weight": (ffn, params.dim), "feed_forward.w2.weight": (params.dim, ffn),
        "feed_forward.w3.weight": (ffn, params.dim),
        "attention_norm.weight": (params.dim,), "ffn_norm.weight": (params.dim,),
    }
    shapes = {f"layers.{i}.{k}": s for i in range(params.n_layers) for k, s in per_layer.items()}
    shapes.update({"tok_embeddings.weight": (vocab, params.dim), "norm.weight": (params.dim,),
                   "output.weight": (vocab, params.dim)})
    return shapes


def split_dims(params: MetaParams, version: str) -> dict[str, int | None]:
    dims = {f"layers.{i}.{k}": d for i in range(params.n_layers) for k, (_, d) in LAYER_KEYS.items()}
    dims.update({"tok_embeddings.weight": embedding_split_dim(version), "norm.weight": None, "output.weight": 0})
    return dims


def check_shards(shard_shapes: Sequence[Mapping[str, tuple]], names: Sequence[str], params: MetaParams,
                 version: str) -> int:
    """Every shard has exactly the expected keys with its slice's shape; returns the vocab size."""
    n = len(shard_shapes)
    first = shard_shapes[0]
    if "tok_embeddings.weight" not in first:
        raise ConversionError(f"{names[0]}: no tok_embeddings.weight; is this a Meta LLaMA checkpoint?")
    vocab = first["tok_embeddings.weight"][0] * (n if embedding_split_dim(version) == 0 else 1)
    if params.vocab_size > 0 and vocab != params.vocab_size:
        raise ConversionError(f"{names[0]}: tok_embeddings.weight has {vocab} rows in all, params.json vocab_size {params.vocab_size}")
    full, dims = expected_shapes(params, vocab), split_dims(params, version)
    for shapes, name in zip(shard_shapes, names):
        keys = set(shapes) - DROPPED_KEYS
        if unknown := sorted(keys - set(full), key=_natural):
            raise ConversionError(f"{name}: unknown keys {', '.join(unknown[:5])}"
                                  f"{' ...' if len(unknown) > 5 else ''} (params.json: n_layers {params.n_layers})")
        missing = sorted(set(full) - keys - ({"output.weight"} if version == "3.2" else set()), key=_natural)
        if missing:
            raise ConversionError(f"{name}: missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if ("output.weight" in keys) != ("output.weight" in first):
            raise ConversionError(f"{name}: output.weight present in some shards only")
        for key in sorted(keys, key=_natural):
            want = list(full[key])
            if (d := dims[key]) is not None:
                if want[d] % n:
                    raise ConversionError(f"{n} shards cannot split {key} of shape {tuple(full[key])} on dim {d}")
                want[d] //= n
            if tuple(shapes[key]) != tuple(want):
                raise ConversionError(
                    f"{name}: {key} has shape {tuple(shapes[key])}, expected {tuple(want)} for {n} shard(s) "
                    f"of LLaMA {version} with params.json's dim {params.dim}, n_heads {params.n_heads}, "
                    f"n_kv_heads {params.n_kv_heads}, ffn size {params.ffn_dim}"
                )
    return vocab


def _natural(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------- HF config


def hf_config(params: MetaParams, version: str, vocab: int, tied: bool, dtype: torch.dtype,
              tokenizer: tok.ConvertedTokenizer):
    from transformers import LlamaConfig

    theta = params.rope_theta if params.rope_theta is not None else DEFAULT_ROPE_THETA[version]
    rope = {"rope_type": "default", "rope_theta": theta}
    if version in ROPE_SCALING_FACTOR:
        factor = params.rope_scaling_factor or ROPE_SCALING_FACTOR[version]
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, **ROPE_SCALING}
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=params.dim, intermediate_size=params.ffn_dim,
        num_hidden_layers=params.n_layers, num_attention_heads=params.n_heads,
        num_key_value_heads=params.n_kv_heads, head_dim=params.head_dim, rms_norm_eps=params.norm_eps,
        max_position_embeddings=MAX_POSITIONS[version], rope_parameters=rope, tie_word_embeddings=tied,
        bos_token_id=tokenizer.token_id(tokenizer.bos_token), eos_token_id=tokenizer.token_id(tokenizer.eos_token),
        dtype=str(dtype).removeprefix("torch."),
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def stop_token_ids(tokenizer: tok.ConvertedTokenizer) -> int | list[int]:
    """What Meta's generate() stops on: end of text, plus end of turn/message in LLaMA 3.x."""
    names = [tokenizer.eos_token, "<|eom_id|>", "<|eot_id|>"] if tokenizer.kind == tok.TIKTOKEN else [tokenizer.eos_token]
    ids = [i for i in (tokenizer.token_id(n) for n in names) if i is not None]
    return ids[0] if len(ids) == 1 else ids


def write_configs(out_dir: Path, params: MetaParams, version: str, vocab: int, tied: bool, dtype: torch.dtype,
                  tokenizer: tok.ConvertedTokenizer) -> None:
    from transformers import GenerationConfig

    config = hf_config(params, version, vocab, tied, dtype, tokenizer)
    config.save_pretrained(out_dir)
    # Readers older than transformers 5 (vLLM, llama.cpp's converter) look for these two keys.
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    data["rope_theta"] = config.rope_parameters["rope_theta"]
    scaling = {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    data["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stop_token_ids(tokenizer)).save_pretrained(out_dir)
    tok.save_tokenizer(tokenizer, out_dir, MAX_POSITIONS[version])


# --------------------------------------------------------------------------- reading Meta's files


def find_model_dir(input_dir: Path, model_size: str | None) -> Path:
    """The folder holding params.json: input_dir itself, input_dir/<model_size>, or its only model."""
    if not input_dir.is_dir():
        raise ConversionError(f"{input_dir}: no such folder; put Meta's files there (see unconverted-weights/README.md)")
    if model_size:
        model_dir = input_dir / model_size
        if not model_dir.is_dir():
            raise ConversionError(f"{model_dir}: no such folder (--model-size {model_size}); found: "
                                  f"{', '.join(_model_folders(input_dir)) or 'none'}")
        return model_dir
    if (input_dir / "params.json").exists() or any(input_dir.glob("consolidated.*.pth")):
        return input_dir
    folders = _model_folders(input_dir)
    if len(folders) == 1:
        return input_dir / folders[0]
    if folders:
        raise ConversionError(f"{input_dir} holds several models ({', '.join(folders)}); pick one with --model-size")
    raise ConversionError(f"{input_dir}: no params.json, here or in a subfolder (expected {input_dir}/7B/params.json or similar)")


def _model_folders(input_dir: Path) -> list[str]:
    return sorted((d.name for d in input_dir.iterdir() if (d / "params.json").exists()), key=_natural)


def read_params(model_dir: Path) -> MetaParams:
    path = model_dir / "params.json"
    if not path.exists():
        raise ConversionError(f"{path}: missing (Meta's download puts it next to consolidated.00.pth)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return parse_params(raw, str(path))


def find_shards(model_dir: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, none missing (checklist.chk lists them all)."""
    found = {}
    for path in model_dir.glob("consolidated.*.pth"):
        if match := re.fullmatch(r"consolidated\.(\d+)\.pth", path.name):
            found[int(match.group(1))] = path
    listed = set()
    checklist = model_dir / "checklist.chk"
    if checklist.exists():
        listed = {int(m.group(1)) for m in re.finditer(r"consolidated\.(\d+)\.pth", checklist.read_text(errors="replace"))}
    if not found:
        raise ConversionError(f"{model_dir}: no consolidated.00.pth (Meta's weight files)")
    expected = range(max(max(found), max(listed, default=0)) + 1)
    if missing := [i for i in expected if i not in found]:
        raise ConversionError(f"{model_dir}: missing shard(s) {', '.join(f'consolidated.{i:02d}.pth' for i in missing)}"
                              f" of {len(expected)}")
    return [found[i] for i in expected]


def find_tokenizer(model_dir: Path) -> Path:
    """LLaMA 3 keeps tokenizer.model next to the weights; LLaMA 1/2 downloads one level up."""
    for folder in (model_dir, model_dir.parent):
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    raise ConversionError(f"no tokenizer.model in {model_dir} or {model_dir.parent}")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensors memory-mapped, not read: pages come in as a layer touches them."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise ConversionError(f"{path}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: not a dict of tensors")
    return state


def load_shards(paths: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_shard(p) for p in paths]


def is_tied(shard_paths: Sequence[Path], version: str, has_output: bool) -> bool:
    """LLaMA 3.2 ties output to the embeddings: its output.weight is absent or a copy of them."""
    if not has_output:
        return True
    shards = load_shards(shard_paths)
    embeddings = [s["tok_embeddings.weight"] for s in shards]
    if not torch.equal(shards[0]["output.weight"][0], embeddings[0][0] if embedding_split_dim(version) == 0
                       else torch.cat([e[0] for e in embeddings])):
        return False  # first rows differ: no need to compare whole matrices
    return torch.equal(convert_embeddings(shards, version), merge_shards([s["output.weight"] for s in shards], 0, "output.weight"))


# --------------------------------------------------------------------------- writing safetensors


class StreamingSafetensors:
    """Sharded safetensors written tensor by tensor, in the planned order.

    Every shape is known before the first byte (from params.json), so each file's header is
    written first and a tensor can be dropped as soon as its bytes are out: memory holds one
    tensor, never a whole file.
    """

    def __init__(self, out_dir: Path, plan: Sequence[tuple[str, tuple, torch.dtype]], max_file_bytes: int):
        self.files: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry)
            if self.files[-1] and size + nbytes > max_file_bytes:
                self.files.append([])
                size = 0
            self.files[-1].append(entry)
            size += nbytes
        n = len(self.files)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out_dir, self.total_bytes = out_dir, sum(map(_nbytes, plan))
        self._pending = [(i, entry) for i, entries in enumerate(self.files) for entry in entries]
        self._next, self._handle, self._open_index = 0, None, -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (want_name, shape, dtype) = self._pending[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, tuple(shape), dtype):
            raise AssertionError(f"wrote {name} {tuple(tensor.shape)} {tensor.dtype}, planned {want_name} {shape} {dtype}")
        if index != self._open_index:
            self._open(index)
        self._handle.write(tensor.contiguous().view(torch.uint8).numpy().data)  # no extra copy
        self._next += 1
        if self._next == len(self._pending) or self._pending[self._next][0] != index:
            self._handle.close()

    def _open(self, index: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.files[index]:
            end = offset + _nbytes((name, shape, dtype))
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
        self._handle = open(self.out_dir / self.names[index], "wb")
        self._handle.write(struct.pack("<Q", len(blob)) + blob)
        self._open_index = index

    def close(self) -> None:
        if self._next != len(self._pending):
            raise AssertionError(f"{len(self._pending) - self._next} planned tensors never written")
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, entries in enumerate(self.files) for name, _, _ in entries}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()


def _nbytes(entry: tuple[str, tuple, torch.dtype]) -> int:
    _, shape, dtype = entry
    return math.prod(shape) * dtype.itemsize


# --------------------------------------------------------------------------- the whole conversion


@dataclass
class Checkpoint:
    """A Meta download, read and checked: everything but the weights themselves."""

    model_dir: Path
    shard_paths: list[Path]
    params: MetaParams
    version: str
    vocab: int
    tied: bool
    source_dtypes: dict[str, torch.dtype]
    tokenizer_path: Path
    tokenizer: tok.ConvertedTokenizer


def read_checkpoint(input_dir: Path, model_size: str | None = None, llama_version: str | None = None,
                    rope_scaling_factor: float | None = None) -> Checkpoint:
    """Find and check every file; raises ConversionError before anything is written."""
    if llama_version is not None and llama_version not in VERSIONS:
        raise ConversionError(f"--llama-version {llama_version}: expected one of {', '.join(VERSIONS)}")
    model_dir = find_model_dir(input_dir, model_size)
    params = read_params(model_dir)
    if rope_scaling_factor is not None:
        params = dataclasses.replace(params, rope_scaling_factor=rope_scaling_factor)
    shard_paths = find_shards(model_dir)
    tokenizer_path = find_tokenizer(model_dir)

    # Shapes and dtypes only: loading with mmap reads the small pickled index, not the weights.
    shards = load_shards(shard_paths)
    shard_shapes = [{k: tuple(v.shape) for k, v in s.items()} for s in shards]
    source_dtypes = {k: v.dtype for k, v in shards[0].items() if k not in DROPPED_KEYS}
    del shards
    has_output = "output.weight" in shard_shapes[0]
    try:
        tokenizer_kind = tok.tokenizer_kind(tokenizer_path)
    except OSError as exc:
        raise ConversionError(f"{tokenizer_path}: cannot read ({exc.strerror})") from exc
    version = resolve_version(llama_version, params, tokenizer_kind, has_output)
    if params.rope_scaling_factor is not None and version not in ROPE_SCALING_FACTOR:
        raise ConversionError(f"a rope scaling factor applies to LLaMA 3.1 and 3.2 only, not {version}")
    vocab = check_shards(shard_shapes, [p.name for p in shard_paths], params, version)
    if odd := sorted({str(d) for d in source_dtypes.values() if d not in SAFETENSORS_DTYPES}):
        raise ConversionError(f"{shard_paths[0]}: tensors of dtype {', '.join(odd)}; expected float32/16 or bfloat16")

    try:
        tokenizer = tok.convert_tokenizer(tokenizer_path, version)
    except ValueError as exc:
        raise ConversionError(f"{tokenizer_path}: {exc}") from exc
    if tokenizer.vocab_size > vocab:
        raise ConversionError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens, but tok_embeddings.weight has only {vocab} rows")
    return Checkpoint(model_dir, shard_paths, params, version, vocab, is_tied(shard_paths, version, has_output),
                      source_dtypes, tokenizer_path, tokenizer)


def output_plan(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[tuple[str, tuple, torch.dtype]]:
    """(HF name, shape, dtype) of every output tensor, in the order _write_weights produces them."""
    full, dtypes = expected_shapes(ckpt.params, ckpt.vocab), ckpt.source_dtypes
    plan = [("model.embed_tokens.weight", full["tok_embeddings.weight"], dtype or dtypes["tok_embeddings.weight"])]
    for layer in range(ckpt.params.n_layers):
        for meta_key, (hf_key, _) in LAYER_KEYS.items():
            key = f"layers.{layer}.{meta_key}"
            plan.append((f"model.layers.{layer}.{hf_key}", full[key], dtype or dtypes[key]))
    plan.append(("model.norm.weight", full["norm.weight"], dtype or dtypes["norm.weight"]))
    if not ckpt.tied:
        plan.append(("lm_head.weight", full["output.weight"], dtype or dtypes["output.weight"]))
    return plan


@dataclass
class ConversionResult:
    output_dir: Path
    version: str
    files: list[str]
    total_bytes: int


def convert_checkpoint(
    input_dir: Path | str,
    output_dir: Path | str,
    *,
    model_size: str | None = None,
    llama_version: str | None = None,
    dtype: torch.dtype | None = None,
    rope_scaling_factor: float | None = None,
    force: bool = False,
    max_file_bytes: int = 5 * 10**9,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Meta's download folder -> HF model folder.

    dtype None keeps each tensor's own dtype: fp16 LLaMA 1 stays fp16, bf16 stays bf16.
    rope_scaling_factor overrides the 3.1/3.2 default (8, as Meta's reference code), e.g. 32 for 3.2 to match
    llama-models' reference code, which hard-codes it.
    An output folder that already holds a model is replaced only with force=True; other
    files there (weights/README.md) are left alone.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    old_files = _existing_model_files(output_dir)
    if old_files and not force:
        raise ConversionError(f"{output_dir} already holds a model ({old_files[0].name}, ...); pass --force to replace it")
    ckpt = read_checkpoint(input_dir, model_size, llama_version, rope_scaling_factor)
    params, plan = ckpt.params, output_plan(ckpt, dtype)
    log(f"LLaMA {ckpt.version}{' (given)' if llama_version else ' (detected)'}: {ckpt.model_dir}, "
        f"{len(ckpt.shard_paths)} shard(s), {params.n_layers} layers, dim {params.dim}, {params.n_heads} heads / "
        f"{params.n_kv_heads} kv heads, ffn {params.ffn_dim}, vocab {ckpt.vocab}{', tied embeddings' if ckpt.tied else ''}")
    log(f"tokenizer: {ckpt.tokenizer_path} ({ckpt.tokenizer.kind}, {ckpt.tokenizer.vocab_size} tokens)")
    # Only widening to float32 is exact; fp16 <-> bf16 trade range for precision either way.
    if narrowed := sorted({f"{d} -> {dtype}" for d in ckpt.source_dtypes.values() if dtype not in (None, d, torch.float32)}):
        log(f"note: --dtype casts {', '.join(narrowed)}, which rounds weights (lossy)")

    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    needed = sum(map(_nbytes, plan))
    if (free := shutil.disk_usage(output_dir).free) < needed * 1.01 + 10**8:
        if created:
            output_dir.rmdir()
        raise ConversionError(f"{output_dir}: needs {needed / 1e9:.1f} GB free, has {free / 1e9:.1f} GB")
    # Inside the output folder: same filesystem (cheap renames), and git-ignored with it. A run
    # that was killed outright (no chance to clean up) left its staging folder: remove it now.
    for stale in output_dir.glob(".converting-*"):
        log(f"removing {stale}, left by an interrupted conversion")
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=output_dir))
    writer = StreamingSafetensors(staging, plan, max_file_bytes)
    try:
        _write_weights(writer, ckpt, dtype, progress)
        writer.close()
        write_configs(staging, params, ckpt.version, ckpt.vocab, ckpt.tied, plan[0][2], ckpt.tokenizer)
        _install(staging, output_dir, old_files)
    except BaseException:  # Ctrl-C too: never leave a half-written model behind
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    log(f"wrote {len(writer.names)} safetensors file(s), {needed / 1e9:.2f} GB, and the tokenizer to {output_dir}")
    return ConversionResult(output_dir, ckpt.version, writer.names, needed)


def _write_weights(writer: StreamingSafetensors, ckpt: Checkpoint, dtype: torch.dtype | None, progress: bool) -> None:
    """Embeddings, then one layer at a time, then the head, each from freshly mapped shards.

    Re-mapping per step unmaps the pages the previous step read, so resident memory stays
    near one layer instead of growing to the whole checkpoint.
    """
    from tqdm import tqdm

    steps = [("embeddings", lambda s: [("model.embed_tokens.weight", convert_embeddings(s, ckpt.version))])]
    steps += [(f"layer {i}", lambda s, i=i: convert_layer(s, i, ckpt.params)) for i in range(ckpt.params.n_layers)]
    steps.append(("head", lambda s: convert_head(s, ckpt.tied)))
    with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress,
              file=sys.stderr) as bar:
        for label, step in steps:
            bar.set_postfix_str(label)
            for name, tensor in step(load_shards(ckpt.shard_paths)):
                tensor = tensor if dtype is None else tensor.to(dtype)
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.dtype.itemsize)
            tensor = None  # the last reference into this step's mapped files
            release_freed_memory()  # keeps the peak at about one layer (allocator.py)


def _existing_model_files(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted({p for pattern in MODEL_FILES for p in output_dir.glob(pattern) if p.is_file()})


def _install(staging: Path, output_dir: Path, old_files: Sequence[Path]) -> None:
    """Move the finished files into place; config.json last, so a folder with a config is whole."""
    for path in old_files:
        path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(path, output_dir / path.name)
    staging.rmdir()
