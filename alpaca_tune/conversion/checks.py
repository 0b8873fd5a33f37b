"""What every shard must hold (keys, and each slice's shape) for the params.json beside it."""

import re
from collections.abc import Mapping, Sequence

from . import ConversionError
from .params import MetaParams
from .state_dict import DROPPED_KEYS, LAYER_KEYS, embedding_split_dim


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
        if unknown := sorted(keys - set(full), key=natural_order):
            raise ConversionError(f"{name}: unknown keys {', '.join(unknown[:5])}"
                                  f"{' ...' if len(unknown) > 5 else ''} (params.json: n_layers {params.n_layers})")
        missing = sorted(set(full) - keys - ({"output.weight"} if version == "3.2" else set()), key=natural_order)
        if missing:
            raise ConversionError(f"{name}: missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if ("output.weight" in keys) != ("output.weight" in first):
            raise ConversionError(f"{name}: output.weight present in some shards only")
        for key in sorted(keys, key=natural_order):
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


def natural_order(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
