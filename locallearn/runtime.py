"""Process-wide settings that make training on CPUs faster.

Training allocates and frees the same large activation buffers at every step. The C library's
allocator serves large requests with fresh memory maps and returns freed memory to the system, so
every step pays page faults on tens to hundreds of MiB (a large share of an elementwise op's time
at the widths of the image experiments). :func:`tune_cpu_allocator` keeps freed memory in the
process for reuse instead. It changes no result, only speed and the memory that the process
keeps after a peak. It acts on Linux with the GNU C library and is a no-op elsewhere; set
``LOCALLEARN_TUNE_ALLOCATOR=0`` to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TUNED: bool | None = None


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the reusable heap and never trim it; once per process.

    Returns whether the allocator is tuned.
    """
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    _TUNED = False
    if os.environ.get("LOCALLEARN_TUNE_ALLOCATOR", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _TUNED = ok
    return ok
