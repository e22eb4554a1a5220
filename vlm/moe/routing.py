"""Routing plan: (token, expert) pairs sorted by expert and laid out in rows, optionally block-aligned.

The router gives `top_k_index (T, k)`; the S = T*k pairs are numbered `pair = t*k + j`. A plan puts them
in rows sorted by expert. With `block_m == 1` the rows are exactly the S sorted pairs (the PyTorch path,
grouped products with per-expert offsets). With `block_m > 1` every expert's run is padded to a multiple
of `block_m`, so each block of rows belongs to one expert (the Triton path: a program per block reads
its expert id once and streams that expert's NF4 weights). Padding rows carry `pair == S` and
`token == T`, one past the end, so gathers from a zero-padded source and scatters into a buffer with a
spare slot need no masks.

The padded row count is a static upper bound, `S + min(E, S) * (block_m - 1)`, rounded up to `block_m`:
building a plan never synchronizes with the device; blocks past the last expert get expert id -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    """Rows of (token, expert) pairs grouped by expert.

    row_pair:     (P,) int64   pair index t*k+j of each row; S on padding rows
    row_token:    (P,) int64   token of each row; T on padding rows
    pair_row:     (S,) int64   row holding each pair (inverse of row_pair)
    offsets:      (E,) int32   end row of each expert's (padded) run, for grouped products
    block_expert: (P/block_m,) int32  expert of each block of rows, -1 past the last one
    """

    row_pair: torch.Tensor
    row_token: torch.Tensor
    pair_row: torch.Tensor
    offsets: torch.Tensor
    block_expert: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    block_m: int

    @property
    def num_rows(self) -> int:
        return self.row_pair.numel()

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (P, D): each row's token; zeros on padding rows."""
        if self.block_m > 1:
            x = torch.cat((x, x.new_zeros(1, x.shape[1])))  # (T+1, D) row T is the padding source
        return x[self.row_token]

    def rows_to_pairs(self, rows: torch.Tensor) -> torch.Tensor:
        """(P, D) -> (S, D) in pair order (t*k + j)."""
        return rows[self.pair_row]

    def sum_over_k(self, rows: torch.Tensor) -> torch.Tensor:
        """(P, D) -> (T, D): add the k rows of every token (deterministic, no atomics)."""
        return self.rows_to_pairs(rows).view(self.num_tokens, self.top_k, -1).sum(1)

    def pairs_to_rows(self, pairs: torch.Tensor) -> torch.Tensor:
        """(S,) or (S, D) -> rows (P, ...), zero on padding rows."""
        if self.block_m > 1:
            pairs = torch.cat((pairs, pairs.new_zeros(1, *pairs.shape[1:])))
        return pairs[self.row_pair]


def build_plan(top_k_index: torch.Tensor, num_experts: int, block_m: int = 1) -> RoutingPlan:
    """Sort the pairs of `top_k_index (T, k)` by expert (stable: pairs of one expert stay in token order)."""
    t, k = top_k_index.shape
    s, dev = t * k, top_k_index.device
    flat = top_k_index.reshape(-1)  # (S,)
    order = torch.argsort(flat, stable=True)  # (S,) pair ids sorted by expert
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    if block_m == 1:
        row_pair = order
        pair_row = torch.empty_like(order)
        pair_row[order] = torch.arange(s, device=dev)
        offsets = counts.cumsum(0).to(torch.int32)
        block_expert = flat[order].to(torch.int32)
    else:
        padded = (counts + block_m - 1) // block_m * block_m  # (E,)
        pend = padded.cumsum(0)
        sorted_e = flat[order]  # (S,)
        rank = torch.arange(s, device=dev) - (counts.cumsum(0) - counts)[sorted_e]
        dest = (pend - padded)[sorted_e] + rank  # (S,) row of each sorted pair
        num_rows = -(-(s + min(num_experts, s) * (block_m - 1)) // block_m) * block_m
        row_pair = torch.full((num_rows,), s, dtype=torch.long, device=dev)
        row_pair[dest] = order
        pair_row = torch.empty_like(order)
        pair_row[order] = dest
        offsets = pend.to(torch.int32)
        starts = torch.arange(0, num_rows, block_m, device=dev)
        block_expert = torch.searchsorted(pend, starts, right=True).to(torch.int32)
        block_expert = torch.where(starts < pend[-1], block_expert, -1)
    return RoutingPlan(
        row_pair=row_pair,
        row_token=row_pair // k,
        pair_row=pair_row,
        offsets=offsets,
        block_expert=block_expert,
        num_tokens=t,
        top_k=k,
        num_experts=num_experts,
        block_m=block_m,
    )
