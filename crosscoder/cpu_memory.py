"""Keep freed memory for reuse on CPU: large training temporaries then cost no page faults.

glibc serves allocations above 32 MB with a fresh ``mmap`` and unmaps them on free, so every
step of a large crosscoder faults in its temporaries again (``bench/crosscoder_throughput.py``
measured this at up to a third of a CPU step). Taking everything from the heap and never
trimming it makes freed blocks reusable. The process keeps its peak memory until it exits.

That holds for the main thread's arena only: glibc gives other threads arenas of their own, in which
blocks above their 64 MB heaps are mapped afresh and unmapped on free whatever ``mallopt`` says. A
Ray Tune trial trains in such a thread: there a dense step of the main command's largest crosscoder
took 638-663 ms against 488-503 in the main thread of the same process. Started with
``SINGLE_ARENA_ENVIRONMENT``, a process's threads all allocate from the main arena (501-596 ms against
486-575), so a harness that trains in threads starts its worker processes with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False

SINGLE_ARENA_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}
"""Environment under which every thread of a process allocates from glibc's main arena (read at start-up)."""


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory (once per process); False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
    return _applied
