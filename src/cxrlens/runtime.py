"""Process-wide settings that cxrlens's own processes (the CLI, the web server, the benchmarks) choose at start.

:func:`keep_freed_memory` tells glibc's malloc to keep freed memory in the process instead of returning it to
the system. By default glibc serves every allocation above its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh ``mmap`` and unmaps it when it is freed, so the next tensor of that size is new memory
again and pays a page fault per 4 KiB page. A deep network's activations are such tensors: on DenseNet161 at
batch 16 (224 px) a backward pass through a retained graph (what lets several classes share one forward pass)
took 1.9 s instead of 1.0 s (BENCHMARKS.md). PyTorch's CPU performance guide recommends a caching allocator
(jemalloc, tcmalloc) for the same reason; glibc's own ``mallopt`` does the same job without a new dependency.

The price: the process keeps most of the memory of its largest step until it exits (resident memory stays near
its peak instead of falling back). ``CXRLENS_MALLOC=system`` keeps glibc's defaults. Threads other than the main
one allocate from glibc's per-thread heaps, which hold at most 64 MiB each: there, larger blocks are still mapped
and unmapped each time (measured with glibc 2.36), so work in a worker thread (the web server's) gains only for
smaller tensors.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from cxrlens.errors import CxrlensError

ENV_VARIABLE = "CXRLENS_MALLOC"
CHOICES = ("keep", "system")
# glibc's mallopt parameter numbers (malloc.h) and what we set them to. mallopt takes an int, so values stay
# below 2 GiB.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
GIB = 1 << 30
MMAP_THRESHOLD = GIB  # allocations below this come from the heap and stay there when freed
MMAP_THRESHOLD_FALLBACK = 32 << 20  # older glibc refuses more than HEAP_MAX_SIZE / 2 (32 MiB); 2.36 takes 1 GiB
TRIM_THRESHOLD = GIB  # free memory at the top of the heap is returned only beyond this
TOP_PAD = 64 << 20  # the heap grows in steps of at least this (fewer brk calls; untouched pages cost nothing)
# glibc reads these from the environment at start; a user who set them has chosen already.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


@dataclass(frozen=True)
class MallocSetting:
    """What :func:`keep_freed_memory` did: ``applied`` and, in words, what or why not."""

    applied: bool
    reason: str

    def __bool__(self) -> bool:
        return self.applied


_applied_here = False  # whether this process applied it: processes it starts for the same job do the same


def kept_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` applied its setting in this process (``cxrlens.distributed`` asks, so
    the processes it starts for a job run with the allocator of the process that started them)."""
    return _applied_here


def keep_freed_memory() -> MallocSetting:
    """Tell glibc's malloc to keep freed memory (see the module docstring); safe to call again.

    Does nothing, and says why, where the allocator is not glibc's (macOS, musl, Windows), where
    ``CXRLENS_MALLOC=system`` asks for the defaults, or where the environment already tunes glibc's malloc.
    Raises :class:`CxrlensError` for any other value of ``CXRLENS_MALLOC``."""
    choice = os.environ.get(ENV_VARIABLE, "keep").strip().lower() or "keep"
    if choice not in CHOICES:
        raise CxrlensError(f"{ENV_VARIABLE}={os.environ[ENV_VARIABLE]!r} is not a choice: set it to 'keep' "
                           "(freed memory stays in the process, faster) or 'system' (glibc's defaults), or unset it")
    if choice == "system":
        return MallocSetting(False, f"{ENV_VARIABLE}=system: glibc's default allocator settings")
    chosen = [name for name in GLIBC_VARIABLES if name in os.environ]
    if chosen or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        named = ", ".join(chosen) or "GLIBC_TUNABLES"
        return MallocSetting(False, f"the environment tunes glibc's malloc already ({named})")
    libc = _glibc()
    if libc is None:
        return MallocSetting(False, "the C library is not glibc: its allocator is left as it is")
    if not (libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and libc.mallopt(M_TOP_PAD, TOP_PAD)):
        return MallocSetting(False, "glibc's mallopt refused the trim threshold or top pad")
    threshold = next((value for value in (MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK)
                      if libc.mallopt(M_MMAP_THRESHOLD, value)), None)
    if threshold is None:
        return MallocSetting(False, "glibc's mallopt refused the mmap threshold")
    global _applied_here
    _applied_here = True
    return MallocSetting(True, f"glibc malloc keeps freed memory (mmap threshold {threshold >> 20} MiB, trim threshold "
                               f"{TRIM_THRESHOLD >> 20} MiB; {ENV_VARIABLE}=system for the defaults)")


def _glibc() -> ctypes.CDLL | None:
    """The running process's C library if it is glibc (it exports gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no "the process itself"
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
