"""release_freed: freed mid-sized tensors that glibc keeps in its heap go back to the kernel."""

from __future__ import annotations

import torch

from vlm.util.memory import _malloc_trim, anon_rss, release_freed

MIB = 1 << 20


def test_freed_heap_returns_to_the_kernel():
    assert _malloc_trim() is not None  # glibc here
    raise_threshold = torch.ones(16 * MIB // 4)  # freeing a 16 MiB mmapped chunk raises glibc's mmap
    del raise_threshold  # threshold to 16 MiB: the 6 MiB tensors below come from the heap
    parts = [torch.ones(6 * MIB // 4) for _ in range(100)]  # 600 MiB
    pin = torch.ones(MIB // 4)  # above them in the heap: their free pages are not at its top
    held = anon_rss()
    del parts
    kept = anon_rss()
    assert held - kept < 100 * MIB, (held, kept)  # freed, yet resident: what the merge ran into
    release_freed()
    assert kept - anon_rss() > 500 * MIB, (held, kept, anon_rss())
    del pin
