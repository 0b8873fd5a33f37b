"""Decoding on a GPU with each one-token step replayed as a CUDA graph.

Why: a 7B Llama's decode step is ~1,700 kernels, most of them tiny. Launched one by one from
Python they take far longer to issue than the GPU takes to run them (on an H100: 90 ms a token
eager, 8.3 ms replayed), so eager decoding reaches a fraction of what the memory bandwidth allows.
Recorded once as a CUDA graph, the whole step is issued in one call.

A graph replays fixed memory addresses, so everything the step touches is preallocated: the
token id and position live in small device tensors written before each replay, and the KV cache
is transformers' StaticCache (its tensors are allocated by the prompt's forward, before capture).
The cache keeps its own write position as a device tensor that every step advances (so a replay
writes where it should); the warm-up steps before capture advance it too and are rewound.
The prompt itself runs eagerly (its length varies). Capture costs about a second for a 7B model,
so a model keeps its feeders per capacity bucket (powers of two from 256; as many as requests of
that size ran at once) and later requests replay a graph already recorded; stale keys beyond the
new request's positions are masked out.
Where capture is refused (a model whose forward synchronises with the host, say), decoding goes on
eagerly over the same static cache and the reason is logged. tests/test_cuda.py checks graph
decoding against eager decoding; figures in BENCHMARKS.md (GPU).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


def graphs_possible(model) -> bool:
    """CUDA graphs for an unquantized transformers model on a GPU (bitsandbytes' kernels are not
    known to be capture-safe, so 8/4-bit models decode eagerly)."""
    return (model.device.type == "cuda" and not getattr(model, "is_quantized", False)
            and getattr(model.config, "quantization_config", None) is None)


@contextlib.contextmanager
def kept_feeder(model, needed: int, compile_step: bool = False) -> Iterator[StaticCacheFeeder]:
    """A feeder of the model's for at least `needed` positions, empty, for one generation: one
    of its bucket's that no unfinished generation uses, else a new one, kept for later. So the
    feeders of a bucket (each a static cache and its graph) are as many as generations of that
    size ever ran at once, and each records its graph once."""
    capacity = max(256, 1 << (needed - 1).bit_length())
    kept = model.__dict__.setdefault("_alpaca_tune_feeders", {})  # lives as long as the model
    pool = kept.setdefault((capacity, compile_step), [])
    feeder = next((f for f in pool if not f.in_use), None)
    if feeder is None:
        feeder = StaticCacheFeeder(model, capacity, compile_step=compile_step)
        pool.append(feeder)
    feeder.restart()
    feeder.in_use = True
    try:
        yield feeder
    finally:  # also when the generation is abandoned (a cancelled request)
        feeder.in_use = False


class StaticCacheFeeder:
    """feed(ids) -> fp32 logits [vocab] after those ids: the prompt first, then one id at a time."""

    def __init__(self, model, capacity: int, use_graph: bool = True, compile_step: bool = False):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        self.capacity = capacity
        self.length = 0  # positions filled
        self.in_use = False  # by a generation (kept_feeder)
        self.use_graph = use_graph and model.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.step_id = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self.step_position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.step_logits: torch.Tensor | None = None  # written by each replay
        # compiled, the step's elementwise kernels are fused before capture (fewer, larger kernels)
        self._step = torch.compile(self._forward, dynamic=False) if compile_step else self._forward

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions[None], cache_position=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def __call__(self, ids: list[int]) -> torch.Tensor:
        end = self.length + len(ids)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.capacity}")
        if len(ids) > 1:
            positions = torch.arange(self.length, end, device=self.model.device)
            logits = self._forward(torch.tensor([ids], device=self.model.device), positions)
        else:
            self.step_id.fill_(ids[0])
            self.step_position.fill_(self.length)
            if self.use_graph and self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
                logits = self.step_logits.clone()  # the next replay overwrites step_logits
            else:
                logits = self._step(self.step_id, self.step_position)
        self.length = end
        return logits

    def restart(self) -> None:
        """Empty again (the graph, if recorded, is kept) for the next generation."""
        self.length = 0
        self._rewind()

    def _rewind(self) -> None:
        """Point the cache's own write position at self.length. transformers 5 keeps it on the
        device as each StaticLayer's `cumulative_length`; a cache without it would go on writing
        after the last request's positions, so that is an error, not something to skip."""
        positions = [getattr(layer, "cumulative_length", None) for layer in self.cache.layers]
        if not positions or not all(torch.is_tensor(p) for p in positions):
            raise RuntimeError("transformers' StaticCache layers no longer keep their write position in a "
                               "`cumulative_length` tensor; cuda_graph.py cannot rewind the cache")
        for position in positions:
            position.fill_(self.length)

    def warm_up(self) -> None:
        """Run the next step twice without keeping it, so that lazily built state (kernels,
        workspaces) exists before capture; the cache's write position is then rewound."""
        for _ in range(2):
            self._step(self.step_id, self.step_position)
        self._rewind()

    def _capture(self) -> None:
        """Record the one-token step (warm-up on a side stream first, as CUDA graphs ask)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self.warm_up()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step_logits = self._step(self.step_id, self.step_position)
            self.graph = graph
        except RuntimeError as err:
            torch.cuda.current_stream().wait_stream(side)
            log.warning("decoding without CUDA graphs (capture refused: %s)", str(err).splitlines()[0])
            self.use_graph = False
            self.step_logits = None
