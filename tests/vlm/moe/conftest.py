"""MoE test setup: Triton runs in its interpreter on CPU, so the kernels are tested without a GPU.

`TRITON_INTERPRET` is read when a kernel is decorated, and `vlm.moe` imports its kernels lazily, so
setting it here (before any test module of this folder imports them) is enough.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
