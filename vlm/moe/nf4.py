"""NF4 storage for stacked expert weights, in bitsandbytes' exact layout.

An experts tensor `[E, N, K]` is quantized *per expert* the way `bitsandbytes.functional.quantize_4bit(
w[e], blocksize=64, quant_type="nf4", compress_statistics=True)` would do it, but for all experts in one
vectorized pass:

- each run of 64 consecutive elements of an expert (row-major `[N, K]`) gets a float32 absmax and 16
  NF4 codes, packed two per byte, the even element in the high nibble;
- the absmax vector of an expert is double-quantized: its mean is subtracted (`offset`, one float per
  expert) and the rest is quantized to 8 bits with bitsandbytes' signed dynamic map in blocks of 256
  (`absmax2`, one float per 256 absmax values).

`dequantize_nf4` reproduces `bitsandbytes.functional.dequantize_4bit` bit for bit (both compute
`code[q] * absmax` in float32 and round once to the target dtype); the Triton kernels do the same inside
their K-loop, and `expert_bytes` is what the memory planner charges per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

BLOCK = 64  # NF4 block: elements sharing one absmax (bitsandbytes' QLoRA default)
BLOCK2 = 256  # double-quantization block: absmax values sharing one float32 scale

# The tables are bitsandbytes' own (the layout *is* bitsandbytes'); copied so the hot path and the
# kernels never import bitsandbytes and so a CPU-only install without its native library still works.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), rebuilt with the same arithmetic."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels as float32 on `device`."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry dynamic map used for the double-quantized absmax, float32 on `device`."""
    return _dynamic_map_cpu().to(device, copy=True)  # copy: a native kernel may write into it


@dataclass
class NF4Experts:
    """One stacked experts weight `[E, N, K]` in NF4 with double-quantized absmax.

    q:       (E, N*K/2) uint8  two codes per byte, high nibble first
    absmax:  (E, nb)    uint8  nb = N*K/64, index into the dynamic map
    absmax2: (E, nb2)   fp32   nb2 = ceil(nb/256), scale of each run of 256 absmax codes
    offset:  (E,)       fp32   mean absmax of the expert, added back after de-quantization
    """

    q: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int, int]

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def select(self, start: int, end: int) -> NF4Experts:
        """Experts `start:end` as views (every statistic is per expert, so slicing dim 0 is exact)."""
        sl = slice(start, end)
        n = len(range(*sl.indices(self.shape[0])))
        return NF4Experts(
            self.q[sl], self.absmax[sl], self.absmax2[sl], self.offset[sl], (n, *self.shape[1:])
        )


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 3 or (shape[1] * shape[2]) % BLOCK:
        raise ValueError(f"NF4 experts need a [E, N, K] tensor with N*K divisible by {BLOCK}; got {shape}")


def _blockwise_absmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, n) -> absmax (E, n/block) and x scaled into [-1, 1], exactly as bitsandbytes' CPU ops do."""
    e = x.shape[0]
    xb = x.reshape(e, -1, block)  # (E, nblk, block)
    amax = xb.abs().amax(-1)  # (E, nblk)
    scaled = torch.clamp(xb * (1.0 / amax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    return amax, scaled.reshape(e, -1)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties go up, like bitsandbytes' bucketize on midpoints)."""
    mid = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, mid, out_int32=True).to(torch.uint8)


def _quantize_absmax(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic quantization in blocks of 256: (E, nb2*256) -> codes (E, nb2*256), scales (E, nb2).

    bitsandbytes' native search (CPU: a table-driven binary search; CUDA: its own kernel) does not
    always return the nearest code for values close to a midpoint, so to stay bit-identical we call its
    registered op whenever it is there and fall back to the exact nearest code otherwise.
    """
    op = _bnb_op("quantize_blockwise")
    if op is not None:
        codes, amax2 = op(centred.contiguous(), dynamic_code(centred.device), BLOCK2)
        return codes.reshape(centred.shape), amax2.reshape(centred.shape[0], -1)
    amax2, scaled2 = _blockwise_absmax(centred, BLOCK2)
    return _nearest(scaled2, dynamic_code(centred.device)), amax2


@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> NF4Experts:
    """Quantize `w` `[E, N, K]` (fp32/bf16/fp16) per expert; equal to bitsandbytes' quantize_4bit per slice."""
    _check_shape(tuple(w.shape))
    e, n, k = w.shape
    x = w.reshape(e, n * k).float()  # (E, NK)
    amax, scaled = _blockwise_absmax(x, BLOCK)  # (E, nb), (E, NK)
    codes = _nearest(scaled, nf4_code(w.device))  # (E, NK) values 0..15
    q = (codes[:, 0::2] << 4) | codes[:, 1::2]  # (E, NK/2)

    # Double quantization of each expert's absmax, with zero padding up to a multiple of 256 so the
    # blocks of one expert never mix with the next (padding leaves every block's max unchanged).
    nb = amax.shape[1]
    offset = amax.mean(-1)  # (E,)
    centred = amax - offset[:, None]
    pad = -nb % BLOCK2
    centred = torch.nn.functional.pad(centred, (0, pad))  # (E, nb2*256)
    codes2, amax2 = _quantize_absmax(centred)  # (E, nb2*256), (E, nb2)
    absmax_q = codes2[:, :nb]  # (E, nb)
    return NF4Experts(
        q.contiguous(), absmax_q.contiguous(), amax2.contiguous(), offset.contiguous(), (e, n, k)
    )


def dequantize_absmax(t: NF4Experts) -> torch.Tensor:
    """Float32 absmax (E, nb): dynamic_code[absmax] * absmax2 + offset, in that order (as bitsandbytes)."""
    e, nb = t.absmax.shape
    amax = dynamic_code(t.q.device).index_select(0, t.absmax.reshape(-1).int()).view(e, nb)
    pad = -nb % BLOCK2  # the last run of 256 may be short; zero-pad it so every run is a row
    if pad:
        amax = torch.nn.functional.pad(amax, (0, pad))
    amax = (amax.view(e, -1, BLOCK2) * t.absmax2[:, :, None]).view(e, -1)[:, :nb]  # (E, nb)
    return amax + t.offset[:, None]


def dequantize_nf4(
    t: NF4Experts, dtype: torch.dtype = torch.float32, experts: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-PyTorch de-quantization to `[E, N, K]` (or only `experts`), bit-identical to bitsandbytes."""
    e, n, k = t.shape
    q, absmax = t.q, dequantize_absmax(t)
    if experts is not None:
        q, absmax, e = q[experts], absmax[experts], int(experts.numel())
    code = nf4_code(q.device)
    nib = torch.stack((q >> 4, q & 0xF), dim=-1).reshape(e, -1, BLOCK).long()  # (E, nb, 64)
    w = code[nib] * absmax.unsqueeze(-1)  # float32, one rounding below
    return w.to(dtype).reshape(e, n, k)


def dequantize_fast(t: NF4Experts, dtype: torch.dtype) -> torch.Tensor:
    """Same values as `dequantize_nf4`, through bitsandbytes' native kernel when it is available.

    The native CPU kernel is several times faster than the gather above; its result is asserted equal
    to `dequantize_nf4` in the tests. That kernel assumes blocks never straddle rows, so it is only used
    when K is a multiple of 64 (for other widths it disagrees with bitsandbytes' own quantizer and CUDA
    kernel, which use flat blocks like `dequantize_nf4`).
    """
    op = _bnb_op("dequantize_4bit")
    if op is None or t.shape[2] % BLOCK:
        return dequantize_nf4(t, dtype)
    absmax = dequantize_absmax(t).reshape(-1)  # (E*nb,) contiguous runs of 64 never cross experts
    return op(t.q.reshape(-1, 1), absmax, BLOCK, "nf4", list(t.shape), dtype)


@cache
def _bnb_op(name: str):  # -> OpOverload | None
    """A registered bitsandbytes op, or None when bitsandbytes (or its native library) is missing."""
    try:
        import bitsandbytes  # noqa: F401  (importing registers torch.ops.bitsandbytes.*)

        return getattr(torch.ops.bitsandbytes, name).default
    except Exception:  # pragma: no cover - bitsandbytes without a native library
        return None


def expert_bytes(num_experts: int, hidden: int, intermediate: int) -> int:
    """Bytes of one layer's NF4 experts (gate_up `[E, 2I, H]` + down `[E, H, I]`), statistics included.

    Per expert and matrix: packed codes (n/2), uint8 absmax (n/64), float32 absmax2 (ceil(n/64/256)),
    float32 offset; plus the 16- and 256-entry float32 code tables the layer keeps as buffers.
    """
    total = 0
    for n in (2 * intermediate * hidden, hidden * intermediate):
        nb = math.ceil(n / BLOCK)
        per_expert = n // 2 + nb + 4 * math.ceil(nb / BLOCK2) + 4
        total += num_experts * per_expert
    return total + 4 * (16 + 256)
