"""The one interface generation.py talks to: a model that decodes one sequence at a time.

Two backends implement it: lean/llama.py's LeanLlama (CPU, numpy and numba) and
transformers_decoder.py's TransformersDecoder (GPU, other architectures, unmerged adapters).

    device           where the sampling generator and the token sequence live
    context_length   positions the model reads at most (a prompt must leave room for one more)
    eos_ids          the ids its configs say end generation (the tokenizer's EOS is added to them)
    feeder(capacity, adapter=None, shared_prefix=0)
                     a context manager giving feed(ids) -> fp32 logits [vocab] after those ids,
                     over a fresh KV cache of `capacity` positions: the prompt first, then one
                     id at a time; `adapter`: a request's own, from request_adapter;
                     `shared_prefix`: how many of the prompt's first ids are a head that many
                     prompts share (a template's), whose KV cache the decoder may keep and reuse
    request_adapter(dir, label)
                     a request's own adapter (lora_weights) made ready to apply unmerged (its
                     .nbytes counted by the adapter cache); it lasts while referenced

The batch scheduler (scheduler.py) also uses, where a decoder has them:
    prefill_chunk            the most prompt positions to feed at once (else the whole prompt)
    feed_batch(feeds, ids)   one id for each of several feeds at once -> logits [B, vocab]
    feed_batch_and_piece(feeds, ids, feed, piece)
                             feed_batch(feeds, ids) and feed(piece) (a piece of a prompt) in one
                             call -> (logits [B, vocab], the piece's last logits [vocab])
    kv_bytes_per_position    what one position of a sequence's KV cache takes
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

Feed = Callable[[list[int]], torch.Tensor]


class Decoder(Protocol):
    device: torch.device

    @property
    def context_length(self) -> int: ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    def feeder(self, capacity: int, adapter=None, shared_prefix: int = 0) -> contextlib.AbstractContextManager[Feed]: ...


def stop_ids(decoder: Decoder, tokenizer) -> frozenset[int]:
    """The ids that end an answer: the decoder's configs' EOS ids and the tokenizer's."""
    return decoder.eos_ids | ({tokenizer.eos_token_id} - {None})


def eos_ids_in(*configs) -> frozenset[int]:
    """Every eos_token_id of the configs given (dicts or config objects; an id or a list of ids)."""
    ids = set()
    for config in configs:
        configured = config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return frozenset(ids)
