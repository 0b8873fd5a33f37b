"""Serving through transformers (and PEFT for an adapter): on a GPU, for architectures the lean
CPU path does not run, and for adapters it cannot merge.

On a GPU each one-token step of a request decoding alone is a CUDA graph replay over a static KV
cache (cuda_graph.py); elsewhere transformers' DynamicCache is fed, and the batch scheduler's rows
run together (TransformersDecoder.feed_batch), each with its own adapter where it names one.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..base_model import load_causal_lm
from ..device import pick_device
from .decoder import eos_ids_in
from .weights import WeightsError

log = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
PREFILL_CHUNK = 256  # prompt positions fed at once (the lean path's too)


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


@dataclass(eq=False)
class RequestAdapter:
    """A request's own adapter (lora_weights) loaded into the decoder's PeftModel under `name`.
    It stays in the model while anything holds this object (the adapter cache, a request waiting
    or running with it), and is deleted from the model after the last reference goes."""
    name: str
    nbytes: int


class _Locked:
    """A CUDA-graph feeder called under the decoder's lock (no adapter is loaded mid-forward)."""

    def __init__(self, feed, lock):
        self.feed, self.lock = feed, lock

    def __call__(self, ids: list[int]) -> torch.Tensor:
        with self.lock:
            return self.feed(ids)


class DynamicFeed:
    """feed(ids) -> fp32 logits [vocab] over one sequence's DynamicCache, with the request's own
    adapter (a PeftModel adapter name; BASE: none) when the decoder holds request adapters."""

    def __init__(self, decoder: TransformersDecoder, adapter: RequestAdapter | None = None):
        from transformers import DynamicCache

        self.decoder, self.adapter = decoder, adapter  # held: the adapter stays loaded while this feeds
        self.adapter_name = adapter.name if adapter is not None else BASE
        self.cache = DynamicCache(config=decoder.model.config)
        self.length = 0
        self.closed = False

    def __call__(self, ids: list[int]) -> torch.Tensor:
        """Ids fed in pieces cut at multiples of PREFILL_CHUNK positions, as the batch scheduler
        cuts a prompt, so that a prompt fed whole or piece by piece computes the same."""
        decoder = self.decoder
        with decoder.lock, torch.inference_mode():
            decoder.delete_retired_adapters()
            decoder.leave_batch(self)
            done = 0
            while done < len(ids):
                piece = ids[done:done + PREFILL_CHUNK - self.length % PREFILL_CHUNK]
                step = torch.tensor([piece], device=decoder.device)
                positions = torch.arange(self.length, self.length + len(piece), device=decoder.device)[None]
                logits = decoder.model(input_ids=step, position_ids=positions, past_key_values=self.cache,
                                       use_cache=True, logits_to_keep=1, **decoder.adapter_args([self])).logits
                self.length += len(piece)
                done += len(piece)
            return logits[0, -1].float()


@dataclass
class _Batch:
    """Decoding rows kept together between steps: their caches left-padded to one length in one
    DynamicCache, so that a step while nobody joins or leaves copies nothing."""
    feeds: tuple[DynamicFeed, ...]
    cache: object  # DynamicCache [rows, heads, padded length, head dim] per layer
    pads: list[int]  # left padding of each row
    mask: torch.Tensor  # [rows, padded length]: 0 where padded


class TransformersDecoder:
    """A transformers causal LM as a Decoder (decoder.py), with the batch scheduler's feed_batch.

    feed_batch: the decoding rows run as one batch, their caches left-padded to the longest and
    masked, each at its own position. transformers' caches keep one write position per batch, so
    rows of different lengths share a cache only padded; the padded batch is kept while the same
    rows decode and rebuilt (each row's cache copied out and in) when one joins or leaves. On a
    GPU a single row replays its CUDA graph instead (cuda_graph.py), where it has one.

    Request adapters (lora_weights) are loaded into a PeftModel wrapped around the base, each under
    its own name, and a batch's rows each name theirs (PEFT's mixed-adapter batches); while any is
    loaded, every row runs eagerly with its name. An adapter leaves the model once nothing refers
    to it (the adapter cache evicted it and its last request ended); with the last one the model is
    unwrapped again. A merged setup adapter cannot be taken off a row, so such a server refuses them
    (request_adapter)."""

    def __init__(self, model, cuda_graphs: bool = True, compile_step: bool = False, merged_adapter: bool = False):
        self.model = model
        self.device = model.device
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step  # compile the one-token step before capturing it
        self.merged_adapter = merged_adapter  # COG_WEIGHTS' adapter folded into the weights
        self.lock = threading.RLock()  # one forward, or one adapter load or deletion, at a time
        self._request_adapters = 0  # loaded so far (their names' numbers)
        self._peft = False  # self.model is a PeftModel holding request adapters
        self._retired: collections.deque[str] = collections.deque()  # no longer referenced: to delete
        self._batch: _Batch | None = None

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
        return cls(model.eval(), merged_adapter=adapter_dir is not None)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def eos_ids(self) -> frozenset[int]:
        return eos_ids_in(getattr(self.model, "generation_config", None), self.model.config)

    @contextlib.contextmanager
    def feeder(self, capacity: int, adapter: RequestAdapter | None = None, shared_prefix: int = 0):
        """shared_prefix: not used here (each prompt is read whole)."""
        from .cuda_graph import graphs_possible, kept_feeder

        with self.lock:
            graphs = self.cuda_graphs and not self._peft and adapter is None and graphs_possible(self.model)
        if graphs:
            with kept_feeder(self.model, capacity, self.compile_step) as feed:
                yield _Locked(feed, self.lock)
            return
        feed = DynamicFeed(self, adapter)
        try:
            yield feed
        finally:
            with self.lock:
                feed.closed = True
                feed.adapter = None
                if self._batch is not None and all(member.closed for member in self._batch.feeds):
                    self._batch = None  # nobody left to decode: its caches are freed now

    # -- request adapters (adapters.py's AdapterCache) ----------------------------------------
    def request_adapter(self, adapter_dir: Path, label: str) -> RequestAdapter:
        """The adapter in adapter_dir, loaded unmerged beside the others for the requests that name it."""
        from peft import PeftModel

        if self.merged_adapter:
            raise WeightsError(f"{label}: this server merged its own adapter (COG_WEIGHTS) into the base on the "
                               f"transformers path, so a request's adapter cannot replace it; serve the base alone "
                               f"to take adapters per request")
        with self.lock:
            self.delete_retired_adapters()
            name = f"request{self._request_adapters}"
            self._request_adapters += 1  # a name is never used twice, even after a failed load
            try:
                if self._peft:
                    self.model.load_adapter(str(adapter_dir), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
                    # none active: a forward that names no adapters (a CUDA-graph row started
                    # before this one was loaded) stays the base's; named rows are unaffected
                    self.model.base_model.set_adapter([])
                    self._peft = True
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                if self._peft and name in self.model.peft_config:
                    self._delete(name)  # what a failed load left half-made
                raise WeightsError(f"{label}: not a LoRA adapter for this base model: {err}") from None
            self.model.eval()
            nbytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                         if f".{name}." in n)
        adapter = RequestAdapter(name, nbytes)
        weakref.finalize(adapter, self._retired.append, name)  # any thread; deleted on the model's
        return adapter

    def delete_retired_adapters(self) -> None:
        """Delete from the model the request adapters nothing refers to any more (called under the
        lock, between forwards)."""
        while self._retired:
            self._delete(self._retired.popleft())

    def _delete(self, name: str) -> None:
        if not self._peft or name not in self.model.peft_config:
            return
        self.model.delete_adapter(name)
        left = list(self.model.peft_config)
        if not left:  # the last one: back to the plain model (and its CUDA graphs)
            self.model = self.model.unload()
            self._peft = False
        elif self.model.active_adapter not in self.model.peft_config:
            # PeftModel checks its active adapter's config in every forward, even one that names
            # each row's adapter; the layers themselves stay with none active
            self.model.active_adapter = left[0]

    def adapter_args(self, feeds) -> dict:
        """PEFT's per-row adapter names, while the model holds request adapters."""
        return {"adapter_names": [f.adapter_name for f in feeds]} if self._peft else {}

    # -- the batch scheduler's extras (scheduler.py) ------------------------------------------
    prefill_chunk = PREFILL_CHUNK  # a long prompt holds the others back one piece a step

    @property
    def kv_bytes_per_position(self) -> int:
        """Keys and values of every layer for one position, in the model's dtype."""
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return config.num_hidden_layers * kv_heads * head_dim * 2 * self.model.dtype.itemsize

    def feed_batch(self, feeds: list, tokens: list[int]) -> torch.Tensor:
        """One token for each feed at once -> logits [len(feeds), vocab]."""
        if len(feeds) == 1 or not all(isinstance(f, DynamicFeed) and _plain_cache(f.cache) for f in feeds):
            return torch.stack([feed([token]) for feed, token in zip(feeds, tokens)])
        with self.lock, torch.inference_mode():
            self.delete_retired_adapters()
            if self._batch is None or self._batch.feeds != tuple(feeds):
                self.leave_batch(None)
                self._batch = self._gather(tuple(feeds))
            batch = self._batch
            ones = torch.ones(len(feeds), 1, dtype=batch.mask.dtype, device=self.device)
            batch.mask = torch.cat([batch.mask, ones], dim=1)
            step = torch.tensor(tokens, device=self.device)[:, None]
            positions = torch.tensor([f.length for f in feeds], device=self.device)[:, None]
            logits = self.model(input_ids=step, attention_mask=batch.mask, position_ids=positions,
                                past_key_values=batch.cache, use_cache=True, logits_to_keep=1,
                                **self.adapter_args(feeds)).logits
            for feed in feeds:
                feed.length += 1
            return logits[:, -1].float()

    def _gather(self, feeds: tuple[DynamicFeed, ...]) -> _Batch:
        from transformers import DynamicCache

        longest = max(f.length for f in feeds)
        pads = [longest - f.length for f in feeds]
        layers = []
        for index in range(len(feeds[0].cache.layers)):
            keys = [F.pad(f.cache.layers[index].keys, (0, 0, pad, 0)) for f, pad in zip(feeds, pads)]
            values = [F.pad(f.cache.layers[index].values, (0, 0, pad, 0)) for f, pad in zip(feeds, pads)]
            layers.append((torch.cat(keys), torch.cat(values)))
        for feed in feeds:
            feed.cache = None  # the batch holds its rows now
        mask = torch.ones(len(feeds), longest, dtype=torch.long, device=self.device)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        return _Batch(feeds, DynamicCache(ddp_cache_data=layers), pads, mask)

    def leave_batch(self, feed: DynamicFeed | None) -> None:
        """Give the kept batch's rows their own caches back (only if `feed` is one of them; None: in
        any case), so that a row can be fed alone or a new batch formed."""
        from transformers import DynamicCache

        batch = self._batch
        if batch is None or (feed is not None and feed not in batch.feeds):
            return
        self._batch = None
        for row, (member, pad) in enumerate(zip(batch.feeds, batch.pads)):
            if member.closed:
                continue
            layers = [(layer.keys[row:row + 1, :, pad:].clone(), layer.values[row:row + 1, :, pad:].clone())
                      for layer in batch.cache.layers]
            member.cache = DynamicCache(ddp_cache_data=layers)


def _plain_cache(cache) -> bool:
    """Every layer a plain DynamicLayer (no sliding window, no quantization): what _gather pads."""
    from transformers.cache_utils import DynamicLayer

    return cache is None or all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)
