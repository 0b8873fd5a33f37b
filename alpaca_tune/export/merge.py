"""The merged model's parameters, one at a time: base + adapter, computed in fp32.

Per adapted parameter, what PEFT's merge computes:
    LoRA on a Linear      W + s * B @ A                       s = alpha / r (alpha / sqrt(r): rslora),
                                                               alpha and r from alpha/rank_pattern
    DoRA                  m / ||W + s * B @ A||_row * (W + s * B @ A)
    LoRA on an Embedding  W + s * (B @ A)^T
    modules_to_save       the adapter's own copy of the parameter
The base is read in its own dtype, widened to fp32 for the sum and cast to the output dtype at the
end (rounding W + delta once, not delta separately). tests/export/test_export.py checks every kind
against PEFT's own merge. A tied head stays tied unless the adapter changes the embeddings or the
head; then both are written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..adapter_check import scaling_of, split_key
from ..adapter_files import ADAPTER_WEIGHTS
from . import ExportError
from .source import Source

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Update:
    kind: str  # "lora", "dora", "embedding", "replace"
    down: torch.Tensor | None = None  # A: [r, in] (embedding: [r, vocab])
    up: torch.Tensor | None = None  # s * B: [out, r] (embedding: [dim, r])
    magnitude: torch.Tensor | None = None  # DoRA's m: [out]
    weight: torch.Tensor | None = None  # modules_to_save's replacement

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged parameter in fp32."""
        if self.kind == "replace":
            return self.weight.float()
        base = weight.float()
        if self.kind == "embedding":
            return base + (self.up @ self.down).T
        merged = base + self.up @ self.down
        if self.kind == "dora":
            merged *= (self.magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
        return merged


def adapter_updates(source: Source) -> dict[str, Update]:
    """Parameter name -> the adapter's update of it (empty without an adapter). Features no merge
    can express in a Llama (a trained LoRA bias where the base has none) are refused by name."""
    if source.adapter is None:
        return {}
    from safetensors.torch import load_file

    config, label = source.adapter_config, source.adapter.label
    if config.get("fan_in_fan_out"):
        raise ExportError(f"{label}: fan_in_fan_out adapters (GPT-2 style Conv1D layers) do not fit a Llama base")
    tensors = {key: value.float() for key, value in load_file(str(source.adapter.root / ADAPTER_WEIGHTS)).items()}
    updates: dict[str, Update] = {}
    for key, value in tensors.items():
        module, suffix = split_key(key)  # check_adapter has accepted every key
        if suffix == ".lora_B.bias":
            raise ExportError(f"{label}: {module} has a trained LoRA bias (lora_bias=True), which a Llama "
                              f"without biases cannot hold; export needs an adapter trained without it")
        if suffix == "":
            updates[module] = Update("replace", weight=value)
        elif suffix in (".lora_A.weight", ".lora_embedding_A"):
            embedding = suffix == ".lora_embedding_A"
            up = tensors[key.replace("_A", "_B")] * scaling_of(module, config)
            magnitude = tensors.get(key.replace(suffix, ".lora_magnitude_vector"))
            if embedding and magnitude is not None:
                raise ExportError(f"{label}: DoRA on the embedding {module} is not merged; train DoRA on "
                                  f"Linear layers only")
            kind = "embedding" if embedding else ("dora" if magnitude is not None else "lora")
            updates[module + ".weight"] = Update(kind, down=value, up=up, magnitude=magnitude)
    return updates


class MergedModel:
    """Iterates the merged model's parameters in model order, one tensor in memory at a time."""

    def __init__(self, source: Source, dtype: torch.dtype | None = None):
        self.source, self.dtype = source, dtype
        self.updates = adapter_updates(source)
        self.untie = source.tied and bool({EMBED, HEAD} & self.updates.keys())
        self.changed = 0  # adapted parameters whose output differs from the base's

    @property
    def tied(self) -> bool:
        return self.source.tied and not self.untie

    def names(self) -> list[str]:
        names = self.source.parameter_names()
        return names + [HEAD] if self.untie else names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shapes[name])

    def output_dtype(self, name: str) -> torch.dtype:
        stored = self.source.dtypes.get(name) or self.source.dtypes[EMBED]
        return self.dtype or {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[stored]

    def tensors(self, dtype: torch.dtype | None | str = "output") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor): in each parameter's output dtype, or in `dtype` (torch.float32 for
        writers that quantize themselves)."""
        self.changed = 0
        for name in self.names():
            stored = EMBED if name == HEAD and name not in self.source.files else name
            base = self.source.get(stored)
            update = self.updates.get(name)
            want = self.output_dtype(name) if dtype == "output" else dtype
            if update is None:
                yield name, base.to(want)
                continue
            merged = update.apply(base).to(want)
            if not torch.equal(merged, base.to(want)):
                self.changed += 1
            yield name, merged

    def check_changed(self) -> None:
        """After a pass over tensors(): an adapter that changed nothing is an error, not a silent copy."""
        if self.updates and not self.changed:
            raise ExportError(f"{self.source.label}: merging changed no weight of the base (every lora_B is zero: "
                              f"an untrained adapter? or the changes round away in the output dtype); "
                              f"nothing written")
