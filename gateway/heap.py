"""How a long-running gateway process's C heap gives memory back: large blocks, once freed, at once.

glibc's malloc serves blocks over its mmap threshold (128 KiB) with mmap, and gives each back when it is
freed. But each time a mapped block larger than the threshold is freed, glibc raises the threshold to its
size (up to 32 MiB on 64-bit) and its heap-trim threshold to twice that: from then on blocks of that size
come from the heap, and the heap keeps up to twice their size unused at its top. An adapter upload (its
1 MiB write buffer, its weights read back to validate them) is enough: measured on a soak, the gateway's
RSS then rose and fell by 2.1-2.3 MiB with each upload, heap memory held for the next one, which over
minutes looks like growth.

`steady()` fixes both thresholds, which turns that adjustment off: blocks over MMAP_THRESHOLD come from
mmap (unless a free chunk of the heap already fits one) and go back when freed; the heap is trimmed once
more than TRIM_THRESHOLD is free at its top. It also caps the heaps (arenas) at ARENAS: by default each
thread that allocates (those behind `asyncio.to_thread`, which receive, unpack and verify uploads) may get
a heap of its own, each keeping what was freed in it.
The cost is an mmap and a munmap per large block (a record batch, an upload's buffer): microseconds, not
on the path of a small request. Where the C library is not glibc (musl, macOS) nothing changes, and a
setting an operator gave glibc in the environment (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, or its tunable in `GLIBC_TUNABLES`) is left as they gave it.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 512 * 1024
ARENAS = 2
"""Two heaps shared by all threads (the main one included): most allocations happen under the GIL, so threads
seldom contend for them."""
SETTINGS = (  # mallopt's parameter (glibc's malloc.h), its value here, how an operator sets it in the environment
    (-3, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (-1, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    (-8, ARENAS, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
)


def steady() -> bool:
    """Fix glibc's mmap and trim thresholds and cap its heaps, for this process (call it before threads start),
    except what the environment sets; False where that is not possible (not glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    tunables = {item.split("=", 1)[0] for item in os.environ.get("GLIBC_TUNABLES", "").split(":")}
    done = [
        bool(mallopt(param, value))
        for param, value, variable, tunable in SETTINGS
        if variable not in os.environ and tunable not in tunables
    ]
    return all(done)
