"""What an export reads: the base model folder and, optionally, a checked adapter from train.py.

The base is resolved as predict.py resolves it (an explicit folder, $ALPACA_TUNE_BASE, weights/,
the embedded SmolLM2); the adapter is fetched and unpacked as COG_WEIGHTS is (an archive, a
folder, a URL) into a temporary folder, and checked against the base's shapes before any
writer sees it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter_check import check_adapter
from ..base_model import resolve_base_dir, weight_shapes
from ..errors import read_json
from ..serving.weights import FetchedAdapter, fetch_weights, read_training_config
from . import ExportError


@dataclass
class Source:
    base_dir: Path
    config: dict  # the base's config.json
    shapes: dict[str, tuple[int, ...]]  # parameter name -> shape (a tied head counts)
    files: dict[str, Path] = field(default_factory=dict)  # stored parameter name -> its safetensors file
    dtypes: dict[str, str] = field(default_factory=dict)  # stored parameter name -> safetensors dtype
    adapter: FetchedAdapter | None = None
    adapter_config: dict | None = None
    training_config: dict = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.files

    @property
    def label(self) -> str:
        return self.adapter.label if self.adapter else str(self.base_dir)

    def parameter_names(self) -> list[str]:
        """The stored parameters in model order: embeddings, each layer, final norm, head."""
        def order(name: str):
            match = re.match(r"model\.layers\.(\d+)\.", name)
            group = 1 if match else (0 if "embed" in name else (3 if name.startswith("lm_head") else 2))
            return group, int(match.group(1)) if match else 0, name
        return sorted(self.files, key=order)

    def get(self, name: str):
        """One stored parameter, read from its file (memory-mapped; nothing else is loaded)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as tensors:
            return tensors.get_tensor(name)


def _index(base_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    from safetensors import safe_open

    files, dtypes = {}, {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as tensors:
            for key in tensors.keys():
                files[key] = path
                dtypes[key] = tensors.get_slice(key).get_dtype()
    return files, dtypes


@contextmanager
def open_source(weights: str | None = None, base_model: str = "") -> Iterator[Source]:
    """The base (and the adapter, unpacked into a temporary folder for the duration)."""
    base_dir = resolve_base_dir(base_model)
    config = read_json(base_dir / "config.json", ExportError, f"{base_dir}/config.json")
    if not isinstance(config, dict):
        raise ExportError(f"{base_dir}/config.json: must be a JSON object")
    shapes = weight_shapes(base_dir)
    files, dtypes = _index(base_dir)
    source = Source(base_dir, config, shapes, files, dtypes)
    if not weights:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="export-adapter-") as workdir:
        adapter = fetch_weights(str(weights), Path(workdir))
        if adapter.full_model:  # finetune_method=full: the archive's model is what is exported
            with open_source(None, str(adapter.root)) as trained:
                trained.training_config = read_training_config(adapter)
                yield trained
            return
        source.adapter = adapter
        source.adapter_config = check_adapter(adapter.root, shapes, adapter.label)
        source.training_config = read_training_config(adapter)
        yield source


def describe(source: Source) -> str:
    """One line for the log: what is being exported."""
    config = source.config
    what = (f"{config.get('model_type', '?')} base {source.base_dir} ({config.get('num_hidden_layers')} layers, "
            f"hidden {config.get('hidden_size')}, vocab {config.get('vocab_size')})")
    if source.adapter is not None:
        adapter = source.adapter_config
        what += f" + adapter {source.adapter.label} (r={adapter['r']}, alpha={adapter['lora_alpha']})"
    return what


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
