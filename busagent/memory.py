"""Keep big message buffers out of the heap (glibc): they go back to the system when freed.

glibc serves allocations above its mmap threshold with mmap, and raises that threshold to the
size of each such block freed (up to 32 MiB). After the first big request, requests of a few
hundred KiB come from the per-thread heaps instead, whose free space glibc rarely returns: a
burst of big messages then leaves the process tens of MiB larger for good. Pinning the
threshold keeps every block over it on its own mapping, unmapped when freed.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 << 10  # glibc's default starting value, kept fixed


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
