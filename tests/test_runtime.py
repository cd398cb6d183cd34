"""cxrlens.runtime.keep_freed_memory: glibc's malloc keeps freed memory in cxrlens's own processes, or says why not."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import assert_one_error_line, run_cli

from cxrlens.errors import CxrlensError
from cxrlens.runtime import ENV_VARIABLE, GLIBC_VARIABLES, keep_freed_memory

GLIBC = platform.libc_ver()[0] == "glibc"
MALLINFO2 = GLIBC and hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33


@pytest.fixture
def clean_environment(monkeypatch):
    """No user choice in the environment: neither ours nor glibc's own variables."""
    for name in (ENV_VARIABLE, "GLIBC_TUNABLES", *GLIBC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_applies_on_glibc_and_can_be_called_again(clean_environment):
    first, second = keep_freed_memory(), keep_freed_memory()
    assert first.applied == second.applied == GLIBC
    assert bool(first) == GLIBC
    assert ("keeps freed memory" if GLIBC else "not glibc") in first.reason


def test_user_choices_are_respected(clean_environment):
    clean_environment.setenv(ENV_VARIABLE, "system")
    setting = keep_freed_memory()
    assert not setting and "CXRLENS_MALLOC=system" in setting.reason
    clean_environment.setenv(ENV_VARIABLE, "keep")
    clean_environment.setenv("MALLOC_ARENA_MAX", "2")
    setting = keep_freed_memory()
    assert not setting and "MALLOC_ARENA_MAX" in setting.reason
    clean_environment.setenv(ENV_VARIABLE, "fast")
    with pytest.raises(CxrlensError, match="CXRLENS_MALLOC='fast' is not a choice"):
        keep_freed_memory()


def test_cli_names_a_wrong_choice(clean_environment, capsys):
    clean_environment.setenv(ENV_VARIABLE, "fast")
    code, _, err = run_cli(clean_environment, capsys, "models")
    assert_one_error_line(code, err, "CXRLENS_MALLOC", "'keep'", "'system'")


# A fresh process (this one's allocator has been set by earlier tests): a 64 MiB block is above glibc's
# default mmap threshold (at most 32 MiB), so glibc maps it and unmaps it when freed; after the call it comes
# from the heap and stays there when freed. mallinfo2 counts both kinds of memory exactly, in bytes.
PROBE = textwrap.dedent("""
    import ctypes
    from cxrlens.runtime import keep_freed_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc.mallinfo2.restype = Info
    SIZE = 64 << 20

    def allocate_and_free():
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        mapped, heap = libc.mallinfo2().hblkhd, libc.mallinfo2().arena
        libc.free(block)
        return mapped, heap, libc.mallinfo2().arena

    print(*allocate_and_free())
    print(bool(keep_freed_memory()))
    print(*allocate_and_free())
""")


@pytest.mark.skipif(not MALLINFO2, reason="glibc >= 2.33 (mallinfo2) only")
def test_freed_memory_stays_in_the_heap(clean_environment):
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, applied, kept = result.stdout.splitlines()
    size = 64 << 20
    mapped, _, _ = map(int, default.split())
    assert mapped >= size  # the default: mapped on its own
    assert applied == "True"
    mapped, heap_while_used, heap_after_free = map(int, kept.split())
    assert mapped < size and heap_while_used >= size  # now from the heap ...
    assert heap_after_free >= size  # ... and still there after free (not trimmed)
