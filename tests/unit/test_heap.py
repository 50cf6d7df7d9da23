"""gateway.heap: after `steady()`, a large block freed once does not move later ones into the heap, freeing one
gives its memory back, and threads share one heap (each check in a fresh interpreter: malloc's settings are
the whole process's)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any

import pytest

LIBC, LIBC_VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(
    LIBC != "glibc" or tuple(int(part) for part in LIBC_VERSION.split(".")[:2]) < (2, 33),
    reason="mallopt's thresholds are glibc's; the probe reads them with mallinfo2 (glibc 2.33 and later)",
)

PROBE = """
import ctypes, json, os, sys, tempfile, threading
from gateway import heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.fopen.restype = ctypes.c_void_p
steadied = heap.steady() if sys.argv[1] == "steady" else None
big = bytearray(4 << 20)  # an upload's worth, freed: glibc would raise its thresholds to 4 MiB
# (a fresh interpreter's heap has no free chunk of 1 MiB: the block below comes from mmap or from the heap's top)
del big
before = libc.mallinfo2()
block = bytearray(1 << 20)
held = libc.mallinfo2()
del block
after = libc.mallinfo2()
ready, done = threading.Barrier(5), threading.Event()

def allocate():
    kept = [bytearray(4096) for _ in range(8)]  # from the heap its thread is given
    ready.wait()
    done.wait()

threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
ready.wait()
with tempfile.NamedTemporaryFile("r") as report:
    out = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(out))
    libc.fclose(ctypes.c_void_p(out))
    heaps = report.read().count("<heap nr=")
done.set()
print(json.dumps({"steadied": steadied, "mapped": held.hblks - before.hblks, "heaps": heaps,
                  "heap_grew": held.arena - before.arena, "kept_after": after.keepcost - before.keepcost}))
"""


def probe(mode: str, **env: str) -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True,
        env={**environment, **env},
    )  # fmt: skip
    return dict(json.loads(done.stdout))


def test_without_it_a_freed_large_block_moves_the_next_ones_into_the_heap() -> None:
    """The behaviour `steady` turns off, as glibc has it here (so the test below proves a change)."""
    found = probe("default")
    assert found["mapped"] == 0 and found["heap_grew"] >= 1 << 20, found
    assert found["kept_after"] >= 1 << 20, "freed, the block's memory stays at the top of the heap"
    assert found["heaps"] == 5, "four threads that allocate at once: a heap each, and the main one"


def test_after_steady_large_blocks_are_mapped_and_given_back() -> None:
    found = probe("steady")
    assert found["steadied"] is True
    assert found["mapped"] == 1 and found["heap_grew"] == 0, found
    assert found["kept_after"] < 512 * 1024, found
    assert found["heaps"] <= 2, found


def test_what_an_operator_set_in_the_environment_is_left_alone() -> None:
    capped = probe("steady", MALLOC_ARENA_MAX="4")  # one interpreter for both checks
    assert capped["heaps"] == 4, "their cap, not ours"
    assert probe("steady", GLIBC_TUNABLES="glibc.malloc.arena_max=3")["heaps"] == 3
    assert capped["mapped"] == 1, "the thresholds they did not set are still fixed"
    assert probe("steady", MALLOC_MMAP_THRESHOLD_=str(8 << 20))["mapped"] == 0, "their threshold: 1 MiB is below it"
