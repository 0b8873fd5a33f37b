"""The prompt template's preamble, computed once per optimizer step instead of once per row.

Every Alpaca-format example starts with the same words ("Below is an instruction that describes a
task...": 24 tokens with SmolLM2's tokenizer, 33 when the record has an input), ~14% of the
tokens of the training benchmark's mix. Under a causal mask the hidden states at those positions
depend only on those tokens and on the weights, which do not change within an optimizer step. So
a step computes each distinct preamble once (one row each), keeps the keys and values every
layer's attention made of it, and every row's own forward starts after the preamble, its
attention seeing the preamble's keys first (attention.py, which gets them as the decoder's
keyword argument `shared_prefix`: an object whose keys_for(layer, key, value) gives the keys and
values that layer's queries see). Each row's backward adds into the
kept keys' and values' gradients; one backward through the preamble's forward at the end of the
step carries them to the LoRA weights.

Same loss and gradients as computing every row whole (tests/training/cpu/test_shared_prefix.py, LoRA dropout
off). With LoRA dropout on, the rows that share a preamble share its dropout mask at the
preamble's positions; each row's mask is still independent Bernoulli(p) per element, so the
expected gradient is unchanged.

Used where training runs attention.py's blockwise attention (a bf16 base on CPU), padded rows
(not packing) and no gradient checkpointing (which would rerun a forward after the step's
preamble state is gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...data.tokenization import IGNORE_INDEX
from .attention import NAME as BLOCK_ATTENTION

# A preamble pass is one more forward and backward through every layer, whose fixed cost (op
# dispatch, autograd) does not shrink with its few rows: 2 x 24 tokens of SmolLM2 took ~0.26 s on
# 2 cores, the time of ~130 tokens in a step's micro-batches. Sharing must save more than that.
MIN_SAVED_TOKENS = 128


@dataclass
class SharedPrefix:
    """`length` leading positions shared by every row of a step: `prompts` [n, length] holds each
    distinct preamble once and `rows[i]` [B_i] says which one each row of micro-batch i starts with."""

    length: int
    prompts: torch.Tensor
    rows: list[torch.Tensor]
    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (k, v) leaves
    made: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (computed, its leaf)

    def to(self, device: torch.device) -> None:
        self.prompts = self.prompts.to(device)
        self.rows = [rows.to(device) for rows in self.rows]

    def compute(self, causal_lm) -> None:
        """The preamble's forward, keeping each layer's keys and values for the rows to see."""
        causal_lm.get_decoder()(input_ids=self.prompts, use_cache=False, shared_prefix=_Keeping(self))

    def decoder_inputs(self, batch: dict[str, torch.Tensor], micro_batch: int) -> dict:
        """Decoder inputs for micro-batch `micro_batch`'s positions after the preamble, whose
        attention puts the preamble's keys before its own."""
        ids = batch["input_ids"][:, self.length:]
        positions = torch.arange(self.length, batch["input_ids"].shape[1], device=ids.device)
        return {"input_ids": ids, "position_ids": positions[None],
                "shared_prefix": _Prepending(self, self.rows[micro_batch])}

    def backward(self) -> None:
        """After every micro-batch's backward: carry the preamble keys' gradients to the weights."""
        pairs = [(made, leaf.grad) for made, leaf in self.made if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([made for made, _ in pairs], [grad for _, grad in pairs])
        self.keys.clear()
        self.made.clear()


def shared_prefix_usable(causal_lm, packing: bool, gradient_checkpointing: bool) -> bool:
    """Whether training can share preambles: attention.py's blockwise attention (which puts them before
    the rows' keys), padded rows and no recomputed forwards."""
    return causal_lm.config._attn_implementation == BLOCK_ATTENTION and not packing and not gradient_checkpointing


def plan_shared_prefix(batches: list[dict[str, torch.Tensor]]) -> SharedPrefix | None:
    """The preamble length that saves the most tokens over a step's micro-batches (padded, right-
    aligned rows), or None when no length saves MIN_SAVED_TOKENS. A shared position must hold no
    target (it is never an output) and every row keeps at least one token of its own."""
    rows = [row for batch in batches for row in _real_rows(batch)]
    shortest = min(len(row) for row in rows)
    no_targets = min(_first_target(batch) for batch in batches)
    groups = [list(range(len(rows)))]  # rows with equal tokens so far
    best, best_saved = 0, 0
    for position in range(min(shortest - 1, no_targets)):
        groups = [part for group in groups for part in _split(group, rows, position)]
        saved = (position + 1) * (len(rows) - len(groups))
        if saved > best_saved:
            best, best_saved = position + 1, saved
    if best_saved < MIN_SAVED_TOKENS:
        return None
    distinct: dict[tuple[int, ...], int] = {}
    choice = torch.tensor([distinct.setdefault(tuple(row[:best]), len(distinct)) for row in rows])
    rows_per_batch = [batch["input_ids"].shape[0] for batch in batches]
    return SharedPrefix(best, torch.tensor(list(distinct), dtype=torch.long),
                        list(choice.split(rows_per_batch)))


def _real_rows(batch) -> list[list[int]]:
    lengths = batch["attention_mask"].sum(1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def _first_target(batch) -> int:
    """The first position (over all rows) whose output is trained on."""
    has_target = (batch["targets"] != IGNORE_INDEX).any(0).nonzero()
    return int(has_target[0]) if len(has_target) else batch["targets"].shape[1]


def _split(group: list[int], rows: list[list[int]], position: int) -> list[list[int]]:
    parts: dict[int, list[int]] = {}
    for row in group:
        parts.setdefault(rows[row][position], []).append(row)
    return list(parts.values())


@dataclass
class _Keeping:
    """Passed down while the preamble is computed: keeps each layer's keys and values as leaves,
    whose gradients the rows' backward fills."""
    prefix: SharedPrefix

    def keys_for(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaves = []
        for made in (key, value):
            leaf = made.detach().contiguous()
            if made.requires_grad:  # not the first layer's keys: the embeddings are frozen
                leaf.requires_grad_()
                self.prefix.made.append((made, leaf))
            leaves.append(leaf)
        self.prefix.keys[layer] = tuple(leaves)
        return key, value


@dataclass
class _Prepending:
    """Passed down while a micro-batch runs: each row's preamble keys and values go first."""
    prefix: SharedPrefix
    rows: torch.Tensor  # which preamble each row starts with

    def keys_for(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat([kept.index_select(0, self.rows), own], dim=2)
                     for kept, own in zip(self.prefix.keys[layer], (key, value)))
