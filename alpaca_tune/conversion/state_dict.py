"""The conversion itself, as pure functions over dicts of tensors.

Meta ships `consolidated.NN.pth` files, one per model-parallel rank, each holding a slice of
every weight (fairscale's layout): column-parallel weights (wq, wk, wv, w1, w3, output) are
cut along their output rows, row-parallel ones (wo, w2) along their input columns, the token
embedding along the model dim in LLaMA 1/2 (ParallelEmbedding) and along the vocabulary in
LLaMA 3 (VocabParallelEmbedding), and the norms are copied whole into every file.

Meta's rotary embedding rotates adjacent pairs (x0, x1), (x2, x3), ... as complex numbers;
transformers' rotates x[i] with x[i + head_dim/2]. Reordering each head's rows of wq and wk
from pair order to half-split order makes the two compute the same attention scores.
"""

from collections.abc import Iterator, Mapping, Sequence

import torch

from . import ConversionError
from .params import MetaParams

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
Named = tuple[str, torch.Tensor]


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
