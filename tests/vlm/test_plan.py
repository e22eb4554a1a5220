"""The memory planner: NF4 byte formula, shipped tiers fit, exact trainable bytes on the tiny model, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlm.plan import GIB, PlanError, Settings, check_fits, plan_memory
from vlm.plan_terms import nf4_bytes

ROOT = Path(__file__).resolve().parents[2]
TIERS = sorted(p.stem for p in (ROOT / "conf" / "gpu").glob("*.yaml") if p.stem != "cpu")
# peft 0.21 maps gate/up/down_proj onto the 3D expert tensors of an MoE and refuses lora_dropout != 0
# there; stage 2 on an MoE decoder therefore trains LoRA on attention only.
MOE_LORA = "train.lora_cfg.target_modules=[q_proj,k_proj,v_proj,o_proj]"


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
def test_shipped_tier_fits_with_headroom(compose, tier, stage):
    over = [f"gpu={tier}", f"train={stage}"]
    cfg = compose("train", over)
    if stage == "stage2_lora" and cfg.model.arch.get("num_experts"):
        cfg = compose("train", [*over, MOE_LORA])
    plan = plan_memory(cfg)
    assert plan.capacity_gib == cfg.gpu.memory_gib
    assert plan.fits and plan.headroom >= 0.10, (tier, stage, plan.total_gib)
    assert plan.total_gib == pytest.approx(sum(b for _, b, _ in plan.terms) / GIB)
    if stage == "stage2_lora":
        assert plan.term("lora") > 0
        assert plan.term("decoder_activations") > plan_memory(compose("train", [f"gpu={tier}"])).term(
            "decoder_activations"
        )


def test_moe_lora_with_dropout_is_refused_with_the_fix(compose):
    cfg = compose("train", ["gpu=h100", "train=stage2_lora"])
    with pytest.raises(ValueError, match=r"lora_dropout.*q_proj,k_proj,v_proj,o_proj"):
        plan_memory(cfg)


@pytest.mark.parametrize("stage", ["stage1_projector", "stage2_lora"])
def test_fused_moe_under_24gb_at_2048_tokens(compose, stage):
    # 4 videos x (16 frames x 16 visual + 56 prompt + 199 caption + <|im_end|>) = 2,048 tokens
    over = [
        "gpu=h100",
        f"train={stage}",
        "train.batch_size=4",
        "data.num_frames=16",
        "plan.caption_tokens=199",
    ]
    over += [MOE_LORA] if stage == "stage2_lora" else []
    cfg = compose("plan", over)
    assert cfg.model.moe_kernel == "fused" and cfg.train.gradient_checkpointing
    plan = plan_memory(cfg)
    assert plan.tokens_per_step == 2048
    assert plan.total_gib < 24.0, plan.total_gib
    eager = plan_memory(compose("plan", [*over, "model.moe_kernel=eager"]))
    assert eager.term("moe_experts") > 3.5 * plan.term("moe_experts")  # 16-bit vs NF4


def test_checkpointing_and_cache_shrink_the_plan(compose):
    base = plan_memory(compose("train", ["gpu=l4"]))
    no_ckpt = plan_memory(compose("train", ["gpu=l4", "train.gradient_checkpointing=false"]))
    cached = plan_memory(compose("train", ["gpu=l4", "data.cache_features=true"]))
    assert no_ckpt.term("decoder_activations") > 5 * base.term("decoder_activations")
    assert cached.term("vision_encoder") == 0 and base.term("vision_encoder") > 0.5 * GIB
    assert cached.total_gib < base.total_gib


def test_check_fits_refuses_oversized_and_force_passes(compose):
    big = ["gpu=l4", "train.batch_size=16", "data.num_frames=32", "train.gradient_checkpointing=false"]
    with pytest.raises(PlanError) as err:
        check_fits(compose("train", big))
    msg = str(err.value)
    assert "\n" not in msg and "gpu=l4" in msg and "decoder_activations" in msg
    assert "train.gradient_checkpointing=true" in msg and "train.batch_size=8" in msg
    check_fits(compose("train", [*big, "plan.force=true"]))  # overridden: no error
    check_fits(compose("train", ["gpu=l4"]))  # the shipped tier passes


def test_check_fits_skips_the_cpu_tier(compose, monkeypatch):
    import vlm.plan

    monkeypatch.setattr(vlm.plan, "plan_memory", lambda cfg: pytest.fail("cpu tier must not be planned"))
    check_fits(compose("train", ["gpu=cpu"]))


def test_prompt_tokens_setting_covers_the_chat_prompt():
    from vlm.tokenizer import VISION_END, VISION_START, load_tokenizer

    tok = load_tokenizer(None)
    for style in ("detailed", "short"):
        p = OmegaConf.load(ROOT / "conf" / "prompt" / f"{style}.yaml")
        msgs = [
            {"role": "system", "content": p.system},
            {"role": "user", "content": f"{VISION_START}{VISION_END}\n{p.user}"},
        ]
        text = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        n = len(tok(text, add_special_tokens=False).input_ids)
        assert n <= Settings.prompt_tokens <= n + 8, (style, n)


def test_plan_yaml_repeats_the_code_defaults(compose):
    plan = compose("plan", []).plan
    for name, f in Settings.__dataclass_fields__.items():
        assert plan[name] == f.default, name


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
def test_exact_bytes_on_tiny_models(compose, dtype, tmp_path, monkeypatch):
    """Planner weights / params / grads / AdamW states == the bytes one real training step allocates."""
    import open_clip
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vlm.decoder import load_decoder

    monkeypatch.setenv("KOVICAP_CACHE", str(tmp_path))
    torch.manual_seed(0)
    cfg = compose("train", ["gpu=cpu", "train=stage2_lora", f"gpu.compute_dtype={dtype}"])
    stage1 = plan_memory(compose("train", ["gpu=cpu", f"gpu.compute_dtype={dtype}"]))
    plan = plan_memory(cfg)
    dt = getattr(torch, dtype)

    decoder = load_decoder(cfg.model, dtype)
    assert _decoder_weight_bytes(decoder) == stage1.term("decoder_weights_nf4") + stage1.term(
        "decoder_weights_dense"
    )
    decoder = prepare_model_for_kbit_training(decoder, use_gradient_checkpointing=False)  # as vlm/lora.py
    assert _decoder_weight_bytes(decoder) == plan.term("decoder_weights_nf4") + plan.term(
        "decoder_weights_dense"
    )
    lc = cfg.train.lora_cfg
    decoder = get_peft_model(
        decoder,
        LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules)
        ),
    )

    mc = cfg.vision.model_cfg
    visual = open_clip.CLIP(
        embed_dim=mc.embed_dim, vision_cfg=dict(mc.vision_cfg), text_cfg=dict(mc.text_cfg)
    ).visual
    assert sum(tensor_bytes(p) for p in visual.to(dt).parameters()) == plan.term("vision_encoder")
    width, grid = visual.transformer.width, tuple(visual.grid_size)
    hidden = decoder.config.hidden_size
    try:
        from projector import build_projector

        proj = build_projector(cfg.projector, width, hidden, grid)
    except ImportError:
        proj = torch.nn.ModuleDict(
            {
                "fc1": torch.nn.Linear(width, hidden),
                "fc2": torch.nn.Linear(hidden, hidden),
                "pos": torch.nn.Embedding(cfg.projector.max_frames, hidden),
            }
        )
        proj.register_parameter("gain", torch.nn.Parameter(torch.ones(hidden)))
        proj.forward = lambda f: (
            proj.fc2(torch.nn.functional.gelu(proj.fc1(f.mean(2)))) * proj.gain
            + proj.pos.weight[: f.shape[1]]
        )

    trainable = [p for p in proj.parameters()] + [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    feats = torch.randn(2, cfg.data.num_frames, grid[0] * grid[1], width)  # (B, T, P, Dv)
    emb = proj(feats)
    emb = emb if emb.dim() == 3 else emb.unsqueeze(1)
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
        [sys.executable, "-m", "vlm.plan", "gpu=t4", "output=json", f"plan.output_file={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout == ""
    data = json.loads(out.read_text())
    assert {"terms", "total_gib", "capacity_gib", "fits"} <= set(data)
    assert data["capacity_gib"] == 16 and data["fits"] is True and data["tier"] == "t4"
    names = {t["term"] for t in data["terms"]}
    assert {"decoder_weights_nf4", "decoder_activations", "logits", "cuda_context"} <= names
    assert data["total_gib"] == pytest.approx(sum(t["bytes"] for t in data["terms"]) / GIB, abs=1e-3)
