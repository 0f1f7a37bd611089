"""The C allocator of a process that runs a model on the CPU.

glibc serves every allocation over 128 KiB with a fresh ``mmap`` and returns it on ``free``,
and it gives the top of the heap back to the system once 128 KiB of it is free. A forward pass
allocates and frees its activations (MiBs a layer) over and over, so each batch pays for page
faults that zero the same memory again: measured 20,000+ faults a second and 12% system time
in a MiniLM actor; in one process, MiniLM bf16 on two threads ran 898 rows/s as is and 1162
with this setting (issue 18's notes). Keeping freed memory in the heap holds a process at its peak working
set, which an encoder needs again for its next batch anyway.

glibc cannot raise the mmap threshold past 32 MiB, and a CNN's activations are larger: 64
images through EfficientNet-Lite0's stem are 100 MiB a layer. So mmap is turned off for the
heap's allocations altogether (``M_MMAP_MAX`` 0; glibc still maps where the heap cannot grow).
On this VM, where a page fault is dear, EfficientNet-Lite0 in fp32 on one thread spent 70% of
its time in the kernel: 27.7 images/s with the 32 MiB threshold, 86.2 with no mmap (benchmarks/
README.md).

Those settings hold for the main arena only. Ray Data runs an actor's ``__call__`` on a thread
of its own, and glibc gives such a thread its own arena, whose heaps are 64 MiB at most: a
larger block is mapped and unmapped whatever the settings, and a heap that empties is unmapped
too. One arena per process (``ONE_ARENA``) puts every thread's blocks on the main heap. glibc
reads it only when a process starts, so the pipeline sets it in the encoder actors'
environment (pipeline/adapter.py).

The heap's top is given back once that much of it is free, so the threshold must exceed what
one batch frees at once: a 64-image EfficientNet batch peaks past 1 GiB, and with a 1 GiB
threshold two of three 1,920-image runs on one thread faulted 3.7 and 5.8 million pages (68
and 62 images/s, against 92 for the third). It is mallopt's largest, 2 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): set as well, for a
# C library that refuses M_MMAP_MAX.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
# GLIBC_TUNABLES for a process whose forward runs off the main thread: every thread allocates
# from the main arena (a lock per malloc, shared by threads that mostly wait on the forward).
ONE_ARENA = "glibc.malloc.arena_max=1"


@functools.cache
def keep_freed_memory() -> bool:
    """Serve model-sized allocations from the heap and keep freed memory for the next batch.
    Once per process; True when the C library took the settings (glibc only: musl, macOS and
    Windows keep their own allocator and get False)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    took = [libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(took) and bool(libc.mallopt(M_MMAP_MAX, 0))
