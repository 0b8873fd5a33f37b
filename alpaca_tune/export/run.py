"""One export: check everything, write into a staging folder beside the output, rename at the end.

Nothing half-written is ever left in the output folder: a bad adapter, a mismatched base, a full
disk or Ctrl-C remove the staging folder, and an existing output is replaced (--overwrite) only
once the new one is complete. Several formats at once go into a subfolder each.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_files import EXPORT_SUBDIR
from ..base_model import load_tokenizer
from ..data.prompts import PromptTemplate, load_template, template_from_json
from . import FORMATS, ExportError
from .gguf_files import OUTTYPES, nbytes, tensor_type, write_gguf, write_gguf_lora
from .hf import write_hf
from .llama_config import llama_shape
from .merge import MergedModel
from .meta import write_meta
from .ollama import modelfile
from .source import Source, describe, open_source

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GGUF_LORA_FILE, MODELFILE = "adapter.gguf", "Modelfile"


@dataclass
class ExportOptions:
    dtype: str | None = None  # hf/meta output dtype; None: the base's
    outtype: str = "f16"  # gguf/ollama
    shards: int = 1  # meta
    shard_bytes: int = 5 * 10**9  # hf
    prompt_template: str = ""  # ollama: a template name or inline JSON; "": the adapter's, else alpaca
    progress: bool = True


def parse_formats(text: str | Sequence[str]) -> list[str]:
    formats = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    if unknown := [f for f in formats if f not in FORMATS]:
        raise ExportError(f"--format {','.join(unknown)}: unknown; choose from {', '.join(FORMATS)}")
    if not formats:
        raise ExportError(f"--format: give one or more of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def gguf_file(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def check_options(formats: list[str], options: ExportOptions, source: Source) -> None:
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ExportError(f"--dtype {options.dtype}: choose from {', '.join(DTYPES)}")
    if options.outtype not in OUTTYPES:
        raise ExportError(f"--outtype {options.outtype}: choose from {', '.join(OUTTYPES)}")
    if options.shards < 1:
        raise ExportError(f"--shards {options.shards}: must be at least 1")
    if "gguf-lora" in formats and source.adapter is None:
        raise ExportError("--format gguf-lora writes an adapter: give it with --weights")
    if not {"meta", "gguf", "gguf-lora", "ollama"}.isdisjoint(formats):
        llama_shape(source.config, next(f for f in formats if f != "hf"), source.tied)


def needed_bytes(fmt: str, model: MergedModel, options: ExportOptions) -> int:
    if fmt in ("gguf", "ollama"):
        return sum(nbytes(model.shape(n), tensor_type(n, model.shape(n), options.outtype)) for n in model.names())
    if fmt == "gguf-lora":
        return 10**8
    total = sum(torch.Size(model.shape(n)).numel() * model.output_dtype(n).itemsize for n in model.names())
    return 2 * total if fmt == "meta" else total  # meta: raw slices, then the .pth files


def ollama_template(source: Source, spec: str) -> PromptTemplate:
    if spec:
        return load_template(spec)
    if recorded := source.training_config.get("prompt_template"):
        return template_from_json(recorded, f"{source.label}: training_config.json")
    return load_template("alpaca")


def write_format(fmt: str, source: Source, out_dir: Path, options: ExportOptions) -> list[Path]:
    dtype = DTYPES[options.dtype] if options.dtype else None
    model = MergedModel(source, dtype)
    name = source.base_dir.name + (f"+{Path(source.adapter.label).name}" if source.adapter else "")
    if fmt == "hf":
        return write_hf(model, out_dir, options.shard_bytes, options.progress)
    shape = llama_shape(source.config, fmt, model.tied)
    if fmt == "meta":
        return write_meta(model, shape, out_dir, options.shards, options.progress)
    if fmt == "gguf-lora":
        write_gguf_lora(source, shape, out_dir / GGUF_LORA_FILE, name)
        return [out_dir / GGUF_LORA_FILE]
    path = out_dir / gguf_file(options.outtype)
    tokenizer = write_gguf(model, shape, path, options.outtype, name, options.progress)
    log.info("gguf tokenizer: %s", tokenizer)
    if fmt == "gguf":
        return [path]
    eos = load_tokenizer(source.base_dir).eos_token
    (out_dir / MODELFILE).write_text(modelfile(path.name, None, ollama_template(source, options.prompt_template), eos))
    return [path, out_dir / MODELFILE]


def export_run(run_dir: Path, formats: str, base_model: str = "") -> list[Path]:
    """train.py's export_formats: the run's adapter (run_dir/adapter, with its training_config.json)
    in each format under run_dir/export/<format>/, which the archive then holds."""
    return export(formats, Path(run_dir) / EXPORT_SUBDIR, str(run_dir), base_model,
                  ExportOptions(progress=False), overwrite=True, subfolders=True)


def export(formats: str | Sequence[str], output_dir: Path | str, weights: str | None = None, base_model: str = "",
           options: ExportOptions | None = None, overwrite: bool = False,
           log_line: Callable[[str], None] | None = None, subfolders: bool | None = None) -> list[Path]:
    """Write each format (into a subfolder each when several, or with subfolders=True); returns the
    files written (in their final place)."""
    options, output_dir, say = options or ExportOptions(), Path(output_dir), log_line or log.info
    formats = parse_formats(formats)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ExportError(f"{output_dir}: exists and is not empty; choose another --output-dir or pass --overwrite")
    with open_source(weights, base_model) as source:
        check_options(formats, options, source)
        say(f"exporting {describe(source)} as {', '.join(formats)}")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(needed_bytes(f, MergedModel(source), options) for f in formats)
        if (free := shutil.disk_usage(output_dir.parent).free) < needed + 10**8:
            raise ExportError(f"{output_dir.parent}: needs about {needed / 1e9:.1f} GB free, has {free / 1e9:.1f} GB")
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.exporting-", dir=output_dir.parent))
        try:
            written = []
            for fmt in formats:
                folder = staging / fmt if (len(formats) > 1 if subfolders is None else subfolders) else staging
                folder.mkdir(exist_ok=True)
                files = write_format(fmt, source, folder, options)
                say(f"{fmt}: " + ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in files))
                written += [p.relative_to(staging) for p in files]
            _install(staging, output_dir)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise ExportError(f"{output_dir.parent}: no space left on the disk; nothing written") from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return [output_dir / p for p in written]


def _install(staging: Path, output_dir: Path) -> None:
    staging.chmod(0o755)  # mkdtemp makes it private
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(staging, output_dir)
