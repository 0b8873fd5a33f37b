"""The hyper-parameters of a Llama base, read from its config.json, for the formats that need them
spelled out (meta, gguf). Other architectures, biases and head sizes that Meta's and llama.cpp's
Llama cannot express are refused here, by name."""

from __future__ import annotations

from dataclasses import dataclass

from . import ExportError


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 rope scaling (factor, low/high_freq_factor, original context)
    context: int
    tied: bool


def llama_shape(config: dict, fmt: str, tied: bool) -> LlamaShape:
    where = f"--format {fmt}"
    if config.get("model_type") != "llama":
        raise ExportError(f"{where} writes Llama models; this base is {config.get('model_type')!r} "
                          f"(--format hf exports any architecture)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ExportError(f"{where}: the base sets {flag}, which Meta's and llama.cpp's Llama do not have")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        rope = dict(config.get("rope_parameters") or {})
        if not rope:  # transformers before 5
            rope = dict(config.get("rope_scaling") or {"rope_type": "default"})
            rope["rope_theta"] = config.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        shape = LlamaShape(
            hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else rope,
            context=int(config.get("max_position_embeddings", 2048)), tied=tied)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{where}: the base's config.json lacks or garbles {err}") from None
    if rope_type not in ("default", "llama3"):
        raise ExportError(f"{where}: rope type {rope_type!r} is not written (default and llama3 are)")
    if head_dim * heads != hidden or head_dim % 2:
        raise ExportError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}; Meta's Llama "
                          f"derives the head size from these")
    return shape
