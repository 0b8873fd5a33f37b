"""The training loss, computed only where there is something to learn.

Most positions of an instruction example are prompt tokens whose labels are masked. Running the
LM head (hidden -> vocabulary) on them is pure waste: for SmolLM2 the head alone is a
[576 x 49152] matmul per token. So the decoder runs on every token, and the head and the
cross-entropy only on the positions with a target.

Even there, the logits are the largest tensor of the step ([targets x vocabulary] in fp32, ~80 MB
for 400 targets), and making one is costly on CPU: a fresh allocation that size comes from the
kernel page by page, and the fp32 copy, log-softmax and its gradient each pass over it again.
So the head and the loss run a few rows at a time, and each chunk's gradient with respect to the
hidden states is computed while its logits are at hand (the loss is a plain sum, so its gradient
is known up to the one scalar that backward brings). Nothing vocabulary-sized outlives a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.tokenization import IGNORE_INDEX


def packed_attention_mask(segment_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A block-diagonal causal mask [B, 1, T, T]: each token sees only earlier tokens of its example.

    transformers passes a 4D mask through untouched. SDPA (and cpu/attention.py, which hands
    masked calls to SDPA) takes it as booleans (True = attend); eager attention adds it to the
    scores, so for it (`additive_dtype`) it is 0 / dtype-min instead.
    """
    same_example = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same_example & causal).unsqueeze(1)  # [B, 1, T, T]
    if additive_dtype is None:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=additive_dtype, device=segment_ids.device)
    return blocked.masked_fill(~allowed, torch.finfo(additive_dtype).min)


def decoder_inputs(causal_lm, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder: a block-diagonal mask when packed, no mask when padded.

    Padded rows are padded on the right, so under a causal mask every real token already sees only
    real tokens (padding comes after the row's last one); a padding mask would change nothing that
    is learned from, but it makes SDPA leave its causal kernel for a masked one that computes the
    whole score matrix (BENCHMARKS.md, training). Outputs at padding positions are garbage and are
    never used: their targets are IGNORE_INDEX.
    """
    if "segment_ids" in batch:
        eager = causal_lm.config._attn_implementation == "eager"
        mask = packed_attention_mask(batch["segment_ids"], causal_lm.dtype if eager else None)
        return {"input_ids": batch["input_ids"], "attention_mask": mask,
                "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"]}


def label_loss(causal_lm, batch: dict[str, torch.Tensor], prefix=None,
               micro_batch: int = 0) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over positions with a target, number of such positions).
    With a step's SharedPrefix (cpu/shared_prefix.py), only the positions after it are computed here."""
    targets = batch["targets"]
    if prefix is None:
        hidden = causal_lm.get_decoder()(**decoder_inputs(causal_lm, batch),
                                         use_cache=False).last_hidden_state  # [B, T, H]
    else:
        hidden = causal_lm.get_decoder()(**prefix.decoder_inputs(batch, micro_batch),
                                         use_cache=False).last_hidden_state
        targets = targets[:, prefix.length:]  # the preamble's positions hold none
    keep = targets != IGNORE_INDEX  # [B, T]
    head = causal_lm.get_output_embeddings()
    if _plain_head(causal_lm, head):
        loss_sum = HeadCrossEntropy.apply(hidden[keep], head.weight, targets[keep])
    else:  # a LoRA-wrapped, quantized or soft-capped head: let the module compute its logits
        logits = head(hidden[keep])  # [N, V] for N kept positions only
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def _plain_head(causal_lm, head) -> bool:
    """True when the logits are exactly hidden @ head.weight.T (what HeadCrossEntropy computes)."""
    return (type(head) is torch.nn.Linear and head.bias is None
            and getattr(causal_lm.config, "final_logit_softcapping", None) is None
            and getattr(causal_lm.config, "logit_scale", None) is None)


# Rows per chunk: enough to keep the products efficient, few enough that a chunk's fp32 logits
# (rows x vocabulary) stay at ~80 MB (426 rows of SmolLM2's vocabulary, 655 of LLaMA's), which
# the allocator reuses from chunk to chunk. Measured for SmolLM2's head (forward +
# backward, bf16 on CPU, alternating): 10% faster than the 170 rows of a 32 MB bound (161 -> 138
# ms for 400 rows, 260 -> 232 ms for 700) and than 640 rows; equal-sized chunks gained nothing.
CHUNK_ELEMENTS = 20 * 1024 * 1024


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]), computed a chunk of rows at a time.

    The logits are rounded to the weight's dtype before the fp32 softmax, as nn.Linear
    followed by .float() would; the gradients equal that composition's (tests/training/test_loss.py).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = hidden.dtype, weight.dtype
        # fp32, so that backward's scalar (1/targets, typically) is applied before rounding
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.t()).float()  # [rows, V]
            # One fused softmax gives both the loss (-log p at the targets) and its gradient
            # (p minus the one-hot targets): ~2.5x less element-wise time per chunk than
            # log-sum-exp followed by a second exp (BENCHMARKS.md, "Fewer passes over memory").
            probs = torch.softmax(logits, dim=-1)
            total += _target_losses(logits, probs, t).sum()
            if want_hidden or want_weight:
                probs[torch.arange(len(t), device=t.device), t] -= 1  # minus the one-hot target
                d_logits = probs.to(weight.dtype)
                if want_hidden:
                    grad_hidden[start:start + rows] = d_logits @ weight
                if want_weight:
                    grad_weight += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else (grad_hidden * grad_total).to(hidden_dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None)


def _target_losses(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row. A target probability below fp32's normal range (a logit more than
    ~87 below the row's largest) has lost its precision or underflowed to 0, so those rows take
    log-sum-exp minus the target logit instead."""
    target_probs = probs.gather(1, targets[:, None]).squeeze(1)
    losses = -target_probs.log()
    tiny = target_probs < torch.finfo(torch.float32).tiny
    if tiny.any():
        rows = logits[tiny]
        losses[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[tiny][:, None]).squeeze(1)
    return losses


def full_logits_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The reference: logits at every position, then the same masked sum (used to test label_loss)."""
    logits = causal_lm(**decoder_inputs(causal_lm, batch), use_cache=False).logits  # [B, T, V]
    targets = batch["targets"]
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())
