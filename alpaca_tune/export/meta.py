"""--format meta: Meta's layout, consolidated.NN.pth + params.json (+ tokenizer.model).

The inverse of convert_weights.py's mapping (conversion/state_dict.py): HF names back to Meta's,
q/k rows back from transformers' half-split rotary order to Meta's interleaved pairs, and each
weight cut into --shards model-parallel slices the way fairscale owns them (column-parallel
rows, row-parallel columns, the embedding by model dim in LLaMA 1/2 and by vocabulary in 3.x,
norms copied whole). convert_weights.py on the result gives back the merged HF model exactly.

torch.save needs a shard's whole dict at once, and a 70B shard is ~17 GB; so each .pth is first
written by torch.save with the tensors' room left empty (torch.serialization.skip_data, made for
this: "the storage bytes can then be populated in a separate pass"), and the merged slices are
then written into that room one tensor at a time. (The zip's CRCs stay those of the empty room;
torch.load does not read them.)
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
import struct
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
    # the layout of every shard, from the shapes alone: (Meta name, slice shape, dtype) in order
    layout: list[list[tuple[str, tuple, torch.dtype]]] = [[] for _ in range(shards)]
    for name in model.names():
        empty = torch.empty(model.shape(name), dtype=model.output_dtype(name), device="meta")
        for meta_name, full, split in meta_tensors(name, empty, shape, model.tied):
            pieces = [full] * shards if split is None else torch.chunk(full, shards, dim=split)
            for rank, piece in enumerate(pieces):
                layout[rank].append((meta_name, tuple(piece.shape), piece.dtype))
    paths = [out_dir / f"consolidated.{rank:02d}.pth" for rank in range(shards)]
    offsets = [_reserve(path, entries) for path, entries in zip(paths, layout)]
    files = [open(path, "r+b") for path in paths]
    try:
        total = sum(math.prod(model.shape(n)) * model.output_dtype(n).itemsize for n in model.names())
        with progress_bar(total, "meta", progress) as bar:
            for name, tensor in model.tensors():
                bar.set_postfix_str(name.removeprefix("model."), refresh=False)
                for meta_name, full, split in meta_tensors(name, tensor, shape, model.tied):
                    pieces = [full] * shards if split is None else torch.chunk(full, shards, dim=split)
                    for rank, piece in enumerate(pieces):
                        offset, size = offsets[rank][meta_name]
                        data = piece.contiguous().view(torch.uint8).numpy()
                        if data.nbytes != size:
                            raise AssertionError(f"{meta_name}: {data.nbytes} bytes, the file has room for {size}")
                        files[rank].seek(offset)
                        files[rank].write(data.data)
                bar.update(tensor.numel() * tensor.element_size())
    finally:
        for handle in files:
            handle.close()
    model.check_changed()
    (out_dir / "params.json").write_text(json.dumps(meta_params(shape), indent=2) + "\n")
    written = [*paths, out_dir / "params.json"]
    if tokenizer := write_tokenizer_model(model.source.base_dir, out_dir, shape):
        written.append(tokenizer)
    return written


def _reserve(path: Path, entries: list[tuple[str, tuple, torch.dtype]]) -> dict[str, tuple[int, int]]:
    """Write the .pth with every tensor's room left empty (torch.serialization.skip_data: no tensor
    bytes are read, so the tensors can be unallocated placeholders); returns name -> (file offset of
    its bytes, byte count). torch.save gives storages the keys 0, 1, ... in the dict's order, one
    zip member archive/data/<key> each; the bytes follow that member's local header."""
    import zipfile

    with torch.serialization.skip_data():
        torch.save({name: torch.empty(shape, dtype=dtype) for name, shape, dtype in entries}, path)
    rooms = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        members = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
        for key, (name, _, _) in enumerate(entries):
            info = members[f"data/{key}"]
            raw.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", raw.read(4))
            rooms[name] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return rooms


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
