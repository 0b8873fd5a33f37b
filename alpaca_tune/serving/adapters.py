"""Per-request adapters (the `lora_weights` input): fetched once, checked, kept in an LRU cache.

`lora_weights` is an http(s) URL or a data: URI of an archive from train.py, or the name of an
adapter under the directory the server was started with ($ALPACA_TUNE_ADAPTER_DIR, for adapters
baked into the image). A name is refused before anything is opened if it is absolute or climbs
out with "..", and after resolving if a link leads out of that directory; every refusal is the
same message, whatever exists on disk. A fetched adapter is unpacked and checked as COG_WEIGHTS
is (weights.py, adapter_check.py), handed to the decoder (request_adapter: LeanLlama's unmerged
low-rank updates, or an adapter of TransformersDecoder's PeftModel), and kept
under its content hash (the same adapter under two URLs is kept once), least recently used
first out past $ALPACA_TUNE_MAX_CACHED_ADAPTERS adapters or ..._BYTES bytes.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path, PurePosixPath

from ..adapter_check import check_adapter
from ..adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .lean.lora_merge import unmergeable_reason
from .limits import Limits
from .weights import WeightsError, fetch_weights

log = logging.getLogger(__name__)

ADAPTER_DIR_ENV = "ALPACA_TUNE_ADAPTER_DIR"
REFUSED = ("lora_weights: give an http(s) URL or a data: URI of an adapter archive from train.py, or the "
           f"name of an adapter in the server's ${ADAPTER_DIR_ENV}")


def resolve(spec: str, adapter_dir: str) -> str:
    """What fetch_weights is given for `spec`: the URL itself, or a path inside adapter_dir."""
    if spec.startswith(("http://", "https://", "data:")):
        return spec
    name = PurePosixPath(spec)
    if not adapter_dir or name.is_absolute() or ".." in name.parts or not name.parts:
        raise WeightsError(REFUSED)
    root = Path(adapter_dir).resolve()
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root) or not candidate.exists():
        raise WeightsError(REFUSED)
    return str(candidate)


def content_key(adapter_root: Path) -> str:
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update((adapter_root / name).read_bytes())
    return digest.hexdigest()


class AdapterCache:
    def __init__(self, decoder, base_shapes: dict, limits: Limits, adapter_dir: str | None = None):
        self.decoder, self.base_shapes, self.limits = decoder, base_shapes, limits
        self.adapter_dir = os.environ.get(ADAPTER_DIR_ENV, "") if adapter_dir is None else adapter_dir
        self._by_key: collections.OrderedDict = collections.OrderedDict()
        self._key_of: dict[str, str] = {}
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, spec: str):
        """The decoder's low-rank updates for the adapter `spec` names (fetched on first use)."""
        with self._lock:
            key = self._key_of.get(spec)
            if key in self._by_key:
                self._by_key.move_to_end(key)
                return self._by_key[key]
        source = resolve(spec, self.adapter_dir)
        label = "lora_weights=" + (spec if len(spec) < 80 else spec[:60] + "...")
        with tempfile.TemporaryDirectory(prefix="request-adapter-") as workdir:
            adapter = fetch_weights(source, Path(workdir), self.limits)
            if adapter.full_model:
                raise WeightsError(f"{label}: holds a whole fine-tuned model (finetune_method=full), not an "
                                   f"adapter: serve it as COG_WEIGHTS, where it replaces the base")
            config = check_adapter(adapter.root, self.base_shapes, label)
            reason = unmergeable_reason(config)
            if reason:
                raise WeightsError(f"{label}: {reason}: not applied per request (serve it as COG_WEIGHTS instead)")
            key = content_key(adapter.root)
            with self._lock:  # fetched twice at once: the first one loaded is kept
                if key in self._by_key:
                    self._key_of[spec] = key
                    self._by_key.move_to_end(key)
                    return self._by_key[key]
            updates = self.decoder.request_adapter(adapter.root, label)
        self.fetches += 1
        with self._lock:
            self._key_of[spec] = key
            if key in self._by_key:  # another thread loaded it meanwhile: keep that one (ours is let go)
                self._by_key.move_to_end(key)
                return self._by_key[key]
            self._by_key[key] = updates
            self._by_key.move_to_end(key)
            while len(self._by_key) > self.limits.max_cached_adapters or (
                    len(self._by_key) > 1 and sum(u.nbytes for u in self._by_key.values())
                    > self.limits.max_cached_adapter_bytes):
                # requests that hold the evicted adapter keep it until they end (the transformers
                # path deletes it from the model once nothing refers to it)
                evicted_key, _ = self._by_key.popitem(last=False)
                self._key_of = {s: k for s, k in self._key_of.items() if k != evicted_key}
        log.info("%s: adapter %s loaded for requests (%d cached)", label, key[:12], len(self._by_key))
        return updates

    def __len__(self) -> int:
        return len(self._by_key)
