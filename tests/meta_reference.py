"""An independent LLaMA forward pass over Meta-format shards, for checking the converter.

Written after Meta's published model definitions (facebookresearch/llama model.py for LLaMA
1/2, meta-llama/llama3 and llama-models model.py for 3.x): RMSNorm computed in float, rotary
embedding as complex multiplication over *adjacent* pairs, SwiGLU feed-forward, grouped-query
attention by repeating kv heads, "llama3" frequency scaling for 3.1/3.2.

It runs the model-parallel shards the way fairscale runs them on N ranks, never merging a
weight: each rank embeds its slice (columns in LLaMA 1/2, vocabulary rows in 3.x), attends with
its own heads, contributes a partial sum through its row-parallel wo/w2 slices, and produces
its slice of the logits. So nothing here shares logic with alpaca_tune.convert.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Shard = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class RefConfig:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float
    vocab_parallel_embedding: bool  # LLaMA 3.x: embedding cut along the vocabulary
    rope_scaling_factor: float | None = None  # Meta's model.py: 8 for 3.x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def llama3_scale(freqs: torch.Tensor, factor: float) -> torch.Tensor:
    """Meta's apply_scaling: long wavelengths slowed by `factor`, a smooth blend in between."""
    low_freq_factor, high_freq_factor, old_context = 1.0, 4.0, 8192
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_context / low_freq_factor, freqs / factor, freqs)
    middle = (wavelen >= old_context / high_freq_factor) & (wavelen <= old_context / low_freq_factor)
    return torch.where(middle, blended, out)


def rotary_table(head_dim: int, seq_len: int, cfg: RefConfig) -> torch.Tensor:
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if cfg.rope_scaling_factor is not None:
        freqs = llama3_scale(freqs, cfg.rope_scaling_factor)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # [T, head_dim/2]
    return torch.polar(torch.ones_like(angles), angles)  # complex64


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]: (x0 + i x1), (x2 + i x3), ... each times e^{i t theta_j}."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, D/2]
    return torch.view_as_real(pairs * table[None, :, None, :]).flatten(3).type_as(x)


def embed(shards: Sequence[Shard], tokens: torch.Tensor, cfg: RefConfig) -> torch.Tensor:
    if not cfg.vocab_parallel_embedding:  # ParallelEmbedding: each rank owns some columns
        return torch.cat([F.embedding(tokens, s["tok_embeddings.weight"]) for s in shards], dim=-1)
    out, start = 0, 0  # VocabParallelEmbedding: each rank owns rows [start, start + n)
    for shard in shards:
        table = shard["tok_embeddings.weight"]
        mine = (tokens >= start) & (tokens < start + table.shape[0])
        local = F.embedding(torch.where(mine, tokens - start, 0), table)
        out = out + local * mine[..., None]
        start += table.shape[0]
    return out


def attention(shard: Shard, x: torch.Tensor, layer: int, table: torch.Tensor, cfg: RefConfig, n_ranks: int):
    """One rank's heads; returns its partial wo product, to be summed over ranks."""
    bsz, seq, _ = x.shape
    heads, kv_heads = cfg.n_heads // n_ranks, cfg.n_kv_heads // n_ranks
    prefix = f"layers.{layer}.attention."
    q = (x @ shard[prefix + "wq.weight"].T).view(bsz, seq, heads, -1)  # [B, T, H, D]
    k = (x @ shard[prefix + "wk.weight"].T).view(bsz, seq, kv_heads, -1)
    v = (x @ shard[prefix + "wv.weight"].T).view(bsz, seq, kv_heads, -1)
    q, k = rotate(q, table), rotate(k, table)
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    scores = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    scores = scores + torch.full((seq, seq), float("-inf")).triu(1)
    out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
    return out.transpose(1, 2).reshape(bsz, seq, -1) @ shard[prefix + "wo.weight"].T


def feed_forward(shard: Shard, x: torch.Tensor, layer: int) -> torch.Tensor:
    prefix = f"layers.{layer}.feed_forward."
    gate, up = x @ shard[prefix + "w1.weight"].T, x @ shard[prefix + "w3.weight"].T
    return (F.silu(gate) * up) @ shard[prefix + "w2.weight"].T


@torch.no_grad()
def forward(shards: Sequence[Shard], cfg: RefConfig, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> logits [B, T, vocab], float32."""
    n = len(shards)
    head_dim = shards[0]["layers.0.attention.wq.weight"].shape[0] * n // cfg.n_heads
    table = rotary_table(head_dim, tokens.shape[1], cfg)
    h = embed(shards, tokens, cfg)  # [B, T, dim]
    for layer in range(cfg.n_layers):
        x = rms_norm(h, shards[0][f"layers.{layer}.attention_norm.weight"], cfg.norm_eps)
        h = h + sum(attention(s, x, layer, table, cfg, n) for s in shards)
        x = rms_norm(h, shards[0][f"layers.{layer}.ffn_norm.weight"], cfg.norm_eps)
        h = h + sum(feed_forward(s, x, layer) for s in shards)
    h = rms_norm(h, shards[0]["norm.weight"], cfg.norm_eps)
    # Column-parallel output: each rank computes its vocabulary slice of the logits. LLaMA 3.2
    # without output.weight ties it to the (vocab-parallel) embedding rows.
    key = "output.weight" if "output.weight" in shards[0] else "tok_embeddings.weight"
    return torch.cat([h @ s[key].T for s in shards], dim=-1).float()


def greedy(shards: Sequence[Shard], cfg: RefConfig, prompt: Sequence[int], steps: int) -> list[int]:
    """Greedy continuation by recomputing the whole prefix each step (no cache to get wrong)."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = forward(shards, cfg, torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]
