"""The one LoRA policy: training, the planner and the exporter wrap exactly the same modules."""

from __future__ import annotations

import pytest

from vlm.config.schema import LoraConfig
from vlm.model.decoder import build_on_meta
from vlm.model.lora import attach_lora, lora_targets

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dense_targets_every_named_linear(typed):
    model = build_on_meta(typed("train", ["model=qwen3_8b"]).model.arch)
    t = lora_targets(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL))
    assert len(t.modules) == 36 * 7
    assert {m.rsplit(".", 1)[1] for m in t.modules} == set(ALL)


def test_moe_targets_are_linear_modules_only(typed):
    """gate/up/down name the routed experts' 3D tensors in Qwen3-MoE: peft name matching would wrap them
    as parameters (and refuse dropout); the policy returns Linear modules only."""
    model = build_on_meta(typed("train", ["model=qwen3_30b_a3b"]).model.arch)
    t = lora_targets(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL))
    assert len(t.modules) == 48 * 4 and not any(".experts" in m for m in t.modules)
    peft_model = attach_lora(
        model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL)
    )  # dropout allowed
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".self_attn." in n for n in trainable)


def test_unknown_target_is_refused(typed):
    model = build_on_meta(typed("train").model.arch)
    with pytest.raises(ValueError, match=r"train.lora.target_modules=\['qkv'\]: no Linear module"):
        lora_targets(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["qkv"]))
