"""params.json (with the defaults of Meta's ModelArgs) and which LLaMA version a checkpoint is."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import ConversionError
from . import tokenizer as tok

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
