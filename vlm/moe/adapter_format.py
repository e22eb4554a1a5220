"""ExpertLoRA factors in the saved layouts other tools read: stock peft's 3D `target_parameters`, and the
per-expert 2D layout of vLLM's (and transformers 4.x's) Qwen3-MoE.

Ours, per layer and expert tensor (`gate_up_proj` (E, 2I, H) or `down_proj` (E, H, I)):
    A (E, r, in), B (E, out, r), delta W[e] = alpha/r * B[e] @ A[e].

peft 0.21 (`peft.tuners.lora.layer.ParamWrapper` on a 3D `(E, out, in)` parameter, which it treats as
"(experts, out, in)" and swaps in/out for): `lora_A` is `Linear(in, r*E)` and `lora_B` `Linear(r*E, out)`;
`get_delta_weight` reads A as `weight_A.reshape(E, r, in)` (row e*r + j) and B as
`weight_B.reshape(out, r, E)` (column j*E + e), delta = einsum("o r e, e r i -> e o i") * alpha/r.
One parameter per wrapper; several on one module nest in the module's parameter order, so with both
targeted `gate_up_proj` is the inner wrapper and its factors are saved under `experts.base_layer.lora_*`,
`down_proj`'s under `experts.lora_*` (vLLM reads the same file the same way: `_stack_moe_lora_weights`).

vLLM's default for Qwen3-MoE (`is_3d_moe_weight` False) is per-expert modules:
`experts.{e}.gate_proj` / `up_proj` (A: ours, B: the first / second half of ours) and `experts.{e}.down_proj`.
"""

from __future__ import annotations

import torch

from vlm.moe.lora import PARTS, ExpertLoRA

PEFT_ROOT = "base_model.model."  # what peft prefixes to every saved adapter key


def peft_prefixes(module: str, parts: tuple[str, ...]) -> dict[str, str]:
    """part -> the key prefix of its factors in a peft adapter file (the inner wrappers gain `base_layer.`)."""
    ordered = [p for p in PARTS if p in parts]
    return {
        p: f"{PEFT_ROOT}{module}." + "base_layer." * (len(ordered) - 1 - i) for i, p in enumerate(ordered)
    }


def is_peft_expert_key(key: str, experts: list[str] | tuple[str, ...]) -> bool:
    return any(key.startswith(f"{PEFT_ROOT}{m}.") for m in experts)


def factors_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) -> peft's (lora_A.weight (E*r, in), lora_B.weight (out, r*E))."""
    e, r, fan_in = a.shape
    return a.reshape(e * r, fan_in).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()


def peft_to_factors(
    wa: torch.Tensor, wb: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `factors_to_peft`."""
    e = num_experts
    return wa.reshape(e, -1, wa.shape[-1]), wb.reshape(wb.shape[0], -1, e).permute(2, 0, 1)


def to_peft(module: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Saved peft tensors of one experts module from {part: (A, B)}."""
    out = {}
    for part, prefix in peft_prefixes(module, tuple(factors)).items():
        out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = factors_to_peft(*factors[part])
    return out


@torch.no_grad()
def from_peft(lora: ExpertLoRA, module: str, weights: dict[str, torch.Tensor]) -> None:
    """Fill `lora` (already shaped for `module`) from a peft adapter file's tensors."""
    for part, prefix in peft_prefixes(module, lora.parts).items():
        a, b = lora.factors(part)
        try:
            wa, wb = weights[prefix + "lora_A.weight"], weights[prefix + "lora_B.weight"]
        except KeyError as err:
            raise KeyError(f"adapter has no {err} for {module}.{part}") from None
        fa, fb = peft_to_factors(wa, wb, a.shape[0])
        if fa.shape != a.shape or fb.shape != b.shape:
            raise ValueError(
                f"{module}.{part}: adapter factors {tuple(fa.shape)}, {tuple(fb.shape)} do not fit "
                f"{tuple(a.shape)}, {tuple(b.shape)}"
            )
        a.copy_(fa)
        b.copy_(fb)


def to_vllm(module: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-expert 2D tensors (`{module}.{e}.{gate,up,down}_proj.lora_{A,B}.weight`) from {part: (A, B)}."""
    out = {}
    for part, (a, b) in factors.items():
        for e in range(a.shape[0]):
            key = f"{PEFT_ROOT}{module}.{e}."
            if part == "down_proj":
                out[key + "down_proj.lora_A.weight"] = a[e].contiguous()  # (r, I)
                out[key + "down_proj.lora_B.weight"] = b[e].contiguous()  # (H, r)
                continue
            gate_b, up_b = b[e].chunk(2, dim=0)  # (I, r) each: gate rows first, as in gate_up_proj
            for proj, half in (("gate_proj", gate_b), ("up_proj", up_b)):
                out[key + f"{proj}.lora_A.weight"] = a[e].clone()  # (r, H): shared by gate and up
                out[key + f"{proj}.lora_B.weight"] = half.contiguous()
    return out
