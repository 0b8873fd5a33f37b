"""SDPA in fp32 for a bf16 model on CPU: transformers' own SDPA attention, with q, k, v upcast.

PyTorch's CPU flash-attention kernels are faster in fp32 than in bf16 on the project's AVX512-BF16
machine (forward + backward of one SmolLM2 layer at 4 x 400 tokens: ~37 ms vs ~56 ms; the bf16
kernel converts block by block), while the matmuls around them are ~2.5x faster in bf16. So a bf16
model trains with every product in bf16 and attention alone in fp32, which is also at least as
accurate. Registered with transformers as the attention implementation "sdpa_fp32"; masks are
built exactly as for "sdpa".
"""

from __future__ import annotations

import torch

NAME = "sdpa_fp32"


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Autocast would cast q, k, v straight back to bf16 for SDPA, so it is paused here.
    with torch.autocast(query.device.type, enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                 attention_mask, **kwargs)
    return output.to(query.dtype), weights


def use_fp32_attention(causal_lm) -> None:
    """Switch a loaded transformers model (bf16, on CPU) to SDPA in fp32."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, _sdpa_fp32)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    causal_lm.set_attn_implementation(NAME)
