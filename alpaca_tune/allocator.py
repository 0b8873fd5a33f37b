"""glibc malloc tuning for two opposite workloads: training keeps freed memory, conversion returns it.

Every micro-batch allocates and frees the same large tensors again. glibc's malloc serves large
requests from fresh mmap'd pages and gives them back to the kernel on free (and trims the heap
when its top is free), so each step pays the kernel again to fault those pages in and zero them.
On the project's 2-core VM that was ~15% of a CPU training step (BENCHMARKS.md). Told never to
use mmap and never to trim, malloc keeps freed memory for reuse instead: peak RSS stays about
what the step needs anyway, and the memory goes back when the process ends. PyTorch's CPU tuning
guide swaps the allocator (jemalloc, tcmalloc via LD_PRELOAD) for the same reason; this needs no
preload and no extra package.

Converting a checkpoint is the opposite case: each layer's tensors differ in size from the last
one's, freed blocks of a few MB fragment the heap, and resident memory would creep up to the
whole model; handing them back after each layer keeps the peak at about one layer.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def _glibc():
    """glibc, or None on another platform or libc (musl), whose allocator is then left alone."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory rather than return it; False where it cannot."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("malloc keeps freed memory for reuse: %s", kept)
    return kept


def release_freed_memory() -> None:
    """Hand the heap's free blocks back to the kernel now (no-op without glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
