"""The pure-PyTorch experts path: grouped products over expert-sorted rows, NF4 de-quantized per tile.

It walks the experts in tiles (`tile_bytes` of de-quantized weights, 8 MiB by default, and at least
`MIN_EXPERTS` experts, so a layer takes at most E/8 iterations at any expert size). Per tile:
de-quantize that tile's NF4 weights, gather its rows, one grouped product (`torch._grouped_mm`, one
GEMM per expert inside torch), and write or accumulate the result. Why tiles rather than the whole
layer at once:
- memory: the transient 16-bit copy is one tile, not the layer's whole expert stack (1.2 GB per layer
  at Qwen3-30B-A3B's shape; "de-quantize the whole stack every forward" is what we set out to avoid);
- speed: the tile is consumed from cache right after it is written (at the benchmark shape, single
  thread: de-quantize + gate_up product 31-35 ms in tiles of 8-32 experts vs 51 ms for the whole
  layer at once), and tiles whose experts got no row are skipped without de-quantizing them (decoding
  a few tokens touches few experts).
The loop is over tiles, never over experts or tokens; it needs the run ends on the host, one sync per
product (free on CPU, where this path runs).

Outputs are combined into token order with `index_add_` into a float32 buffer (serial over rows on
CPU, so deterministic) and rounded once; elsewhere (this path on CUDA is only a reference) through a
pair-ordered buffer summed over k, which needs no atomics.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vlm.moe.grouped import grouped_mm
from vlm.moe.nf4 import NF4Experts, dequantize_fast
from vlm.moe.routing import RoutingPlan

TILE_BYTES = 8 << 20
MIN_EXPERTS = 8


class _Combine:
    """Accumulates per-tile rows (r, D) into token order (T, D)."""

    def __init__(self, plan: RoutingPlan, dim: int, like: torch.Tensor, index_add: bool):
        self.plan, self.dtype, self.index_add = plan, like.dtype, index_add
        if self.index_add:
            self.buf = torch.zeros(plan.num_tokens, dim, dtype=torch.float32, device=like.device)
        else:
            self.buf = like.new_zeros(plan.num_pairs, dim)  # (S, D) each pair written once

    def add(self, r0: int, r1: int, rows: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Rows r0:r1 (times `scale (r, 1)`, the product rounded in the rows' dtype as eager does)."""
        if self.index_add:
            src = rows.new_empty(rows.shape, dtype=torch.float32)
            # Computed in the rows' dtype, then widened: the same values as (rows * scale).float().
            if scale is not None:
                torch.mul(rows, scale, out=src)
            else:
                src.copy_(rows)
            self.buf.index_add_(0, self.plan.row_token[r0:r1], src)
        else:
            self.buf.index_copy_(0, self.plan.row_pair[r0:r1], rows * scale if scale is not None else rows)

    def result(self) -> torch.Tensor:
        if self.index_add:
            return self.buf.to(self.dtype)
        return self.buf.view(self.plan.num_tokens, self.plan.top_k, -1).sum(1)


class TorchBackend:
    """Reference path (CPU default): tiled de-quantization, grouped products over the sorted rows."""

    block_m = 1  # no padding: rows are exactly the sorted pairs

    def __init__(
        self, tile_bytes: int = TILE_BYTES, min_experts: int = MIN_EXPERTS, index_add: bool | None = None
    ):
        self.tile_bytes, self.min_experts = tile_bytes, min_experts
        self.index_add = index_add  # None: index_add_ on CPU, the pair buffer elsewhere

    def _combine(self, plan: RoutingPlan, dim: int, like: torch.Tensor) -> _Combine:
        use = self.index_add if self.index_add is not None else like.device.type == "cpu"
        return _Combine(plan, dim, like, use)

    def experts_per_tile(self, w: NF4Experts, dtype: torch.dtype) -> int:
        return max(self.min_experts, self.tile_bytes // (w.shape[1] * w.shape[2] * dtype.itemsize), 1)

    def _tiles(
        self, plan: RoutingPlan, w: NF4Experts, dtype: torch.dtype
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(first row, end row, de-quantized tile (e, N, K), run ends relative to the first row (e,))."""
        e, per = w.shape[0], self.experts_per_tile(w, dtype)
        ends = plan.offsets.tolist()  # (E,) host copy: no sync on CPU
        for e0 in range(0, e, per):
            e1 = min(e, e0 + per)
            r0, r1 = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
            if r1 > r0:  # experts without rows are never de-quantized
                yield r0, r1, dequantize_fast(w.select(e0, e1), dtype), plan.offsets[e0:e1] - r0

    def gate_up(self, x, plan, w, extra, keep_pre):
        p, i = plan.num_rows, w.shape[1] // 2
        h = x.new_empty(p, i)  # every row lies in some tile: all written
        pre = x.new_empty(p, 2 * i) if keep_pre else None
        for r0, r1, wt, offs in self._tiles(plan, w, x.dtype):
            xs = x.index_select(0, plan.row_token[r0:r1])  # (r, H)
            pt = grouped_mm(xs, wt.transpose(1, 2), offs)  # (r, 2I)
            if extra is not None:
                pt += extra[r0:r1]
            if pre is not None:
                pre[r0:r1] = pt
            torch.mul(F.silu(pt[:, :i]), pt[:, i:], out=h[r0:r1])
        return h, pre  # (P, I), (P, 2I) | None

    def down(self, h, plan, w, row_weight, extra):
        out = self._combine(plan, w.shape[1], h)
        for r0, r1, wt, offs in self._tiles(plan, w, h.dtype):
            y = grouped_mm(h[r0:r1], wt.transpose(1, 2), offs)  # (r, H)
            if extra is not None:
                y += extra[r0:r1]
            out.add(r0, r1, y, row_weight[r0:r1, None])
        return out.result()  # (T, H)

    def grad_x(self, dpre, plan, w):
        out = self._combine(plan, w.shape[2], dpre)
        for r0, r1, wt, offs in self._tiles(plan, w, dpre.dtype):
            out.add(r0, r1, grouped_mm(dpre[r0:r1], wt, offs))  # (r, H) = dpre_e @ Wgu[e]
        return out.result()  # (T, H)

    def grad_h(self, dy, plan, w):
        g = dy.new_empty(plan.num_rows, w.shape[2])
        for r0, r1, wt, offs in self._tiles(plan, w, dy.dtype):
            g[r0:r1] = grouped_mm(dy.index_select(0, plan.row_token[r0:r1]), wt, offs)  # dy_t @ Wd[e]
        return g  # (P, I)
