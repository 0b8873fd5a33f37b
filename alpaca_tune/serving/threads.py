"""Work that must leave no thread behind: run on a thread of its own, which ends when it is done.

Why: torch and numba's kernels share one OpenMP runtime (torch loads its libgomp globally), and
each thread that runs a parallel product keeps a team of OpenMP threads for as long as it lives.
While there are more of those than cores, the runtime lets no idle one spin: they sleep after
every product and the next one waits to wake them. So the thread that decodes (the batch
scheduler's) should be the only one whose team lives: the model is loaded, and benchmarks time
each decoder, on threads that end. Measured on a 2-core Xeon (AVX-512), SmolLM2: one token 34.7
ms on the scheduler's thread after a load on the main thread, 24.5 ms after a load on a thread of
its own (as on the main thread alone).
"""

from __future__ import annotations

import threading


def on_a_thread_of_its_own(function, *args, **kwargs):
    """function(*args, **kwargs) on a new thread, waited for: its result, or its exception raised here."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as err:  # handed to the caller, who handles it as if it ran there
            outcome["error"] = err

    thread = threading.Thread(target=run, name=getattr(function, "__name__", "work"))
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
