"""`FusedMoeExperts`: a drop-in for transformers' `Qwen3MoeExperts` holding NF4 experts.

Same call as the original, `experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`,
same result up to float error on the de-quantized weights. State dict: the NF4 tensors are buffers
named `gate_up_proj_q`, `gate_up_proj_absmax`, `gate_up_proj_absmax2`, `gate_up_proj_offset` (same for
`down_proj`); a state dict with the original dense names (`...experts.gate_up_proj`, `...down_proj`)
also loads: it is quantized on the way in, so checkpoints of the unswapped model stay loadable.

The float32 statistics are stored as int32 bit patterns so `model.to(torch.bfloat16)` (which casts every
floating buffer) cannot round them and break the bit-exact de-quantization.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vlm.moe.experts import Backend, TorchBackend, moe_experts
from vlm.moe.lora import PARTS, ExpertLoRA
from vlm.moe.nf4 import BLOCK, BLOCK2, NF4Builder, NF4Experts, dequantize_nf4, experts_per_chunk

BackendName = Literal["auto", "triton", "torch"]
_NAMES = ("gate_up_proj", "down_proj")


def resolve_backend(name: BackendName, device: torch.device) -> Backend:
    """`auto`: the Triton kernels on CUDA when Triton imports, the PyTorch path everywhere else."""
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"moe backend must be auto, triton or torch; got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    try:
        from vlm.moe.triton_backend import TritonBackend
    except ImportError:
        if name == "triton":
            raise
        return TorchBackend()
    return TritonBackend()


class FusedMoeExperts(nn.Module):
    """NF4 experts of one MoE layer with fused (Triton) or reference (PyTorch) compute."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        *,
        backend: BackendName = "auto",
        lora_r: int = 0,
        lora_alpha: float | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.backend_name: BackendName = backend
        shapes = {
            "gate_up_proj": (2 * intermediate_dim, hidden_dim),
            "down_proj": (hidden_dim, intermediate_dim),
        }
        for name, (n, k) in shapes.items():
            if (n * k) % BLOCK:
                raise ValueError(f"{name}: {n}x{k} per expert is not a multiple of the NF4 block {BLOCK}")
            nb = n * k // BLOCK
            e = num_experts
            self.register_buffer(f"{name}_q", torch.zeros(e, n * k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_absmax", torch.zeros(e, nb, dtype=torch.uint8, device=device))
            self.register_buffer(
                f"{name}_absmax2", torch.zeros(e, -(-nb // BLOCK2), dtype=torch.int32, device=device)
            )
            self.register_buffer(f"{name}_offset", torch.zeros(e, dtype=torch.int32, device=device))
        self.lora: ExpertLoRA | None = None
        if lora_r:
            self.add_lora(lora_r, lora_alpha)

    def add_lora(self, r: int, alpha: float | None = None, parts: tuple[str, ...] = PARTS) -> ExpertLoRA:
        """Fresh per-expert LoRA factors (float32, trainable) on the buffers' device; replaces any."""
        with torch.device(self.gate_up_proj_q.device):  # meta builds (the planner) allocate nothing
            self.lora = ExpertLoRA(self.num_experts, self.hidden_dim, self.intermediate_dim, r, alpha, parts)
        return self.lora

    # -- storage -------------------------------------------------------------------------------
    def _shape(self, name: str) -> tuple[int, int, int]:
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        return (e, 2 * i, h) if name == "gate_up_proj" else (e, h, i)

    def nf4(self, name: str) -> NF4Experts:
        """The NF4 view of `gate_up_proj` or `down_proj` (float32 statistics re-read from their bits)."""
        g = lambda s: getattr(self, f"{name}_{s}")  # noqa: E731
        return NF4Experts(
            g("q"),
            g("absmax"),
            g("absmax2").view(torch.float32),
            g("offset").view(torch.float32),
            self._shape(name),
        )

    @torch.no_grad()
    def set_dense(self, name: str, weight: torch.Tensor) -> None:
        """Quantize a dense `[E, N, K]` weight (any float dtype, any device) into this module's buffers,
        a few experts at a time (bounded scratch memory)."""
        if tuple(weight.shape) != self._shape(name):
            raise ValueError(f"{name}: expected shape {self._shape(name)}, got {tuple(weight.shape)}")
        build = self.quantizer(name)
        step = experts_per_chunk(*weight.shape[1:])
        for e0 in range(0, self.num_experts, step):
            build.add(e0, weight[e0 : e0 + step])
        self.set_nf4(name, build.finish())

    def quantizer(self, name: str) -> NF4Builder:
        """An `NF4Builder` for `name` on this module's device: feed it experts, then `set_nf4(name, ...)`."""
        return NF4Builder(self._shape(name), self.gate_up_proj_q.device, q=getattr(self, f"{name}_q"))

    @torch.no_grad()
    def set_nf4(self, name: str, t: NF4Experts) -> None:
        """Store an already quantized `name` (float32 statistics kept as their int32 bit patterns)."""
        for s, v in (("q", t.q), ("absmax", t.absmax), ("absmax2", t.absmax2), ("offset", t.offset)):
            buf = getattr(self, f"{name}_{s}")
            if v.data_ptr() != buf.data_ptr():  # a builder of ours wrote the codes in place already
                buf.copy_(v.view(torch.int32) if v.dtype == torch.float32 else v)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) exactly as bitsandbytes would de-quantize them."""
        return dequantize_nf4(self.nf4("gate_up_proj"), dtype), dequantize_nf4(self.nf4("down_proj"), dtype)

    @classmethod
    def from_experts(cls, experts: nn.Module, **kwargs) -> FusedMoeExperts:
        """Build from a transformers experts module (3D `gate_up_proj` / `down_proj`), quantizing them."""
        e, two_i, h = experts.gate_up_proj.shape
        dev = experts.gate_up_proj.device
        fused = cls(e, h, two_i // 2, device=None if dev.type == "meta" else dev, **kwargs)
        if dev.type != "meta":
            fused.set_dense("gate_up_proj", experts.gate_up_proj)
            fused.set_dense("down_proj", experts.down_proj)
        return fused

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Dense checkpoints of the original module: quantize on the way in.
        dense = False
        for name in _NAMES:
            w = state_dict.pop(prefix + name, None)
            if w is not None:
                dense = True
                self.set_dense(name, w)
                for s in ("q", "absmax", "absmax2", "offset"):
                    state_dict[f"{prefix}{name}_{s}"] = getattr(self, f"{name}_{s}")
        if dense and self.lora is not None:  # a base checkpoint has no adapter: keep the current one
            for k, v in self.lora.state_dict(prefix=prefix + "lora.").items():
                state_dict.setdefault(k, v)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- compute -------------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        backend = resolve_backend(self.backend_name, hidden_states.device)
        dtype = hidden_states.dtype
        dev = hidden_states.device.type
        if torch.is_autocast_enabled(dev):
            # Our autograd Functions are opaque to autocast; compute in its dtype as transformers' experts
            # (F.linear under autocast) would, and hand back the caller's dtype as their index_add_ does.
            low = torch.get_autocast_dtype(dev)
            hidden_states, top_k_weights = hidden_states.to(low), top_k_weights.to(low)
        out = moe_experts(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.nf4("gate_up_proj"),
            self.nf4("down_proj"),
            backend,
            self.lora,
        )
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"nf4, backend={self.backend_name}"
        )
