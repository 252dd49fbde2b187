"""Keep freed memory in a CPU training process (glibc `mallopt`).

    retain_freed_memory()   # rainbowpo.train.setup, when the device is CPU and train.retain_host_memory

By default glibc serves every large block with a fresh `mmap` and unmaps it on free, so each step
page-faults its activations and LM-head logits in again (the LM head's forward + backward on the benchmark
model: ~290 → ~190 ms). Turning `mmap` off and raising the trim threshold keeps freed blocks in the heap for
the next step, as the jemalloc/tcmalloc set-ups recommended for CPU training do. Peak RSS is what the run
needs; RSS just no longer shrinks between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_RETAIN = (  # (mallopt option, the same as a glibc environment tunable, value)
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
    (M_MMAP_MAX, "MALLOC_MMAP_MAX_", 0),
)


def retain_env() -> dict[str, str]:
    """The same setting for another process, as environment variables (benchmarks/bench_train.py)."""
    return {name: str(value) for _, name, value in _RETAIN}


def retain_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and never trim it. False (and nothing done) elsewhere."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(option, value) == 1 for option, _, value in _RETAIN)
