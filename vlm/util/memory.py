"""Handing freed memory back to the operating system between the stages of a long streaming job."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache

PAGE = os.sysconf("SC_PAGE_SIZE")


def anon_rss() -> int:
    """Anonymous resident bytes of this process: what it owns. VmRSS also counts the file pages of the
    mmapped safetensors shards while they are read, which the kernel drops at will and a GPU never holds.
    statm's resident minus shared is status's RssAnon, read without parsing its 50 lines."""
    with open("/proc/self/statm") as f:
        resident, shared = f.read().split()[1:3]
    return (int(resident) - int(shared)) * PAGE


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed() -> None:
    """Collect garbage and return the heap's free pages to the kernel. glibc keeps freed chunks under its
    mmap threshold (which rises to 32 MiB after large frees) in the heap; a job that frees one stage's
    many mid-sized tensors and allocates the next stage's may find them too fragmented to reuse and grow
    instead (the streamed merge of 2 real-shape 30B-A3B layers peaked at 4.2 GiB in one run and 5.4 in
    another, one layer's output being 2.3 GiB)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
