"""Serving through transformers (and PEFT for an adapter): on a GPU, for architectures the lean
CPU path does not run, and for adapters it cannot merge.

On a GPU each one-token step is a CUDA graph replay over a static KV cache (cuda_graph.py);
elsewhere transformers' DynamicCache is fed a token at a time.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..base_model import load_causal_lm
from ..device import pick_device
from .decoder import Feed, eos_ids_in
from .weights import WeightsError

log = logging.getLogger(__name__)


def pick_dtype(device: torch.device) -> torch.dtype:
    """For inference: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_adapter(model, adapter_dir: Path, label: str | None = None):
    """PEFT's model: `model` with the adapter in `adapter_dir` (unmerged); errors name `label`
    (what the user gave) when set."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise WeightsError(f"{label or adapter_dir}: not a LoRA adapter for this base model: {err}") from None


class TransformersDecoder:
    """A transformers causal LM as a Decoder (decoder.py)."""

    def __init__(self, model, cuda_graphs: bool = True, compile_step: bool = False):
        self.model = model
        self.device = model.device
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step  # compile the one-token step before capturing it

    @classmethod
    def load(cls, base_dir: Path, adapter_dir: Path | None = None, merge: bool = True,
             label: str | None = None) -> TransformersDecoder:
        """The base (+ adapter, folded into the weights when `merge`: same outputs, no LoRA cost
        per token), on the GPU when there is one, in pick_dtype's dtype."""
        device = pick_device()
        model = load_causal_lm(base_dir, device, pick_dtype(device))
        model.config.use_cache = True
        if adapter_dir is not None:
            model = load_adapter(model, adapter_dir, label)
            if merge:
                model = model.merge_and_unload()
        return cls(model.eval())

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def eos_ids(self) -> frozenset[int]:
        return eos_ids_in(getattr(self.model, "generation_config", None), self.model.config)

    @contextlib.contextmanager
    def feeder(self, capacity: int, adapter=None):
        from .cuda_graph import graphs_possible, kept_feeder

        if adapter is not None:  # InstructModel.request refuses lora_weights here before it gets this far
            raise ValueError("a request's own adapter is applied on the lean CPU path only")
        if self.cuda_graphs and graphs_possible(self.model):
            with kept_feeder(self.model, capacity, self.compile_step) as feed:
                yield feed
            return
        yield self._dynamic_cache_feed()

    def _dynamic_cache_feed(self) -> Feed:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)

        def feed(ids: list[int]) -> torch.Tensor:
            step = torch.tensor([ids], device=self.device)
            return self.model(input_ids=step, past_key_values=cache, use_cache=True,
                              logits_to_keep=1).logits[0, -1].float()
        return feed
