"""Typed configs: tiers pick decoder and dtype, every real architecture has its published size, every entry
config composes into typed objects, and a wrong type or unknown key fails at composition."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from vlm.config import entries, to_typed
from vlm.model.decoder import arch_config, build_on_meta

ROOT = Path(__file__).resolve().parents[3]
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
REQUIRED = {"caption": ["input=a", "output=b", "export=c"], "export": ["checkpoint=a", "output=b"],
            "caption_eval": ["predictions=a", "references=b"], "check": ["annotations=a"]}  # fmt: skip


def count_params(model) -> tuple[int, int]:
    """(total, active per token) parameters; for MoE only top-k of the experts are active."""
    total = sum(p.numel() for p in model.parameters())
    n_exp = getattr(model.config, "num_experts", None)
    if not n_exp:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - expert + expert * model.config.num_experts_per_tok // n_exp


@pytest.mark.parametrize("tier", TIERS)
def test_tier_picks_decoder_and_dtype(typed, tier):
    hub_id, dtype, _ = TIERS[tier]
    cfg = typed("train", [f"gpu={tier}"])
    assert isinstance(cfg, entries.TrainEntry)
    assert cfg.model.name_or_path == hub_id
    assert cfg.gpu.compute_dtype == dtype
    if tier == "t4":  # Turing: no bf16 tensor cores
        assert cfg.trainer.precision == "16-mixed" and cfg.gpu.attn_implementation == "sdpa"
    elif tier != "cpu":
        assert cfg.trainer.precision == "bf16-mixed"
        assert (
            cfg.train.gradient_checkpointing and cfg.trainer.accelerator == "gpu"
        )  # from conf/gpu_common.yaml
    if tier != "cpu":  # OpenAI weights need QuickGELU
        assert cfg.vision.arch == "ViT-L-14-quickgelu" and cfg.vision.pretrained == "openai"


def test_model_override_beats_tier(typed):
    assert typed("train", ["gpu=h100", "model=qwen3_32b"]).model.name_or_path == "Qwen/Qwen3-32B"


def test_unknown_tier_lists_choices(compose):
    with pytest.raises(Exception, match="Available options in 'gpu'") as err:
        compose("train", ["gpu=v100"])
    assert "a100" in str(err.value) and "h100" in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.batch_sizee=4", "Key 'batch_sizee' not in 'StageConfig'"),
        ("data.cache_features=maybe", "Value 'maybe' is not a valid bool"),
        (
            "projector.hidden_mult=2",
            "Could not override 'projector.hidden_mult'",
        ),  # linear has no hidden layer
    ],
)
def test_wrong_type_or_unknown_key_fails_at_composition(compose, override, message):
    over = ["projector=linear", override] if override.startswith("projector.") else [override]
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", over)
    assert message in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "name", ["train", "plan", "kmmlu", "caption", "export", "caption_eval", "check", "synth", "demo"]
)
def test_every_entry_config_composes_typed(compose, name):
    cfg = to_typed(compose(name, REQUIRED.get(name, [])))
    assert type(cfg).__name__.lower().replace("_", "") == f"{name.replace('_', '')}entry"
    assert cfg.debug is False and cfg.verbose is False  # the shared conf/cli.yaml


@pytest.mark.parametrize("name", SIZES)
def test_real_architectures_on_meta(typed, name):
    cfg = typed("train", [f"model={name}"])
    model = build_on_meta(cfg.model.arch)
    total, active = count_params(model)
    want_total, want_active = SIZES[name]
    assert abs(total - want_total) / want_total < 0.005, total
    assert abs(active - want_active) / want_active < 0.005, active
    assert abs(total - cfg.model.expected_params) / want_total < 0.005
    hf = arch_config(cfg.model.arch)
    assert hf.vocab_size == 151936 and hf.head_dim == 128
    assert model.get_input_embeddings().weight.shape == (151936, hf.hidden_size)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name == "qwen3_4b")
    assert next(model.parameters()).device.type == "meta"


def test_moe_architecture_facts(typed):
    hf = arch_config(typed("train", ["model=qwen3_30b_a3b"]).model.arch)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (128, 8, 768)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (
        48,
        2048,
        32,
        4,
    )


def test_cli_shows_l4_job_config():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "gpu=l4"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "name_or_path: Qwen/Qwen3-8B" in out and "compute_dtype: bfloat16" in out
    assert "precision: bf16-mixed" in out


def test_cli_h100_stage2_composes():
    r = subprocess.run([sys.executable, "train.py", "gpu=h100", "train=stage2_lora", "--cfg", "job"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "name_or_path: Qwen/Qwen3-30B-A3B" in r.stdout and "stage: stage2_lora" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpu=v100"], "Could not find 'gpu/v100'"),
        (["train.batch_size=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
        (["nonsense=1"], "Could not override 'nonsense'"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(args, message, tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
