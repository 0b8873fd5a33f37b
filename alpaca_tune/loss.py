"""The training loss, computed only where there is something to learn.

Most positions of an instruction example are prompt tokens whose labels are masked. Running the
LM head (hidden -> vocabulary) on them is pure waste: for SmolLM2 the head alone is a
[576 x 49152] matmul per token. So the decoder runs on every token, and the head and the
cross-entropy only on the positions with a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import packed_attention_mask
from .tokenization import IGNORE_INDEX


def decoder_inputs(causal_lm, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder: a block-diagonal mask when packed, no mask when padded.

    Padded rows are padded on the right, so under a causal mask every real token already sees only
    real tokens (padding comes after the row's last one); a padding mask would change nothing that
    is learned from, but it makes SDPA leave its causal kernel for a masked one that computes the
    whole score matrix (BENCHMARKS.md, training). Outputs at padding positions are garbage and are
    never used: their targets are IGNORE_INDEX.
    """
    if "segment_ids" in batch:
        mask = packed_attention_mask(batch["segment_ids"], causal_lm.config._attn_implementation,
                                     causal_lm.dtype)
        return {"input_ids": batch["input_ids"], "attention_mask": mask,
                "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"]}


def label_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over positions with a target, number of such positions)."""
    hidden = causal_lm.get_decoder()(**decoder_inputs(causal_lm, batch),
                                     use_cache=False).last_hidden_state  # [B, T, H]
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX  # [B, T]
    logits = causal_lm.get_output_embeddings()(hidden[keep])  # [N, V] for N kept positions only
    loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def full_logits_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The reference: logits at every position, then the same masked sum (used to test label_loss)."""
    logits = causal_lm(**decoder_inputs(causal_lm, batch), use_cache=False).logits  # [B, T, V]
    targets = batch["targets"]
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())
