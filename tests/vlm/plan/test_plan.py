"""The memory planner: NF4 byte formula, shipped tiers fit, exact trainable bytes on the tiny model, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.vlm.model.test_lora_policy import moe_lora_params
from vlm.plan import GIB, PlanError, check_fits, plan_memory
from vlm.plan.planner import prompt_tokens
from vlm.plan.terms import nf4_bytes

ROOT = Path(__file__).resolve().parents[3]
TIERS = sorted(p.stem for p in (ROOT / "conf" / "gpu").glob("*.yaml") if p.stem != "cpu")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [qs.absmax, qs.code, qs.offset]
    if qs.nested:
        out += [qs.state2.absmax, qs.state2.code]
    return [t for t in out if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("shape", [(128, 128), (96, 256), (1000, 7), (4096, 4097)])
def test_nf4_bytes_match_bitsandbytes(shape):
    from bitsandbytes.functional import quantize_4bit

    q, qs = quantize_4bit(torch.randn(shape), blocksize=64, compress_statistics=True, quant_type="nf4")
    got = tensor_bytes(q) + sum(tensor_bytes(t) for t in quant_state_tensors(qs))
    assert nf4_bytes(shape[0] * shape[1]) == got


@pytest.mark.parametrize("stage", ["stage1_projector", "stage2_lora"])
@pytest.mark.parametrize("tier", TIERS)
def test_shipped_tier_fits_with_headroom(typed, tier, stage):
    cfg = typed("train", [f"gpu={tier}", f"train={stage}"])  # no override: what train.py would run
    plan = plan_memory(cfg)
    assert plan.capacity_gib == cfg.gpu.memory_gib
    assert plan.fits and plan.headroom >= 0.10, (tier, stage, plan.total_gib)
    assert plan.total_gib == pytest.approx(sum(b for _, b, _ in plan.terms) / GIB)
    if stage == "stage2_lora":
        assert plan.term("lora") > 0
        assert (
            plan.term("lm_head_autocast_copy") > 0
        )  # fp32 head after k-bit preparation, bf16 copy in autocast
        stage1 = plan_memory(typed("train", [f"gpu={tier}"]))
        assert plan.term("decoder_activations") > stage1.term("decoder_activations")


def test_h100_stage2_plans_with_the_shipped_lora(typed):
    """The one LoRA policy keeps peft off the 3D experts (ExpertLoRA adapts them), so the shipped config
    (dropout 0.05) plans, counting attention and every routed expert."""
    arch = typed("train", ["model=qwen3_30b_a3b"]).model.arch
    plan = plan_memory(typed("train", ["gpu=h100", "train=stage2_lora"]))
    assert plan.fits and plan.term("lora") == 16 * moe_lora_params(arch, 64, experts=True)


MOE_2048 = [  # 4 videos x (16 frames x 16 visual + 52 prompt + 203 caption + <|im_end|>) = 2,048 tokens
    "gpu=h100",
    "train.batch_size=4",
    "data.num_frames=16",
    "data.max_caption_tokens=203",
]


def test_fused_moe_stage1_under_24gb_at_2048_tokens(typed):
    cfg = typed("plan", [*MOE_2048, "train=stage1_projector"])
    assert cfg.model.moe_kernel == "fused" and cfg.train.gradient_checkpointing
    plan = plan_memory(cfg)
    assert plan.tokens_per_step == 2048
    assert plan.total_gib < 24.0, plan.total_gib
    eager = plan_memory(typed("plan", [*MOE_2048, "train=stage1_projector", "model.moe_kernel=eager"]))
    assert eager.term("moe_experts") > 3.5 * plan.term("moe_experts")  # 16-bit vs NF4


def test_fused_moe_stage2_with_expert_lora_at_2048_tokens(typed):
    """LoRA on every routed expert at the shipped r=64 is 2.57 B trainable parameters (38 GiB of fp32
    weights, gradients and AdamW states): over 24 GiB by that term alone, while r=2 plans under it."""
    arch = typed("train", ["model=qwen3_30b_a3b"]).model.arch
    shipped = plan_memory(typed("plan", [*MOE_2048, "train=stage2_lora"]))
    assert shipped.tokens_per_step == 2048 and shipped.layers == 48
    assert shipped.term("lora") == 16 * moe_lora_params(arch, 64, experts=True)
    assert shipped.term("lora") > 24 * GIB and shipped.total_gib - shipped.term("lora") / GIB < 24.0
    r2 = plan_memory(typed("plan", [*MOE_2048, "train=stage2_lora", "train.lora.r=2"]))
    assert r2.term("lora") == 16 * moe_lora_params(arch, 2, experts=True)
    assert r2.total_gib < 24.0, r2.total_gib


def test_checkpointing_and_cache_shrink_the_plan(typed):
    base = plan_memory(typed("train", ["gpu=l4"]))
    no_ckpt = plan_memory(typed("train", ["gpu=l4", "train.gradient_checkpointing=false"]))
    cached = plan_memory(typed("train", ["gpu=l4", "data.cache_features=true"]))
    assert no_ckpt.term("decoder_activations") > 5 * base.term("decoder_activations")
    assert cached.term("vision_tower") == 0 and base.term("vision_tower") > 0.5 * GIB
    assert cached.total_gib < base.total_gib


def test_check_fits_refuses_oversized_and_force_passes(typed):
    big = ["gpu=l4", "train.batch_size=16", "data.num_frames=32", "train.gradient_checkpointing=false"]
    with pytest.raises(PlanError) as err:
        check_fits(typed("train", big))
    msg = str(err.value)
    assert "\n" not in msg and "gpu=l4" in msg and "decoder_activations" in msg
    assert "train.gradient_checkpointing=true" in msg and "train.batch_size=8" in msg
    check_fits(typed("train", [*big, "plan.force=true"]))  # overridden: no error
    check_fits(typed("train", ["gpu=l4"]))  # the shipped tier passes


def test_check_fits_skips_the_cpu_tier(typed, monkeypatch):
    import vlm.plan.planner

    monkeypatch.setattr(
        vlm.plan.planner, "plan_memory", lambda cfg: pytest.fail("cpu tier must not be planned")
    )
    check_fits(typed("train", ["gpu=cpu"]))


@pytest.mark.parametrize("style", ["detailed", "short"])
def test_prompt_tokens_are_the_processors(typed, style):
    from vlm.model.build import build_processor

    cfg = typed("train", [f"prompt={style}"])
    proc = build_processor(cfg.model, cfg.prompt, cfg.data.max_caption_tokens)
    assert prompt_tokens(cfg) == len(proc.prompt_ids(10)) - 10
    plan = plan_memory(cfg)
    per_video = plan.tokens_per_step // cfg.train.batch_size
    assert per_video == cfg.data.num_frames * 16 + prompt_tokens(cfg) + cfg.data.max_caption_tokens + 1


def test_plans_the_model_directory_pointed_at(typed, tmp_path):
    """model.name_or_path=a local folder: its config.json (here a 2-layer Qwen3-8B), not the YAML's 36 layers."""
    from dataclasses import replace

    from vlm.model.decoder import arch_config

    cfg = typed("train", ["gpu=l4"])
    hf = arch_config(replace(cfg.model.arch, num_hidden_layers=2))
    hf.save_pretrained(tmp_path / "qwen3-8b-2l")
    full = plan_memory(cfg)
    cut = plan_memory(typed("train", ["gpu=l4", f"model.name_or_path={tmp_path / 'qwen3-8b-2l'}"]))
    assert (full.layers, cut.layers) == (36, 2)
    assert cut.term("decoder_weights_nf4") < full.term("decoder_weights_nf4") / 10


def _decoder_weight_bytes(model) -> int:
    """Bytes the loaded decoder really holds: parameters + every QuantState tensor, shared ones once."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters())
    for p in model.parameters():
        if getattr(p, "quant_state", None) is not None:
            tensors += quant_state_tensors(p.quant_state)
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += tensor_bytes(t)
    return total


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_bytes_on_tiny_models(typed, dtype, tmp_path, monkeypatch):
    """Planner weights / params / grads / AdamW states == the bytes one real training step allocates."""
    from peft import prepare_model_for_kbit_training

    from projector import build_projector
    from vlm.model.decoder import load_decoder
    from vlm.model.lora import attach_lora
    from vlm.model.vision import build_vision

    monkeypatch.setenv("KOVICAP_CACHE", str(tmp_path))
    torch.manual_seed(0)
    cfg = typed("train", ["gpu=cpu", "train=stage2_lora", f"gpu.compute_dtype={dtype}"])
    stage1 = plan_memory(typed("train", ["gpu=cpu", f"gpu.compute_dtype={dtype}"]))
    plan = plan_memory(cfg)
    dt = getattr(torch, dtype)

    decoder = load_decoder(cfg.model, dtype)
    assert _decoder_weight_bytes(decoder) == stage1.term("decoder_weights_nf4") + stage1.term(
        "decoder_weights_dense"
    )
    decoder = prepare_model_for_kbit_training(
        decoder, use_gradient_checkpointing=False
    )  # as vlm/model/lora.py
    assert _decoder_weight_bytes(decoder) == plan.term("decoder_weights_nf4") + plan.term(
        "decoder_weights_dense"
    )
    decoder = attach_lora(decoder, cfg.train.lora)  # the policy training uses

    tower = build_vision(cfg.vision)
    if dt != torch.float32:  # a frozen tower is stored in the compute dtype
        tower.to(dt)
    assert sum(tensor_bytes(p) for p in tower.parameters()) == plan.term("vision_tower")
    proj = build_projector(cfg.projector, tower.width, decoder.config.hidden_size, tower.grid)
    width, grid = tower.width, tower.grid

    trainable = [p for p in proj.parameters()] + [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    feats = torch.randn(2, cfg.data.num_frames, grid[0] * grid[1], width)  # (B, T, P, Dv)
    emb = proj(feats)
    with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
        out = decoder(inputs_embeds=emb.to(decoder.get_input_embeddings().weight.dtype))
    out.logits.float().logsumexp(-1).mean().backward()
    opt.step()

    params = sum(tensor_bytes(p) for p in trainable)
    grads = sum(tensor_bytes(p.grad) for p in trainable)
    # AdamW's `step` counters are CPU scalars even on a GPU run (not fused/capturable): not GPU memory
    states = sum(tensor_bytes(v) for s in opt.state.values() for k, v in s.items() if k != "step")
    assert all(p.grad is not None for p in trainable)
    assert params + grads + states == plan.term("projector") + plan.term("lora")
    assert params == (plan.term("projector") + plan.term("lora")) // 4


def test_cli_json(tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run(
        [sys.executable, "-m", "vlm.plan", "gpu=t4", "format=json", f"output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    data = json.loads(out.read_text())
    assert {"terms", "total_gib", "capacity_gib", "fits"} <= set(data)
    assert data["capacity_gib"] == 16 and data["fits"] is True and data["tier"] == "t4"
    names = {t["term"] for t in data["terms"]}
    assert {"decoder_weights_nf4", "decoder_activations", "logits", "cuda_context"} <= names
    assert data["total_gib"] == pytest.approx(sum(t["bytes"] for t in data["terms"]) / GIB, abs=1e-3)
