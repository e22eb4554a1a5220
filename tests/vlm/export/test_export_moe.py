"""Qwen3-MoE export on the tiny random Qwen3-MoE: LoRA on every routed expert survives checkpoints and
resume, and the export's adapters (stock peft's `target_parameters` layout, the per-expert vLLM layout)
and streamed merge give the trained model's logits with stock peft and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlm.export import export, load_exported
from vlm.train.checkpoint import load_dir

IDS = torch.tensor([[151644, 872, 198, 14990, 11, 1879, 0, 151645, 198, 77091]])
COMMON = ("model=qwen3_tiny_moe", "train=stage2_lora", "train.lora.r=4", "train.lr_lora=1e-2",
          "train.max_steps=2", "train.checkpoint_every_n_steps=1")  # fmt: skip


def moe_run(compose, root: Path, out: Path, *extra: str) -> dict:
    from vlm.train.run import train

    over = [f"data.root={root}", f"output_dir={out}", "data.num_workers=0", "train.batch_size=4",
            "train.val_every_n_steps=1000", "train.val_caption_subset=0", "progress=false", *COMMON, *extra]  # fmt: skip
    return train(compose("train", over))


@pytest.fixture(scope="module")
def moe_ckpt(compose, synth_root, tmp_path_factory) -> Path:
    return Path(moe_run(compose, synth_root, tmp_path_factory.mktemp("moe_run"))["last_checkpoint"])


@pytest.fixture(scope="module")
def moe_export(moe_ckpt, tmp_path_factory) -> Path:
    return export(moe_ckpt, tmp_path_factory.mktemp("moe_exp") / "export", merge=True, merge_dtype="float32")


def expert_lora(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_dir(ckpt)["state_dict"].items() if ".experts.lora." in k}


def test_checkpoint_and_resume_carry_the_expert_lora(moe_ckpt, compose, synth_root, tmp_path):
    full = expert_lora(moe_ckpt)
    assert sorted(k.rsplit(".", 1)[1] for k in full if ".layers.0." in k) == [
        "down_A",
        "down_B",
        "gate_up_A",
        "gate_up_B",
    ]
    assert len(full) == 2 * 4 and all(v.dtype == torch.float32 for v in full.values())
    resumed = moe_run(
        compose, synth_root, tmp_path / "resumed", f"train.resume={moe_ckpt.parent / 'step_000001'}"
    )
    got = expert_lora(Path(resumed["last_checkpoint"]))
    assert got.keys() == full.keys()
    for k in full:  # the resumed run restored them at step 1 and trained them to the same values
        torch.testing.assert_close(got[k], full[k], rtol=1e-5, atol=1e-6)


def test_adapter_is_stock_peft_with_experts_as_target_parameters(moe_export):
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(moe_export / "adapter"))
    assert sorted(cfg.target_parameters) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    )
    assert len(cfg.target_modules) == 2 * 4 and cfg.lora_dropout == 0.0  # peft's ParamWrapper has no dropout
    with safe_open(str(moe_export / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    e, r, h, i = 8, 4, 64, 32
    layer = "base_model.model.model.layers.0.mlp.experts."
    assert shapes[layer + "base_layer.lora_A.weight"] == [e * r, h]  # gate_up: the inner ParamWrapper
    assert shapes[layer + "base_layer.lora_B.weight"] == [2 * i, e * r]
    assert shapes[layer + "lora_A.weight"] == [e * r, i] and shapes[layer + "lora_B.weight"] == [h, e * r]
    meta = json.loads((moe_export / "vlm.json").read_text())
    assert meta["adapter"]["experts"] == {
        "modules": 2,
        "parts": ["gate_up_proj", "down_proj"],
        "vllm_path": "adapter_vllm",
    }
    with safe_open(str(moe_export / "adapter_vllm" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {
        f"{layer}{ex}.{p}.lora_A.weight" for ex in range(e) for p in ("gate_proj", "up_proj", "down_proj")
    } <= keys


def stock_with_our_experts(ours: torch.nn.Module, base: str) -> torch.nn.Module:
    """Stock Qwen3MoeForCausalLM (fp32, dense experts) holding our de-quantized NF4 experts."""
    from transformers import AutoModelForCausalLM

    from vlm.moe import FusedMoeExperts

    stock = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, FusedMoeExperts):
                target = stock.get_submodule(name.split("base_model.model.", 1)[-1])
                target.gate_up_proj.copy_(m.dequantized()[0])
                target.down_proj.copy_(m.dequantized()[1])
    return stock


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def test_stock_peft_and_the_vllm_layout_give_our_logits(moe_export):
    from peft import PeftModel

    ours = load_exported(moe_export, quantize="none").vlm.decoder  # fused experts + ExpertLoRA, fp32 rest
    want = logits(ours)
    base = json.loads((moe_export / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    got = logits(PeftModel.from_pretrained(stock_with_our_experts(ours, base), str(moe_export / "adapter")))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # peft 0.21 converts the per-expert layout to the fused one itself: an independent check of it
    vllm = PeftModel.from_pretrained(stock_with_our_experts(ours, base), str(moe_export / "adapter_vllm"))
    torch.testing.assert_close(logits(vllm), want, atol=1e-4, rtol=0)
    for m in ours.modules():  # without the experts' LoRA the logits move: the comparison covers it
        if hasattr(m, "lora") and m.lora is not None and type(m).__name__ == "FusedMoeExperts":
            m.lora = None
    assert (logits(ours) - want).abs().max() > 1e-2


def test_merged_moe_is_lora_on_the_dequantized_base(moe_export, moe_ckpt):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    merged_dir = moe_export / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys and not any("lora" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()  # stock, dense experts
    ours = load_exported(moe_export).vlm.decoder  # as trained: NF4 Linear + NF4 experts + LoRA
    for m in ours.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.train()  # bitsandbytes' exact fp32 path, as training ran (its CPU inference kernel is bf16)
    torch.testing.assert_close(logits(merged), logits(ours), atol=1e-4, rtol=0)
