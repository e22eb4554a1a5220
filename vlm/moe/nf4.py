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
    """(E, n) float32 -> absmax (E, n/block) and x scaled into [-1, 1] *in place*, as bitsandbytes' CPU
    ops compute them (multiply by the reciprocal, then clamp). `x` must be a scratch copy."""
    e = x.shape[0]
    xb = x.view(e, -1, block)  # (E, nblk, block)
    amax = xb.abs().amax(-1)  # (E, nblk)
    xb.mul_((1.0 / amax.clamp(min=1e-38)).unsqueeze(-1)).clamp_(-1, 1)
    return amax, x


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
    amax2, scaled2 = _blockwise_absmax(centred.clone(), BLOCK2)
    return _nearest(scaled2, dynamic_code(centred.device)), amax2


# Experts quantized per pass: the float32 scratch of one pass is ~2x this many bytes of 16-bit weights,
# so quantizing a layer never needs more than a bounded transient on top of its NF4 result.
CHUNK_BYTES = 64 << 20


def experts_per_chunk(n: int, k: int) -> int:
    return max(1, CHUNK_BYTES // (2 * n * k))


@torch.no_grad()
def quantize_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First stage for experts `w` (e, N, K): packed NF4 codes (e, NK/2) uint8 and float32 absmax (e, nb).

    Each expert's blocks depend only on that expert, so a tensor can be quantized a few experts at a
    time (see `NF4Builder`) with exactly the codes of one pass over all of it."""
    e, n, k = w.shape
    x = w.reshape(e, n * k).to(torch.float32, copy=True)  # (e, NK) scratch, scaled in place
    amax, scaled = _blockwise_absmax(x, BLOCK)  # (e, nb), (e, NK)
    codes = _nearest(scaled, nf4_code(w.device))  # (e, NK) values 0..15
    del x, scaled
    return (codes[:, 0::2] << 4) | codes[:, 1::2], amax  # (e, NK/2), (e, nb)


def double_quantize(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second stage: absmax (E, nb) float32 -> (uint8 codes (E, nb), absmax2 (E, nb2), offset (E,)).

    Each expert's absmax vector has its mean subtracted (`offset`) and is quantized to 8 bits in blocks
    of 256, zero-padded per expert so blocks never mix experts (padding leaves every block's max as is)."""
    nb = amax.shape[1]
    offset = amax.mean(-1)  # (E,)
    centred = torch.nn.functional.pad(amax - offset[:, None], (0, -nb % BLOCK2))  # (E, nb2*256)
    codes2, amax2 = _quantize_absmax(centred)  # (E, nb2*256), (E, nb2)
    return codes2[:, :nb].contiguous(), amax2.contiguous(), offset.contiguous()


class NF4Builder:
    """Quantizes one `[E, N, K]` tensor a few experts at a time into preallocated storage.

    `add(e0, w)` takes experts e0.. (dense, any float dtype, any device); `finish()` double-quantizes
    the collected absmax once and returns the `NF4Experts`. Peak memory: the result plus one chunk's
    float32 scratch and the float32 absmax, never the whole tensor in 16 bits."""

    def __init__(
        self, shape: tuple[int, int, int], device: torch.device | str, q: torch.Tensor | None = None
    ):
        """q: where the packed codes go (e.g. the module's own buffer, so nothing is copied at the end)."""
        _check_shape(shape)
        e, n, k = shape
        self.shape, self.done = shape, 0
        self.q = q if q is not None else torch.empty(e, n * k // 2, dtype=torch.uint8, device=device)
        if self.q.shape != (e, n * k // 2) or self.q.dtype != torch.uint8:
            raise ValueError(f"codes buffer {tuple(self.q.shape)} {self.q.dtype} does not fit {shape}")
        self.amax = torch.empty(e, n * k // BLOCK, dtype=torch.float32, device=self.q.device)

    def add(self, e0: int, w: torch.Tensor) -> None:
        if tuple(w.shape[1:]) != self.shape[1:] or e0 + w.shape[0] > self.shape[0]:
            raise ValueError(
                f"experts {e0}+{w.shape[0]} of shape {tuple(w.shape[1:])} do not fit {self.shape}"
            )
        q, amax = quantize_codes(w.to(self.q.device))
        self.q[e0 : e0 + w.shape[0]] = q
        self.amax[e0 : e0 + w.shape[0]] = amax
        self.done += w.shape[0]

    def finish(self) -> NF4Experts:
        if self.done != self.shape[0]:
            raise ValueError(f"{self.done} of {self.shape[0]} experts were quantized")
        absmax, absmax2, offset = double_quantize(self.amax)
        return NF4Experts(self.q, absmax, absmax2, offset, self.shape)


@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> NF4Experts:
    """Quantize `w` `[E, N, K]` (fp32/bf16/fp16) per expert; equal to bitsandbytes' quantize_4bit per slice."""
    _check_shape(tuple(w.shape))
    e, n, k = w.shape
    build = NF4Builder((e, n, k), w.device)
    step = experts_per_chunk(n, k)
    for e0 in range(0, e, step):
        build.add(e0, w[e0 : e0 + step])
    return build.finish()


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
