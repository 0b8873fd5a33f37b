"""An adapter is checked against its base before anything uses it: setup, resume and export.

PEFT and a plain merge both accept adapters that are wrong: a config whose `r` disagrees with the
tensors loads as a half-strength adapter, NaN weights serve empty answers, a config that is a
JSON array or a B matrix of the wrong rank ends in a traceback deep inside the loader. Here the
config must be a JSON object with what PEFT needs, every tensor must name a module of the base,
have the shape that `r` and that module's weight give, and hold finite values. Messages name
what the user gave (the archive, directory or URL) and the file, field or tensor inside it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .errors import UserError, read_json

PEFT_PREFIX = "base_model.model."
# the tensors PEFT saves per adapted module; their shapes follow from the module's weight and r
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")


class AdapterError(UserError):
    """An adapter cannot be used with this base; the message names the adapter and what is wrong."""


def read_adapter_config(adapter_dir: Path, label: str | None = None) -> dict:
    """adapter_config.json as a dict with a positive integer `r`, a numeric `lora_alpha` and
    `target_modules`; AdapterError naming `label` (default: the directory) otherwise."""
    where = f"{label or adapter_dir}: {ADAPTER_CONFIG}"
    config = read_json(Path(adapter_dir) / ADAPTER_CONFIG, AdapterError, where)
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: must be a JSON object, is a JSON {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters are served")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{where}: field 'r' must be a positive integer, is {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterError(f"{where}: field 'lora_alpha' must be a positive number, is {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{where}: field 'target_modules' must be a module name pattern or a "
                           f"list of names, is {targets!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in pattern.values()):
            raise AdapterError(f"{where}: field {field!r} must map module names to positive numbers")
    return config


def _pattern_value(module: str, patterns: dict | None, default):
    """The first entry of a PEFT rank/alpha pattern that matches the module's name (as PEFT
    matches them: the whole name or its dotted tail), else `default`."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return value
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return value
    return default


def rank_of(module: str, config: dict) -> int:
    """The module's rank: its rank_pattern entry, else `r`."""
    return int(_pattern_value(module, config.get("rank_pattern"), config["r"]))


def scaling_of(module: str, config: dict) -> float:
    """What PEFT multiplies the module's B @ A by: alpha / r, or alpha / sqrt(r) with rslora
    (alpha and r from alpha_pattern / rank_pattern where they name the module)."""
    alpha = float(_pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"]))
    rank = rank_of(module, config)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _expected_shape(suffix: str, base: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    """The shape of the tensor with this suffix; a suffix "" is a whole parameter of the base
    (modules_to_save, a trained bias), shaped like the base's."""
    if not suffix:
        return base
    if len(base) != 2:
        return None
    out_features, in_features = base
    return {".lora_A.weight": (rank, in_features), ".lora_B.weight": (out_features, rank),
            ".lora_B.bias": (out_features,), ".lora_magnitude_vector": (out_features,),
            # an Embedding's weight is (num_embeddings, dim); PEFT's A is (r, num), B is (dim, r)
            ".lora_embedding_A": (rank, out_features), ".lora_embedding_B": (in_features, rank)}[suffix]


def check_adapter(adapter_dir: Path, base_shapes: Mapping[str, tuple[int, ...]], label: str | None = None) -> dict:
    """Check the adapter in `adapter_dir` against the base's weight shapes (parameter name ->
    shape, e.g. base_model.weight_shapes); return its config. AdapterError names `label` (what
    the user gave; default: the directory) and the field or tensor that is wrong."""
    import torch
    from safetensors import SafetensorError, safe_open

    label = label or str(adapter_dir)
    config = read_adapter_config(adapter_dir, label)
    where = f"{label}: {ADAPTER_WEIGHTS}"
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{where}: missing (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    pairs: dict[str, set[str]] = {}
    try:
        with safe_open(str(path), framework="pt") as tensors:
            keys = list(tensors.keys())
            for key in keys:
                module, suffix = split_key(key)
                if module is None:
                    raise AdapterError(f"{where}: tensor {key!r} is not a tensor PEFT would save "
                                       f"(base_model.model.<module>.lora_A.weight, ...)")
                weight = base_shapes.get(module if not suffix else module + ".weight")
                if weight is None:
                    raise AdapterError(f"{where}: tensor {key!r} adapts {module!r}, which this base model does "
                                       f"not have (an adapter for another base?)")
                value = tensors.get_tensor(key)
                rank = rank_of(module, config) if suffix else 0
                expected = _expected_shape(suffix, tuple(weight), rank)
                if tuple(value.shape) != expected:
                    need = f"{module} ({tuple(weight)}) and r={rank} in {ADAPTER_CONFIG} need" if suffix else \
                        f"{module} has"
                    raise AdapterError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}; the base's "
                                       f"{need} {expected}")
                if not bool(torch.isfinite(value).all()):
                    raise AdapterError(f"{where}: tensor {key!r} holds NaN or infinite values")
                if suffix:
                    pairs.setdefault(module, set()).add(suffix)
    except SafetensorError as err:
        raise AdapterError(f"{where}: not a readable safetensors file ({err}); truncated or damaged?") from None
    for module, suffixes in pairs.items():
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if (a in suffixes) != (b in suffixes):
                missing = b if a in suffixes else a
                raise AdapterError(f"{where}: {module} has no {missing.lstrip('.')} beside its other LoRA matrix")
    if not any(".lora_A.weight" in s or ".lora_embedding_A" in s for s in pairs.values()):
        raise AdapterError(f"{where}: holds no LoRA weights")
    return config


def split_key(key: str) -> tuple[str | None, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', '.lora_A.weight'); a whole parameter
    ('base_model.model.X.base_layer.bias', '...lm_head.weight') -> ('X.bias', ''); (None, '') for
    keys outside the model."""
    if not key.startswith(PEFT_PREFIX):
        return None, ""
    name = key[len(PEFT_PREFIX):]
    for suffix in LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return name.replace(".base_layer.", "."), ""
