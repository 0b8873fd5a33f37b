"""keep_freed_memory: freed large blocks stay in the process (checked in fresh processes)."""

import subprocess
import sys

import pytest
from conftest import ROOT

# Allocates and touches 256 MB, frees it, and prints resident memory (MB) before and after the free.
PROBE = """
import sys
sys.path.insert(0, {root!r})
from alpaca_tune.allocator import keep_freed_memory
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) // 1024
kept = keep_freed_memory() if {call} else None
import ctypes
block = ctypes.create_string_buffer(256 * 1024 * 1024)  # zero-filled: every page touched
held = rss_mb()
del block
print(kept, held, rss_mb())
"""


def _probe(call: bool) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), call=call)],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_memory_stays_for_reuse_only_when_asked():
    _, held, after = _probe(call=False)
    assert after < held - 200  # default malloc: the freed 256 MB went back to the kernel
    kept, held, after = _probe(call=True)
    assert kept == "True"
    assert after > held - 20  # kept in the process for the next allocation
