"""Qwen3-30B-A3B's real shapes (one of its 48 layers, random weights) on CPU: loading straight into NF4 (peak
RSS within the plan; the transient stays one chunk of experts, never a layer's 16-bit experts) and the NF4
checkpoint. `python -m bench.moe --load` measures the same at 2 and 4 layers (the peak grows by one
layer's NF4 experts per layer, the transient stays flat).

The rest of the real-shape chain (a training step with LoRA on every routed expert, the export's stock-peft
and vLLM-layout adapters, the streamed merge) takes minutes and writes gigabytes, so it is a benchmark
(`python -m bench.moe_real`); the tests run that code on the tiny Qwen3-MoE (tests/vlm/export/).
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tests.vlm.moe.conftest import REAL_LAYERS
from vlm.plan import GIB, plan_memory
from vlm.plan import terms as pt

pytestmark = pytest.mark.slow


def test_load_streams_experts_into_nf4_within_the_plan(real_moe_dir, real_nf4, typed):
    _, s = real_nf4
    hf = AutoConfig.from_pretrained(real_moe_dir)
    sh, w = pt.decoder_shapes(hf), pt.decoder_weights(hf, True)
    nf4_model = w.nf4_bytes + w.dense_params * 2 + w.expert_nf4_bytes  # as loaded in bf16
    layer_16bit = 3 * sh.experts * sh.hidden * sh.expert_inter * 2  # one layer's experts in bf16: 1.2 GB
    peak, transient = s["peak"] - s["baseline"], s["peak"] - s["after"]
    print(f"\nload from bf16: {s['seconds']:.1f} s, peak +{peak / GIB:.2f} GiB, transient {transient / GIB:.2f} "
          f"GiB (NF4 model {nf4_model / GIB:.2f} GiB, one layer's bf16 experts {layer_16bit / GIB:.2f} GiB)")  # fmt: skip
    assert peak <= nf4_model + layer_16bit  # never a layer's 16-bit experts on top of the NF4 model
    assert transient <= pt.stream_transient_bytes(sh) + (64 << 20)  # the planner's streaming term bounds it
    plan = plan_memory(
        typed("train", ["gpu=h100", "train=stage2_lora", f"model.name_or_path={real_moe_dir}"])
    )
    assert plan.layers == REAL_LAYERS and plan.load_bytes - 0.75 * GIB >= peak


def test_nf4_checkpoint_loads_without_quantizing(real_nf4):
    """Timed in the process that wrote it (`measure_load`), right after the load that quantized."""
    _, s = real_nf4
    print(
        f"\nload: from bf16 (quantizing) {s['seconds']:.1f} s, from the NF4 checkpoint {s['nf4_reload_seconds']:.2f} s"
    )
    assert s["nf4_reload_seconds"] < s["seconds"] / 10
