"""--format meta: Meta's layout, consolidated.NN.pth + params.json (+ tokenizer.model).

The inverse of convert_weights.py's mapping (conversion/state_dict.py): HF names back to Meta's,
q/k rows back from transformers' half-split rotary order to Meta's interleaved pairs, and each
weight cut into --shards model-parallel slices the way fairscale owns them (column-parallel
rows, row-parallel columns, the embedding by model dim in LLaMA 1/2 and by vocabulary in 3.x,
norms copied whole). convert_weights.py on the result gives back the merged HF model exactly.

torch.save needs a shard's whole dict at once, and a 70B shard is ~17 GB; so each slice is first
written as a raw file in the staging folder, and torch.save reads them memory-mapped
(torch.from_file): what it holds are file pages the kernel can drop, not a shard's worth of
allocated memory.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..conversion.params import LLAMA3_VOCAB, ROPE_SCALING_FACTOR, MetaParams
from ..conversion.state_dict import LAYER_KEYS, embedding_split_dim
from . import ExportError
from .hf import progress_bar
from .llama_config import LlamaShape
from .merge import MergedModel

log = logging.getLogger(__name__)
HF_TO_META = {hf: (meta, dim) for meta, (hf, dim) in LAYER_KEYS.items()}


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q_proj/k_proj from HF's half-split order back to Meta's interleaved pairs, per head
    (the inverse of conversion.state_dict.permute_rotary)."""
    out_dim, in_dim = weight.shape
    pairs = out_dim // n_heads // 2
    return weight.reshape(n_heads, 2, pairs, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_params(shape: LlamaShape) -> dict:
    """params.json for this model, with multiple_of / ffn_dim_multiplier chosen so that Meta's
    formula gives back its intermediate size."""
    params = {"dim": shape.hidden, "n_layers": shape.layers, "n_heads": shape.heads, "n_kv_heads": shape.kv_heads,
              "vocab_size": shape.vocab, "norm_eps": shape.norm_eps, "rope_theta": shape.rope_theta}
    params.update(ffn_params(shape.hidden, shape.intermediate))
    if shape.rope_scaling is not None:
        params["use_scaled_rope"] = True
        if shape.rope_scaling.get("factor") != ROPE_SCALING_FACTOR["3.1"]:
            params["rope_scaling_factor"] = shape.rope_scaling.get("factor")
    return params


def ffn_params(dim: int, intermediate: int) -> dict:
    # Meta's own choices first (LLaMA 1/2: 256; 3.x: 1024 with 1.3; 2-70B: 4096 with 1.3), then
    # a multiplier that lands on the size exactly
    base = int(2 * (4 * dim) / 3)
    candidates = [(256, None), (1024, 1.3), (4096, 1.3), (1024, 1.5), (256, 1.3)]
    candidates.append((1, (intermediate + 0.5) / base))
    for multiple_of, multiplier in candidates:
        probe = MetaParams(dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=-1, multiple_of=multiple_of,
                           ffn_dim_multiplier=multiplier)
        if probe.ffn_dim == intermediate:
            return {"multiple_of": multiple_of, **({"ffn_dim_multiplier": multiplier} if multiplier else {})}
    raise ExportError(f"intermediate_size {intermediate} cannot be expressed in params.json")


def meta_version(shape: LlamaShape) -> str:
    """Which LLaMA layout the files follow (it decides how the embedding is cut)."""
    if shape.rope_scaling is not None:
        return "3.2" if shape.tied else "3.1"
    return "3" if shape.vocab == LLAMA3_VOCAB else "2"


@dataclass
class Slice:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Path


def meta_tensors(name: str, tensor: torch.Tensor, shape: LlamaShape, tied: bool):
    """HF parameter -> [(Meta name, full tensor, split dim)]; a tied head is written as output.weight
    too (every LLaMA but 3.2 has one, and convert_weights.py reads equal ones back as tied)."""
    if name == "model.embed_tokens.weight":
        out = [("tok_embeddings.weight", tensor, embedding_split_dim(meta_version(shape)))]
        return out + ([("output.weight", tensor, 0)] if tied else [])
    if name == "model.norm.weight":
        return [("norm.weight", tensor, None)]
    if name == "lm_head.weight":
        return [("output.weight", tensor, 0)]
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    meta, split = HF_TO_META[rest]
    if rest == "self_attn.q_proj.weight":
        tensor = unpermute_rotary(tensor, shape.heads)
    elif rest == "self_attn.k_proj.weight":
        tensor = unpermute_rotary(tensor, shape.kv_heads)
    return [(f"layers.{layer}.{meta}", tensor, split)]


def check_shardable(shape: LlamaShape, shards: int) -> None:
    cuts = {"n_heads": shape.heads, "n_kv_heads": shape.kv_heads, "intermediate_size": shape.intermediate,
            "vocab_size": shape.vocab, "hidden_size": shape.hidden}
    if odd := [f"{key} {value}" for key, value in cuts.items() if value % shards]:
        raise ExportError(f"--shards {shards}: Meta's model parallelism cuts heads, ffn and vocabulary evenly, "
                          f"and {', '.join(odd)} are not divisible by {shards}")


def write_meta(model: MergedModel, shape: LlamaShape, out_dir: Path, shards: int, progress: bool = True) -> list[Path]:
    check_shardable(shape, shards)
    parts_dir = out_dir / ".parts"
    parts_dir.mkdir()
    slices: list[list[Slice]] = [[] for _ in range(shards)]
    total = sum(_numel(model.shape(n)) * model.output_dtype(n).itemsize for n in model.names())
    with progress_bar(total, "meta", progress) as bar:
        for name, tensor in model.tensors():
            bar.set_postfix_str(name.removeprefix("model."), refresh=False)
            for meta_name, full, split in meta_tensors(name, tensor, shape, model.tied):
                pieces = [full] * shards if split is None else torch.chunk(full, shards, dim=split)
                for rank, piece in enumerate(pieces):
                    path = parts_dir / f"{rank:02d}-{len(slices[rank]):05d}.bin"
                    piece.contiguous().view(torch.uint8).numpy().tofile(path)
                    slices[rank].append(Slice(meta_name, tuple(piece.shape), piece.dtype, path))
            bar.update(tensor.numel() * tensor.element_size())
    model.check_changed()
    written = []
    for rank, entries in enumerate(slices):
        state = {s.name: torch.from_file(str(s.path), shared=False, size=_numel(s.shape), dtype=s.dtype).view(s.shape)
                 for s in entries}
        path = out_dir / f"consolidated.{rank:02d}.pth"
        torch.save(state, path)
        del state
        for s in entries:
            s.path.unlink()
        written.append(path)
    parts_dir.rmdir()
    (out_dir / "params.json").write_text(json.dumps(meta_params(shape), indent=2) + "\n")
    written.append(out_dir / "params.json")
    if tokenizer := write_tokenizer_model(model.source.base_dir, out_dir, shape):
        written.append(tokenizer)
    return written


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_tokenizer_model(base_dir: Path, out_dir: Path, shape: LlamaShape) -> Path | None:
    """tokenizer.model: the base's SentencePiece file, or LLaMA 3's tiktoken ranks rebuilt from
    tokenizer.json; other tokenizers have no Meta form, and tokenizer.json is copied instead."""
    target = out_dir / "tokenizer.model"
    if (base_dir / "tokenizer.model").is_file():
        shutil.copyfile(base_dir / "tokenizer.model", target)
        return target
    ranks = llama3_ranks(base_dir / "tokenizer.json") if shape.vocab == LLAMA3_VOCAB else None
    if ranks is not None:
        target.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
        return target
    if (base_dir / "tokenizer.json").is_file():
        shutil.copyfile(base_dir / "tokenizer.json", out_dir / "tokenizer.json")
    log.warning("no tokenizer.model written: the base's tokenizer is neither a SentencePiece file nor LLaMA 3's "
                "(copy the tokenizer.model of the original download beside the .pth files)")
    return None


def llama3_ranks(path: Path) -> list[tuple[bytes, int]] | None:
    """LLaMA 3's byte-level BPE vocabulary as tiktoken's (token bytes, rank), without the 256
    special tokens convert_weights.py appends; None when tokenizer.json is not that."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    try:
        ranks = sorted((bytes(char_to_byte[c] for c in token), rank) for token, rank in model["vocab"].items())
    except KeyError:
        return None
    ranks.sort(key=lambda item: item[1])
    return ranks if [rank for _, rank in ranks] == list(range(LLAMA3_VOCAB - 256)) else None
