"""The one LoRA policy: training, the planner and the exporter wrap exactly the same modules; on
Qwen3-MoE with the fused kernel that includes every routed expert (exact parameter counts on meta builds)."""

from __future__ import annotations

import pytest

from vlm.config.schema import LoraConfig
from vlm.model.decoder import build_on_meta
from vlm.model.lora import attach_lora, lora_targets
from vlm.util.errors import UsageError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dense_targets_every_named_linear(typed):
    model = build_on_meta(typed("train", ["model=qwen3_8b"]).model.arch)
    t = lora_targets(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL))
    assert len(t.modules) == 36 * 7
    assert {m.rsplit(".", 1)[1] for m in t.modules} == set(ALL)


def moe_lora_params(arch, r: int, experts: bool) -> int:
    """Trainable parameters the policy must create on Qwen3-MoE: r·(in + out) per attention projection,
    and per layer E·r·(H + 2I) on gate_up plus E·r·(I + H) on down when the experts are adapted."""
    h, q, kv = (
        arch.hidden_size,
        arch.num_attention_heads * arch.head_dim,
        arch.num_key_value_heads * arch.head_dim,
    )
    attention = r * ((h + q) + 2 * (h + kv) + (q + h))
    e, i = arch.num_experts, arch.moe_intermediate_size
    per_layer = attention + (e * r * (h + 2 * i) + e * r * (i + h) if experts else 0)
    return arch.num_hidden_layers * per_layer


def test_moe_fused_adapts_attention_and_every_routed_expert(typed):
    """gate/up/down name the routed experts' 3D tensors in Qwen3-MoE: peft never sees them (it would wrap
    them as parameters and refuse dropout); with the fused kernel each layer's experts get an ExpertLoRA."""
    arch = typed("train", ["model=qwen3_30b_a3b"]).model.arch
    lora = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL)
    model = build_on_meta(arch, "fused")
    t = lora_targets(model, lora)
    assert len(t.modules) == 48 * 4 and not any(".experts" in m for m in t.modules)
    assert len(t.experts) == 48 and t.expert_parts == ("gate_up_proj", "down_proj")
    peft_model = attach_lora(model, lora)  # dropout allowed: it only reaches the attention LoRA
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == moe_lora_params(arch, 8, experts=True)
    assert {n.rsplit(".", 1)[1] for n in trainable if ".experts." in n} == {
        "gate_up_A",
        "gate_up_B",
        "down_A",
        "down_B",
    }
    assert (
        peft_model.peft_config["default"].lora_dropout == 0.05
        and not peft_model.peft_config["default"].target_parameters
    )


def test_moe_eager_is_attention_only_and_gate_alone_is_refused(typed, caplog):
    arch = typed("train", ["model=qwen3_30b_a3b"]).model.arch
    lora = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=ALL)
    with caplog.at_level("WARNING"):
        peft_model = attach_lora(build_on_meta(arch, "eager"), lora)
    assert "model.moe_kernel=eager: the routed experts get no LoRA" in caplog.text
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == moe_lora_params(arch, 8, experts=False)
    only_gate = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(UsageError, match=r"names gate_proj alone: .* fuse gate_proj and up_proj"):
        lora_targets(build_on_meta(arch, "fused"), only_gate)
    down = lora_targets(
        build_on_meta(arch, "fused"),
        LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "down_proj"]),
    )
    assert down.expert_parts == ("down_proj",) and len(down.experts) == 48


def test_unknown_target_is_refused(typed):
    model = build_on_meta(typed("train").model.arch)
    with pytest.raises(ValueError, match=r"train.lora.target_modules=\['qkv'\]: no Linear module"):
        lora_targets(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["qkv"]))
