"""The whole conversion: Meta's download folder -> a Hugging Face model folder.

Reads and checks every file first (nothing is written for a bad download), then memory-maps the
shards, converts one layer at a time and streams safetensors into a staging folder inside the
output folder, which only becomes the model once everything is written.
"""

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..allocator import release_freed_memory
from . import ConversionError
from . import tokenizer as tok
from .checks import check_shards, expected_shapes
from .hf_config import write_configs
from .meta_files import (
    find_model_dir,
    find_shards,
    find_tokenizer,
    is_tied,
    load_shards,
)
from .params import (
    ROPE_SCALING_FACTOR,
    VERSIONS,
    MetaParams,
    read_params,
    resolve_version,
)
from .safetensors_writer import SAFETENSORS_DTYPES, StreamingSafetensors, nbytes
from .state_dict import (
    DROPPED_KEYS,
    LAYER_KEYS,
    convert_embeddings,
    convert_head,
    convert_layer,
)

MODEL_FILES = (  # what a converted model folder holds; --force replaces exactly these
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
)


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
    needed = sum(map(nbytes, plan))
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
        if ckpt.tokenizer.kind == tok.SENTENCEPIECE:  # as HF's LLaMA 2 repositories ship it; export reads it
            shutil.copyfile(ckpt.tokenizer_path, staging / "tokenizer.model")
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
