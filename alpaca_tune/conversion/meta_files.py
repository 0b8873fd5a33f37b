"""Finding Meta's files in a download folder and memory-mapping its shards."""

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from . import ConversionError
from .checks import natural_order
from .state_dict import convert_embeddings, embedding_split_dim, merge_shards


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
    return sorted((d.name for d in input_dir.iterdir() if (d / "params.json").exists()), key=natural_order)


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
