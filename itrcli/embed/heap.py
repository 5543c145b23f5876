"""glibc's malloc, set to keep the blocks a CPU torch tower allocates and frees per layer.

An image tower's layers allocate and free activations of 2-20 MB each (ViT-B/32 at a batch
of 32: ``[32, 50, 3072]`` float32 is 19.7 MB).  With glibc's defaults a freed block that
size goes back to the kernel (the mmap threshold, and the trimming of the heap's top), so
the next layer's block of the same size is fresh memory: the kernel faults in and zeroes
every page again.  perf showed it as ``exc_page_fault`` / ``clear_page_erms``, and keeping
the blocks made the fp32 tower 6-10% faster on two cores (bench/avx2only: 17.2-17.7 ->
18.5-19.4 img/s), the peak memory unchanged.  bf16 on AMX was unchanged.

Only on glibc (Linux); elsewhere, and where the user set malloc's thresholds in the
environment, nothing changes.  Process-wide: called by an image-only encoder on the CPU
(indexing, the export, ``itr eval``'s images), never by ``itr search``.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
#: blocks up to this come from the heap, not mmap: glibc's largest (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
#: freed memory at the heap's top is kept up to this much (a batch's activations)
TRIM_THRESHOLD = 256 << 20
#: set in the environment, they are the user's (MALLOC_*_ or GLIBC_TUNABLES glibc.malloc.*)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_kept = False


def keep_tensor_blocks() -> bool:
    """Keep freed blocks of up to :data:`MMAP_THRESHOLD` in the heap, and up to
    :data:`TRIM_THRESHOLD` of free memory at its top.  True where it is so (set now or
    before); False off glibc or where the environment sets malloc's thresholds."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's mallopt: musl has none of these parameters
        _kept = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        return False
    return _kept
