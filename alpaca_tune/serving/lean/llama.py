"""Llama inference in numpy (and a little torch), for serving on CPU: quick to start and fast to decode.

Why not transformers' model here (figures in BENCHMARKS.md): importing transformers and PEFT is
~4 s of the server's start-up, and decoding one token is a matrix-vector product per weight
matrix, which PyTorch's CPU kernels stream from memory at ~11 GB/s on the project's machine.
So this module reads the same safetensors, merges the adapter (lora_merge.py), fuses q/k/v and
gate/up into one product each, keeps a preallocated KV cache, and runs the step in numpy. A new
token's products run on matvec.py's kernels, over weights kept in the checkpoint's dtype
(bf16/fp16/fp32; a matrix with an adapter merged into it is fp32), widened to fp32 in registers;
a prompt's products (many rows at once) on torch's in fp32 (short pieces on matvec's, where
its plan says so). One new token's attention is attention.py's kernel. The small ops run in
numpy too (norms, rotary), because torch's overhead per call (~5-10 us, ~25 calls a layer) on
vectors this small was a fifth of each step. Only the prompt's attention (many tokens at once)
and the rotary angles go through torch.

Only what the Llama family needs: RMSNorm, rotary embeddings (default, linear and llama3
scaling), grouped-query attention, SiLU MLP, tied or separate output head, on CPU. Anything
else is served by transformers instead (`unsupported_reason`). tests/serving/lean/test_llama.py compares
logits and greedy tokens with transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError
from ..decoder import eos_ids_in
from .attention import attend_tokens
from .lora_merge import lora_pairs, merge_lora
from .matvec import PLAN, Matrix, WeightArena, warm_up

ROPE_TYPES = ("default", "linear", "llama3")
DEVICE = torch.device("cpu")
# A prompt is fed in pieces of at most this many positions, cut at multiples of it, so that the
# batch scheduler (scheduler.py) can run other requests' steps between the pieces of a long
# prompt and still compute exactly what a prompt fed whole computes here.
PREFILL_CHUNK = 256
# Shared prompt heads (a template's text before the instruction) whose KV cache is kept, per
# adapter: the most recently used this many.
SHARED_PREFIXES = 8


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
    """One decoder layer's weights: norms in fp32, products as matvec.py Matrices [out, in]."""
    input_norm: np.ndarray
    qkv: Matrix  # [q_dim + 2 kv_dim, hidden]: q, k, v stacked
    o: Matrix
    post_norm: np.ndarray
    gate_up: Matrix  # [2 intermediate, hidden]: gate, up stacked
    down: Matrix

    def products(self) -> tuple[Matrix, ...]:
        return self.qkv, self.o, self.gate_up, self.down


def _product(x: np.ndarray, weight: Matrix, scratch: np.ndarray) -> np.ndarray:
    """x [T, in] @ weight.T -> [T, out] in fp32: one token, or a prompt piece of at most
    PLAN.prompt_rows positions, by the streaming kernel (faster there on CPUs where torch's is
    slow on few rows: matvec.vector_plan), a longer piece by torch in fp32 (a 16-bit weight
    widened into `scratch` first, once per matrix per piece).
    Not OpenBLAS for the prompt: its threads spin ~0.1 s after a product and slowed the first
    tokens after every prompt 2-6x (fighting numba's threads); torch's prompt was as fast at 51
    and 500 tokens and ~20% faster at 2,000 (BENCHMARKS.md)."""
    if x.shape[0] <= max(1, PLAN.prompt_rows):
        return weight.matmat(x)
    return (torch.from_numpy(x) @ torch.from_numpy(weight.float32(scratch)).T).numpy()


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """x [T, hidden]; in fp32 like transformers' LlamaRMSNorm."""
    variance = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])
    return weight * (x / np.sqrt(variance + eps))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))  # exp overflows to inf for x < -88: x / inf = -0, the right limit


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding in HF's half-split layout: x [heads, T, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for one sequence, preallocated for `capacity` positions.

    Keys are kept transposed, [D, positions] per head, so a new token's scores are one plain
    product q @ K that OpenBLAS runs ~6x faster than q @ K.T (38 vs 238 us a layer at 2,000
    positions for SmolLM2)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.keys_t = np.empty((layers, kv_heads, head_dim, capacity), dtype=np.float32)
        self.values = np.empty((layers, kv_heads, capacity, head_dim), dtype=np.float32)
        self.capacity = capacity
        self.length = 0  # positions filled in every layer

    def extend(self, layer: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store keys and values [kv_heads, T, D] at the next positions; the layer's keys so far
        as [kv_heads, D, positions] and values as [kv_heads, positions, D]."""
        end = self.length + keys.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.capacity}")
        self.keys_t[layer, :, :, self.length:end] = keys.transpose(0, 2, 1)
        self.values[layer, :, self.length:end] = values
        return self.keys_t[layer, :, :, :end], self.values[layer, :, :end]

    def attend_token(self, layer: int, q: np.ndarray, key: np.ndarray, value: np.ndarray, out: np.ndarray) -> None:
        """One new token: store its key and value [kv_heads, D] at the next position, and write
        its attention (q [heads, D]) over every position so far into out [heads * D]."""
        TokenAttention([self])(layer, q[None], key[None], value[None], out[None])


class TokenAttention:
    """One new token's attention for each of several caches (a batch step's rows, or one), a
    layer's rows in one parallel call (attention.attend_tokens, which finds each cache by its
    arrays' addresses: its rows have caches of their own sizes). One call a layer rather than one
    a row and layer, and both cores rather than one: at 8 rows of SmolLM2 (~60 positions) the
    step's attention took 7.5 ms as 240 calls on one core (2-core Xeon, AVX-512)."""

    def __init__(self, caches: list[KVCache]):
        for cache in caches:
            if cache.length >= cache.capacity:
                raise ValueError(f"KV cache full: {cache.length + 1} positions > capacity {cache.capacity}")
        self.caches = caches  # their arrays stay alive while the kernel reads them by address
        self.keys_at = np.array([c.keys_t.ctypes.data for c in caches], np.int64)
        self.values_at = np.array([c.values.ctypes.data for c in caches], np.int64)
        self.capacities = np.array([c.capacity for c in caches], np.int64)
        self.positions = np.array([c.length for c in caches], np.int64)

    def __call__(self, layer: int, q: np.ndarray, keys: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
        """q [B, heads, D], keys and values [B, kv_heads, D]: each row's new token's (stored at
        its cache's next position in `layer`); its attention into out [B, heads * D]."""
        attend_tokens(q, keys, values, self.keys_at, self.values_at, self.capacities, self.positions, layer, out)


@dataclass
class LowRankUpdates:
    """An adapter applied unmerged, per request: (layer, product) -> [(first output, end, A [r, in],
    B [end - first, r])], each adding (x @ A.T) @ B.T to those outputs of that product (layer -1:
    the head). Built by LeanLlama.low_rank_updates."""
    by_product: dict[tuple[int, str], list[tuple[int, int, np.ndarray, np.ndarray]]]
    nbytes: int
    # the KV cache of shared prompt heads under this adapter (LeanLlama.restore_prefix); it goes with it
    prefixes: collections.OrderedDict = field(default_factory=collections.OrderedDict, compare=False, repr=False)


@dataclass
class LeanFeed:
    """feed(ids) -> logits over one sequence's cache (the Decoder interface's feed), with the
    request's own adapter, if any, applied unmerged. The prompt's first `shared_prefix` ids (a
    template's head, which many prompts share) go in as a piece of their own, whose KV cache the
    model keeps: a later prompt with the same head copies it instead of computing it. Since the
    head is a piece of its own whether it is computed or copied, a prompt's numbers are the same
    either way."""
    model: LeanLlama
    cache: KVCache
    updates: LowRankUpdates | None = None
    shared_prefix: int = 0

    def __call__(self, ids: list[int]) -> torch.Tensor:
        return self.model.forward(self.after_shared_prefix(ids), self.cache, updates=self.updates)

    def after_shared_prefix(self, ids: list[int]) -> list[int]:
        """The ids still to feed once the shared head (if `ids` start the prompt with it) is in."""
        if self.shared_prefix and self.cache.length == 0 and len(ids) > self.shared_prefix:
            self.model.restore_prefix(ids[:self.shared_prefix], self.cache, self.updates)
            return ids[self.shared_prefix:]
        return ids


class LeanLlama:
    device = DEVICE

    def __init__(self, config: dict, state: dict[str, torch.Tensor], generation_config: dict | None = None):
        self.config = config
        self.generation_config = generation_config or {}  # its eos_token_id also ends generation
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.eps = np.float32(config.get("rms_norm_eps", 1e-6))
        self.intermediate = config["intermediate_size"]
        self.max_positions = config.get("max_position_embeddings", 4096)
        self.inv_freq = inverse_frequencies(config, self.head_dim)
        self.merged: dict = {}  # the adapter load() merged, as lora_pairs: a request's own takes it off
        self.prefixes: collections.OrderedDict = collections.OrderedDict()  # shared heads' KV, no own adapter
        self._prefix_lock = threading.Lock()

        def take(name: str) -> torch.Tensor:
            try:
                return state.pop(name)
            except KeyError:
                raise LeanModelError(f"the base model's weights lack {name}") from None

        def norm(name: str) -> np.ndarray:
            return take(name).float().contiguous().numpy()

        # Every product's weight, q/k/v and gate/up stacked, copied into one arena in the
        # checkpoint's dtype (matvec.py); each source tensor is dropped once copied.
        tied = config.get("tie_word_embeddings") or "lm_head.weight" not in state
        names = [["model.embed_tokens.weight"]] if tied else [["model.embed_tokens.weight"], ["lm_head.weight"]]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            names += [[p + f"self_attn.{n}_proj.weight" for n in "qkv"], [p + "self_attn.o_proj.weight"],
                      [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], [p + "mlp.down_proj.weight"]]
        missing = next((name for group in names for name in group if name not in state), None)
        if missing:
            raise LeanModelError(f"the base model's weights lack {missing}")
        arena = WeightArena([[state[name] for name in group] for group in names])
        matrices = [arena.store([take(name) for name in group]) for group in names]
        # A tied model keeps one copy for both: embeddings are a few rows a step, the head every row.
        self.embed = matrices.pop(0)
        self.head = self.embed if tied else matrices.pop(0)
        self.layers = [Layer(norm(f"model.layers.{i}.input_layernorm.weight"), *matrices[4 * i:4 * i + 2],
                             norm(f"model.layers.{i}.post_attention_layernorm.weight"), *matrices[4 * i + 2:4 * i + 4])
                       for i in range(config["num_hidden_layers"])]
        self.norm = norm("model.norm.weight")
        # room for the largest 16-bit layer weight widened to fp32 (the head only ever sees one row)
        widened = [w.bits.size for layer in self.layers for w in layer.products() if w.dtype != "float32"]
        self.scratch = np.empty(max(widened, default=0), np.float32)
        state.pop("lm_head.weight", None)  # a tied model may store the head too: the same weights
        state.pop("model.rotary_emb.inv_freq", None)  # older checkpoints store it; recomputed above
        if state:
            raise LeanModelError(f"unexpected weights in the base model: {sorted(state)[:5]}")

    @classmethod
    def load(cls, base_dir: Path, adapter_dir: Path | None = None) -> LeanLlama:
        config = read_config(base_dir)
        state = load_safetensors(Path(base_dir))
        # merged matrices become fp32; the rest keep their dtype
        merged = merge_lora(state, adapter_dir) if adapter_dir is not None else {}
        has_generation_config = (Path(base_dir) / "generation_config.json").exists()
        generation_config = read_config(base_dir, "generation_config.json") if has_generation_config else None
        model = cls(config, state, generation_config)
        model.merged = merged
        # numba's first call costs ~0.2 s (loading its cached machine code): paid here, not by the
        # first token. (Not in a thread while the weights load: no start-up gain measured, and
        # coglet then lost the setup's later log lines.)
        warm_up({model.head.dtype} | {w.dtype for layer in model.layers for w in layer.products()})
        return model

    @property
    def weight_bytes(self) -> int:
        """Bytes read per decoded token: every weight once (a tied head counted once)."""
        weights = {id(w): w for w in (self.head, self.norm)}  # embeddings: a few rows, not counted
        for layer in self.layers:
            weights.update((id(w), w) for w in vars(layer).values())
        return sum(w.nbytes for w in weights.values())

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, capacity)

    # The Decoder interface (serving/decoder.py)
    @property
    def context_length(self) -> int:
        return self.max_positions

    @property
    def eos_ids(self) -> frozenset[int]:
        return eos_ids_in(self.generation_config, self.config)

    @contextlib.contextmanager
    def feeder(self, capacity: int, updates: LowRankUpdates | None = None, shared_prefix: int = 0):
        # a head longer than a prefill piece is not worth a piece of its own
        yield LeanFeed(self, self.new_cache(capacity), updates, shared_prefix if shared_prefix <= PREFILL_CHUNK else 0)

    def restore_prefix(self, prefix: list[int], cache: KVCache, updates: LowRankUpdates | None = None) -> None:
        """Fill an empty cache with a shared prompt head: copied from the kept ones, or computed
        (as a piece of its own) and kept, at most SHARED_PREFIXES per adapter."""
        kept = self.prefixes if updates is None else updates.prefixes
        key, count = tuple(prefix), len(prefix)
        with self._prefix_lock:
            entry = kept.get(key)
            if entry is not None:
                kept.move_to_end(key)
        if entry is not None:
            cache.keys_t[:, :, :, :count] = entry[0]
            cache.values[:, :, :count] = entry[1]
            cache.length = count
            return
        self.forward(prefix, cache, logits=False, updates=updates)
        with self._prefix_lock:
            kept[key] = (cache.keys_t[:, :, :, :count].copy(), cache.values[:, :, :count].copy())
            while len(kept) > SHARED_PREFIXES:
                kept.popitem(last=False)

    def request_adapter(self, adapter_dir: Path, label: str) -> LowRankUpdates:
        """A request's own adapter (lora_weights, adapters.py), as low_rank_updates."""
        return self.low_rank_updates(lora_pairs(adapter_dir), label)

    def low_rank_updates(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], label: str) -> LowRankUpdates:
        """An adapter's (A, scaled B) pairs as updates of this model's fused products, with the
        adapter merged at load (if any) taken off again, so that a request gets exactly its own."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        places = {"q_proj": ("qkv", 0, q), "k_proj": ("qkv", q, q + kv), "v_proj": ("qkv", q + kv, q + 2 * kv),
                  "o_proj": ("o", 0, self.hidden), "gate_proj": ("gate_up", 0, self.intermediate),
                  "up_proj": ("gate_up", self.intermediate, 2 * self.intermediate), "down_proj": ("down", 0, self.hidden)}
        by_product: dict = {}
        nbytes = 0
        for sign, source in ((1.0, pairs), (-1.0, self.merged)):
            for module, (down, up) in source.items():
                parts = module.split(".")
                if module == "lm_head":
                    layer, (product, first, end) = -1, ("head", 0, self.head.shape[0])
                elif len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[4] in places:
                    layer, (product, first, end) = int(parts[2]), places[parts[4]]
                else:
                    raise LeanModelError(f"{label}: adapts {module}, which a request's own adapter cannot change "
                                         f"here (serve it as COG_WEIGHTS instead)")
                a = down.float().contiguous().numpy()
                b = (sign * up.float()).contiguous().numpy()
                if b.shape[0] != end - first or a.shape[1] != (self.head.shape[1] if layer < 0 else
                                                               self._product_width(layer, product)):
                    raise LeanModelError(f"{label}: {module} does not fit the base model")
                by_product.setdefault((layer, product), []).append((first, end, a, b))
                nbytes += a.nbytes + b.nbytes
        return LowRankUpdates(by_product, nbytes)

    def _product_width(self, layer: int, product: str) -> int:
        return getattr(self.layers[layer], product).shape[1]

    @staticmethod
    def _update(out: np.ndarray, x: np.ndarray, key: tuple[int, str], groups) -> None:
        """Add each group's low-rank updates of product `key` to its rows of out (x: the product's
        input). groups: [(rows, LowRankUpdates)]: rows a slice (a prompt: all its rows at once) or
        an index array (a batch step: row by row, so that a row's sums do not depend on how many
        others share its adapter)."""
        for rows, updates in groups:
            for first, end, a, b in updates.by_product.get(key, ()):
                if isinstance(rows, slice):  # a copy: a piece's rows in a batch step, as alone
                    out[rows, first:end] += (x[rows].copy() @ a.T) @ b.T
                else:
                    for row in rows:
                        out[row, first:end] += (x[row] @ a.T) @ b.T

    # The batch scheduler's extras (scheduler.py)
    prefill_chunk = PREFILL_CHUNK

    def feed_batch(self, feeds: list[LeanFeed], tokens: list[int]) -> torch.Tensor:
        return self.forward_batch([feed.cache for feed in feeds], tokens, [feed.updates for feed in feeds])

    def feed_batch_and_piece(self, feeds: list[LeanFeed], tokens: list[int], feed: LeanFeed,
                             ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """feed_batch(feeds, tokens) and feed(ids) (a piece of a prompt, as the scheduler cuts
        them), in one pass over the weights where the piece is short enough for the decoding
        kernels (2 to PLAN.prompt_rows positions, which feed() also multiplies there): the same
        numbers as the two calls, each row's products being the kernels' alone."""
        ids = feed.after_shared_prefix(ids)
        start = feed.cache.length
        fits = 2 <= len(ids) <= PLAN.prompt_rows and start // PREFILL_CHUNK == (start + len(ids) - 1) // PREFILL_CHUNK
        if not fits:
            last = self.forward(ids, feed.cache, updates=feed.updates)
            return self.feed_batch(feeds, tokens), last
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as forward() for such a piece: the products are numba's
        try:
            with np.errstate(over="ignore"):
                logits = self._forward_batch([f.cache for f in feeds], tokens, [f.updates for f in feeds],
                                             (feed.cache, ids, feed.updates))
            return torch.from_numpy(logits[:len(tokens)]), torch.from_numpy(logits[len(tokens)])
        finally:
            torch.set_num_threads(threads)

    @property
    def kv_bytes_per_position(self) -> int:
        return len(self.layers) * self.kv_heads * self.head_dim * 2 * 4  # keys and values, fp32

    def forward(self, ids: list[int], cache: KVCache, logits: bool = True,
                updates: LowRankUpdates | None = None) -> torch.Tensor | None:
        """Feed the next ids (the prompt, or a piece of it, then one at a time); logits [vocab]
        of the last (None when not `logits`: a prompt piece whose logits nobody reads). Prompts go
        in pieces of PREFILL_CHUNK positions, cut where the batch scheduler cuts them."""
        # A new token's products run on numba's threads. torch's own threads would spin between
        # its ops and starve them (measured 4 instead of 25 tokens/s, with OpenBLAS then), so
        # torch keeps to the calling thread meanwhile (and for a short prompt, whose products are
        # numba's too); a longer prompt's products are torch's, on all its threads.
        if not ids:
            raise ValueError("nothing to feed")
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if len(ids) <= max(1, PLAN.prompt_rows) else threads)
        try:
            with np.errstate(over="ignore"):  # _silu's exp: overflow to inf is intended
                done = 0
                while done < len(ids):
                    piece = min(len(ids) - done, PREFILL_CHUNK - cache.length % PREFILL_CHUNK)
                    last = done + piece == len(ids)
                    result = self._forward(ids[done:done + piece], cache, logits and last, updates)
                    done += piece
                return torch.from_numpy(result) if logits else None
        finally:
            torch.set_num_threads(threads)

    def forward_batch(self, caches: list[KVCache], tokens: list[int],
                      updates: list[LowRankUpdates | None] | None = None) -> torch.Tensor:
        """One new token for each of several sequences, each with its own cache and position:
        logits [B, vocab]. Every product reads its weight once for all B rows (matvec.py's
        matmat); each row computes what forward() computes for it alone (tested bit for bit)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as for one token: the products are numba's
        try:
            with np.errstate(over="ignore"):
                return torch.from_numpy(self._forward_batch(caches, tokens, updates or [None] * len(tokens)))
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _forward_batch(self, caches: list[KVCache], tokens: list[int], updates: list,
                       piece: tuple[KVCache, list[int], LowRankUpdates | None] | None = None) -> np.ndarray:
        """One new token for each cache, and optionally a prompt piece for one more (its cache,
        ids, updates) in the same products: logits [B (+ 1: the piece's last), vocab]. The
        piece's rows follow the tokens' through every product; the rest of its work (rotary
        angles, attention, low-rank updates, its last row's norm) is done on its rows alone, as
        _forward does it, so that its numbers are _forward's."""
        count, heads, kv_heads = len(tokens), self.heads, self.kv_heads
        # rows grouped by the adapter they apply unmerged (rows without one: the weights as loaded)
        groups = [(np.array([row for row, u in enumerate(updates) if u is own]), own)
                  for own in {id(u): u for u in updates if u is not None}.values()]
        for cache in caches:
            if cache.length + 1 > self.max_positions:
                raise ValueError(f"{cache.length + 1} positions > the model's {self.max_positions}")
        angles = torch.tensor([float(c.length) for c in caches], dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)  # [B, D]: each row at its own position
        cos, sin = angles.cos().numpy()[:, None], angles.sin().numpy()[:, None]
        rows = count
        if piece is not None:
            piece_cache, piece_ids, piece_updates = piece
            start, rows = piece_cache.length, count + len(piece_ids)
            if start + len(piece_ids) > self.max_positions:
                raise ValueError(f"{start + len(piece_ids)} positions > the model's {self.max_positions}")
            piece_angles = torch.arange(start, start + len(piece_ids), dtype=torch.float32)[:, None] * self.inv_freq
            piece_angles = torch.cat((piece_angles, piece_angles), dim=-1)
            piece_cos, piece_sin = piece_angles.cos().numpy(), piece_angles.sin().numpy()
            if piece_updates is not None:
                groups.append((slice(count, rows), piece_updates))
        x = self.embed.rows(tokens + (list(piece_ids) if piece is not None else []))  # [rows, hidden]
        attended = np.empty((rows, heads * self.head_dim), dtype=np.float32)
        attention = TokenAttention(caches)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, self.eps)
            qkv = layer.qkv.matmat(h)
            self._update(qkv, h, (index, "qkv"), groups)
            if piece is not None:
                attended[count:] = self._attend_piece_rows(index, qkv[count:], piece_cache, piece_cos, piece_sin)
            qkv = qkv[:count].reshape(count, heads + 2 * kv_heads, self.head_dim)
            qk = _rotate(qkv[:, :heads + kv_heads], cos, sin)  # [B, q and k heads, D]
            attention(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:], attended[:count])
            out = layer.o.matmat(attended)
            self._update(out, attended, (index, "o"), groups)
            x = x + out
            h = _rms_norm(x, layer.post_norm, self.eps)
            gate_up = layer.gate_up.matmat(h)
            self._update(gate_up, h, (index, "gate_up"), groups)
            act = _silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:]
            out = layer.down.matmat(act)
            self._update(out, act, (index, "down"), groups)
            x = x + out
        # the tokens' rows, then the piece's last (normed alone, as _forward norms it)
        h = _rms_norm(x[:count], self.norm, self.eps)
        if piece is not None:
            h = np.concatenate((h, _rms_norm(x[rows - 1:rows], self.norm, self.eps)))
            if piece_updates is not None:  # the piece's group, appended last above: now its last row alone
                groups[-1] = (slice(count, count + 1), piece_updates)
        logits = self.head.matmat(h)
        self._update(logits, h, (-1, "head"), groups)
        for cache in caches:
            cache.length += 1
        if piece is not None:
            piece_cache.length += len(piece_ids)
        return logits

    def _attend_piece_rows(self, index: int, qkv: np.ndarray, cache: KVCache, cos: np.ndarray,
                           sin: np.ndarray) -> np.ndarray:
        """A prompt piece's attention in layer `index` from its rows of the q/k/v product
        [T, (heads + 2 kv_heads) * D], exactly as _forward computes it: -> [T, heads * D]."""
        heads, kv_heads, count = self.heads, self.kv_heads, qkv.shape[0]
        start = cache.length
        qkv = qkv.copy().reshape(count, heads + 2 * kv_heads, self.head_dim).transpose(1, 0, 2)
        qk = _rotate(qkv[:heads + kv_heads], cos, sin)
        q, k, v = qk[:heads], qk[heads:], qkv[heads + kv_heads:]
        keys_t, values = cache.extend(index, k, v)
        if start == 0:  # the prompt's first piece attends to itself
            return self._attend_prompt(q, k, v)
        return self._attend_piece(q, keys_t, values, start)  # a later piece: to the positions before it too

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: KVCache, logits: bool = True,
                 updates: LowRankUpdates | None = None) -> np.ndarray | None:
        start, count = cache.length, len(ids)
        groups = [(slice(None), updates)] if updates is not None else []
        if start + count > self.max_positions:
            raise ValueError(f"{start + count} positions > the model's {self.max_positions}")
        # cos/sin by torch, as transformers computes them (numpy's cos may round differently)
        angles = torch.arange(start, start + count, dtype=torch.float32)[:, None] * self.inv_freq  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().numpy(), angles.sin().numpy()
        heads, kv_heads = self.heads, self.kv_heads
        x = self.embed.rows(ids)  # [T, hidden] fp32
        attention = TokenAttention([cache]) if count == 1 else None
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, self.eps)
            qkv = _product(h, layer.qkv, self.scratch)
            self._update(qkv, h, (index, "qkv"), groups)
            if count == 1:  # as a batch step attends each row: the same kernel, the same bits
                qkv = qkv.reshape(1, heads + 2 * kv_heads, self.head_dim)
                qk = _rotate(qkv[:, :heads + kv_heads], cos, sin)
                attended = np.empty((1, heads * self.head_dim), np.float32)
                attention(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:], attended)
            else:
                attended = self._attend_piece_rows(index, qkv, cache, cos, sin)
            out = _product(attended, layer.o, self.scratch)
            self._update(out, attended, (index, "o"), groups)
            x = x + out
            h = _rms_norm(x, layer.post_norm, self.eps)
            gate_up = _product(h, layer.gate_up, self.scratch)
            self._update(gate_up, h, (index, "gate_up"), groups)
            act = _silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:]
            out = _product(act, layer.down, self.scratch)
            self._update(out, act, (index, "down"), groups)
            x = x + out
        cache.length += count
        if not logits:
            return None
        h = _rms_norm(x[-1:], self.norm, self.eps)
        last = self.head.matvec(h[0])[None]
        self._update(last, h, (-1, "head"), groups)
        return last[0]

    def _attend_prompt(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The prompt into an empty cache: q [heads, T, D], keys/values [kv_heads, T, D] -> [T, heads * D].
        torch's fused causal kernel, whose memory grows with T rather than T^2."""
        attended = F.scaled_dot_product_attention(
            torch.from_numpy(q)[None], torch.from_numpy(keys)[None], torch.from_numpy(values)[None],
            is_causal=True, enable_gqa=self.kv_heads != self.heads)[0].numpy()
        return attended.transpose(1, 0, 2).reshape(q.shape[1], -1)

    def _attend_piece(self, q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """A prompt piece after `start` cached positions: q [heads, T, D], keys_t [kv_heads, D,
        start + T], values [kv_heads, start + T, D] -> [T, heads * D]; query i sees positions up
        to start + i."""
        count = q.shape[1]
        allowed = torch.arange(start + count)[None, :] <= torch.arange(start, start + count)[:, None]
        # keys made contiguous [kv_heads, positions, D] first: torch's kernel took 4x as long on
        # the transposed view (19.8 vs 5.6 ms for a 256-position piece at 2,004 positions)
        keys = torch.from_numpy(keys_t).transpose(1, 2).contiguous()
        attended = F.scaled_dot_product_attention(
            torch.from_numpy(q)[None], keys[None], torch.from_numpy(values)[None],
            attn_mask=allowed, enable_gqa=self.kv_heads != self.heads)[0].numpy()
        return attended.transpose(1, 0, 2).reshape(count, -1)


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

