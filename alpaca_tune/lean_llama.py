"""Llama inference in plain torch, for serving on CPU: quick to start and fast to decode.

Why not transformers' model here (figures in BENCHMARKS.md): importing transformers and PEFT is
~4 s of the server's start-up, and decoding one token is a matrix-vector product per weight
matrix, which PyTorch's CPU kernels stream from memory at ~11 GB/s on the project's machine while
numpy's OpenBLAS streams ~20 GB/s. So this module reads the same safetensors, merges the adapter
(lora_merge.py), fuses q/k/v and gate/up into one product each (stored [in, out]), keeps a
preallocated KV cache, and sends the products to OpenBLAS.

Only what the Llama family needs: RMSNorm, rotary embeddings (default, linear and llama3
scaling), grouped-query attention, SiLU MLP, tied or separate output head, fp32 on CPU. Anything
else is served by transformers instead (`unsupported_reason`). tests/test_lean_llama.py compares
logits and greedy tokens with transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .lora_merge import merge_lora

ROPE_TYPES = ("default", "linear", "llama3")
DEVICE = torch.device("cpu")


class LeanModelError(UserError):
    pass


def read_config(base_dir: Path, name: str = "config.json") -> dict:
    path = Path(base_dir) / name
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeanModelError(f"{path}: not a readable model config: {err}") from None


def rope_parameters(config: dict) -> dict:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    if config.get("rope_parameters"):
        rope = dict(config["rope_parameters"])
    else:
        rope = dict(config.get("rope_scaling") or {})
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def unsupported_reason(config: dict) -> str | None:
    """Why this module cannot run the model (None: it can)."""
    if config.get("model_type") != "llama" or config.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        return f"model type {config.get('model_type')} {config.get('architectures')}"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')}"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "bias terms"
    if config.get("quantization_config"):
        return "quantized weights"
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type}"
    return None


def inverse_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """Rotary frequencies per dimension pair, with the config's scaling applied (fp32, [head_dim/2])."""
    rope = rope_parameters(config)
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope["rope_type"] == "linear":
        inv = inv / rope["factor"]
    elif rope["rope_type"] == "llama3":
        # Meta's LLaMA 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a
        # smooth blend between the two bands.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        smooth = (context / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelength > context / low, inv / factor,
                          torch.where(wavelength < context / high, inv, blended))
    return inv.float()


@dataclass
class Layer:
    """One decoder layer's weights; products stored [in, out] (x @ W), which OpenBLAS streams faster."""
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [hidden, q_dim + 2 kv_dim]: q, k, v side by side
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [hidden, 2 intermediate]: gate, up side by side
    down: torch.Tensor


def _input_major(*weights: torch.Tensor) -> torch.Tensor:
    """nn.Linear weights [out, in] -> one [in, sum of outs] matrix."""
    return torch.cat(weights).t().contiguous()


def _linear(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight_t [in, out] on OpenBLAS (through numpy), which streams weights faster."""
    return torch.from_numpy(x.numpy() @ weight_t.numpy())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in HF's half-split layout: x [heads, T, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for one sequence, preallocated for `capacity` positions."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.keys = torch.empty(layers, kv_heads, capacity, head_dim)
        self.values = torch.empty(layers, kv_heads, capacity, head_dim)
        self.length = 0  # positions filled in every layer

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [kv_heads, T, D] at the next positions; the layer's keys and values so far."""
        end = self.length + keys.shape[1]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.keys.shape[2]}")
        self.keys[layer, :, self.length:end] = keys
        self.values[layer, :, self.length:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]


class LeanLlama:
    device = DEVICE

    def __init__(self, config: dict, state: dict[str, torch.Tensor], generation_config: dict | None = None):
        self.config = config
        self.generation_config = generation_config or {}  # its eos_token_id also ends generation
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.max_positions = config.get("max_position_embeddings", 4096)
        self.inv_freq = inverse_frequencies(config, self.head_dim)

        def take(name: str) -> torch.Tensor:
            try:
                return state.pop(name).float().contiguous()
            except KeyError:
                raise LeanModelError(f"the base model's weights lack {name}") from None

        embed = take("model.embed_tokens.weight")  # [vocab, hidden]
        self.layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            self.layers.append(Layer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=_input_major(*(take(p + f"self_attn.{n}_proj.weight") for n in "qkv")),
                o=_input_major(take(p + "self_attn.o_proj.weight")),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=_input_major(take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")),
                down=_input_major(take(p + "mlp.down_proj.weight"))))
        self.norm = take("model.norm.weight")
        head = state.pop("lm_head.weight", None)
        tied = config.get("tie_word_embeddings") or head is None
        # The head is stored [hidden, vocab] like the other products; a tied model keeps only that
        # copy and looks its embeddings up as columns (a few per step: cheap).
        self.head_t = _input_major(embed if tied else head.float())
        self.embed_t = self.head_t if tied else embed.t()
        state.pop("model.rotary_emb.inv_freq", None)  # older checkpoints store it; recomputed above
        if state:
            raise LeanModelError(f"unexpected weights in the base model: {sorted(state)[:5]}")

    @classmethod
    def load(cls, base_dir: Path, adapter_dir: Path | None = None) -> LeanLlama:
        config = read_config(base_dir)
        state = load_safetensors(Path(base_dir))
        if adapter_dir is not None:
            for name, tensor in state.items():  # merge in fp32, the dtype served
                state[name] = tensor.float()
            merge_lora(state, adapter_dir)
        has_generation_config = (Path(base_dir) / "generation_config.json").exists()
        generation_config = read_config(base_dir, "generation_config.json") if has_generation_config else None
        return cls(config, state, generation_config)

    @property
    def weight_bytes(self) -> int:
        """Bytes read per decoded token: every weight once (a tied head counted once)."""
        tensors = {t.data_ptr(): t for t in (self.embed_t, self.head_t, self.norm)}
        for layer in self.layers:
            tensors.update((t.data_ptr(), t) for t in vars(layer).values())
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, capacity)

    def forward(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Feed the next ids (all of the prompt, then one at a time); logits [vocab] of the last."""
        # The products run on OpenBLAS's threads. torch's own threads would spin between its
        # small ops and starve them (measured 4 instead of 25 tokens/s), so torch keeps to the
        # calling thread meanwhile.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(ids, cache)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        start, count = cache.length, len(ids)
        if count > 1 and start:
            raise ValueError("several ids at once only for the prompt, into an empty cache")
        if start + count > self.max_positions:
            raise ValueError(f"{start + count} positions > the model's {self.max_positions}")
        angles = torch.arange(start, start + count, dtype=torch.float32)[:, None] * self.inv_freq  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        q_dim = self.heads * self.head_dim
        x = self.embed_t[:, torch.tensor(ids)].t().contiguous()  # [T, hidden]
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, self.eps)
            qkv = _linear(h, layer.qkv).view(count, self.heads + 2 * self.kv_heads, self.head_dim).transpose(0, 1)
            qk = _rotate(qkv[:self.heads + self.kv_heads], cos, sin)  # q and k heads in one go
            q, k, v = qk[:self.heads], qk[self.heads:], qkv[self.heads + self.kv_heads:]
            keys, values = cache.extend(index, k, v)
            attended = F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=count > 1,
                                                      enable_gqa=self.kv_heads != self.heads)
            x = x + _linear(attended[0].transpose(0, 1).reshape(count, q_dim), layer.o)
            h = _rms_norm(x, layer.post_norm, self.eps)
            gate, up = _linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, layer.down)
        cache.length += count
        last = _rms_norm(x[-1], self.norm, self.eps)
        return _linear(last[None], self.head_t)[0]


def load_safetensors(base_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = base_dir / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        state = {}
        for name in files:
            state.update(load_file(str(base_dir / name)))
        return state
    except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as err:
        raise LeanModelError(f"{base_dir}: cannot read the base model's safetensors: {err}") from None

