"""GPU tiers pick the right decoder and dtype; every real architecture has its published size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from vlm.decoder import arch_config, build_on_meta, count_params

ROOT = Path(__file__).resolve().parents[2]
TIERS = {
    "cpu": (None, "float32", "qwen3_tiny"),
    "t4": ("Qwen/Qwen3-4B", "float16", "qwen3_4b"),
    "l4": ("Qwen/Qwen3-8B", "bfloat16", "qwen3_8b"),
    "a100": ("Qwen/Qwen3-14B", "bfloat16", "qwen3_14b"),
    "h100": ("Qwen/Qwen3-30B-A3B", "bfloat16", "qwen3_30b_a3b"),
}
# model yaml -> (total params, active params) as published; tolerance 0.5 %
SIZES = {
    "qwen3_4b": (4.02e9, 4.02e9),
    "qwen3_8b": (8.19e9, 8.19e9),
    "qwen3_14b": (14.77e9, 14.77e9),
    "qwen3_32b": (32.76e9, 32.76e9),
    "qwen3_30b_a3b": (30.53e9, 3.35e9),
}


@pytest.mark.parametrize("tier", TIERS)
def test_tier_picks_decoder_and_dtype(compose, tier):
    hub_id, dtype, _ = TIERS[tier]
    cfg = compose("train", [f"gpu={tier}"])
    assert cfg.model.name_or_path == hub_id
    assert cfg.gpu.compute_dtype == dtype
    if tier == "t4":  # Turing: no bf16 tensor cores
        assert cfg.trainer.precision == "16-mixed" and cfg.gpu.attn_implementation == "sdpa"
    elif tier != "cpu":
        assert cfg.trainer.precision == "bf16-mixed"


def test_model_override_beats_tier(compose):
    cfg = compose("train", ["gpu=h100", "model=qwen3_32b"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-32B"


def test_unknown_tier_lists_choices(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["gpu=v100"])
    assert "l4" in str(err.value.__cause__ or err.value) or "l4" in str(err.value)


@pytest.mark.parametrize("name", SIZES)
def test_real_architectures_on_meta(compose, name):
    cfg = compose("train", [f"model={name}"])
    model = build_on_meta(cfg.model)
    total, active = count_params(model)
    want_total, want_active = SIZES[name]
    assert abs(total - want_total) / want_total < 0.005, total
    assert abs(active - want_active) / want_active < 0.005, active
    assert abs(total - cfg.model.expected_params) / want_total < 0.005
    hf = arch_config(cfg.model)
    assert hf.vocab_size == 151936 and hf.head_dim == 128
    assert model.get_input_embeddings().weight.shape == (151936, hf.hidden_size)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name == "qwen3_4b")
    assert next(model.parameters()).device.type == "meta"


def test_moe_architecture_facts(compose):
    hf = arch_config(compose("train", ["model=qwen3_30b_a3b"]).model)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (128, 8, 768)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (
        48,
        2048,
        32,
        4,
    )


def test_cli_shows_l4_job_config():
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "gpu=l4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "name_or_path: Qwen/Qwen3-8B" in out and "compute_dtype: bfloat16" in out
    assert "precision: bf16-mixed" in out


def test_cli_unknown_tier_fails_with_choices():
    res = subprocess.run([sys.executable, "train.py", "gpu=v100"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert "Available options" in res.stderr and "a100" in res.stderr and "h100" in res.stderr
