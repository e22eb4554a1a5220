"""Random-weight models of the real architectures, for the real-shape tests and benchmarks (no download).

`random_causal_lm(config, dtype)` builds the transformers model on the meta device and gives every weight
one seeded value: norms 1 (Qwen3 has no biases), every other tensor normal(0, initializer_range) drawn
once per block of 2^24 - 3 values and repeated. A model built on the CPU draws every weight twice (its
modules' own reset, then the model's init), and drawing is nearly all of the time: 21.6 s against 11.9 s
for 8B's shapes at 2 layers built on meta, and the generator still took 29 s of the a100 tier's run for
14B's 1.9 G values before the block. The block is a prime number of values, so no weight row or expert
equals another, only a shifted copy of its values; nothing checked at these shapes depends on more.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

BLOCK = 16_777_213  # 2^24 - 3, a prime


def fill_normal(p: torch.Tensor, std: float, gen: torch.Generator, block: int = BLOCK) -> None:
    """normal(0, std) values drawn once per `block` and repeated over the tensor."""
    flat = p.view(-1)
    src = torch.empty(min(block, flat.numel()), dtype=p.dtype).normal_(0.0, std, generator=gen)
    for i in range(0, flat.numel(), src.numel()):
        n = min(src.numel(), flat.numel() - i)
        flat[i : i + n].copy_(src[:n])


def random_causal_lm(config: PretrainedConfig, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """The architecture `config` describes with seeded random weights in `dtype`, on the CPU."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")  # the rotary buffers are left unset: not saved, recomputed at load
    model.tie_weights()  # to_empty gives every module its own storage: tie a tied embedding again
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if "norm" not in name:
                    raise ValueError(f"{name}: a 1-D weight that is not a norm (Qwen3 has no biases)")
                p.fill_(1.0)
            else:
                fill_normal(p, config.initializer_range, gen)
    return model
