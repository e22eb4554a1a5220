"""Loading a Qwen3-MoE decoder straight into NF4 (experts streamed from the shards), and NF4 checkpoints.

On the tiny random Qwen3-MoE of conf/model/qwen3_tiny_moe.yaml; the real shape is in test_real_shape.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from vlm.model.decoder import decoder_source, load_decoder, quantization_config, save_nf4
from vlm.moe import FusedMoeExperts, use_fused_moe
from vlm.util.errors import UsageError

IDS = torch.tensor([[151644, 872, 198, 14990, 11, 1879, 0, 151645, 198]])  # a chat-template snippet


@pytest.fixture(scope="module")
def tiny_moe(typed):
    return typed("train", ["model=qwen3_tiny_moe"]).model


def quantized_after_load(src: str, dtype: torch.dtype) -> torch.nn.Module:
    """The reference: transformers loads the dense experts, then they are swapped and quantized."""
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, quantization_config=quantization_config("nf4", dtype)
    )
    use_fused_moe(model)
    return model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:3]


def test_streamed_load_never_builds_dense_experts_and_equals_quantizing_after(tiny_moe, monkeypatch):
    import transformers.models.qwen3_moe.modeling_qwen3_moe as modeling

    ref = quantized_after_load(decoder_source(tiny_moe), torch.float32)

    def refuse(*a, **k):
        raise AssertionError("a dense Qwen3MoeExperts was built")

    monkeypatch.setattr(modeling.Qwen3MoeExperts, "__init__", refuse)
    model = load_decoder(tiny_moe, "float32")
    assert sum(isinstance(m, FusedMoeExperts) for m in model.modules()) == 2
    assert_same_state(model, ref)  # NF4 buffers and bitsandbytes' Linear layers bit for bit
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=0, atol=0)


def test_fused_expert_layout_streams_the_same(tiny_moe, tmp_path):
    """A checkpoint with transformers' fused `experts.gate_up_proj` (E, 2I, H) tensors instead of the hub's
    per-expert ones gives the same NF4 experts."""
    src = Path(decoder_source(tiny_moe))
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in dense.state_dict()  # the fused layout
    assert_same_state(
        load_decoder(replace(tiny_moe, name_or_path=str(tmp_path)), "float32"),
        load_decoder(tiny_moe, "float32"),
    )


def test_nf4_checkpoint_loads_without_quantizing_and_equals_the_live_model(tiny_moe, tmp_path, monkeypatch):
    import bitsandbytes.functional as bnbf

    import vlm.moe.nf4

    # A bf16 source, like the hub's: quantized and saved at bf16, trained at another compute dtype.
    bf16 = AutoModelForCausalLM.from_pretrained(decoder_source(tiny_moe), dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    source = replace(tiny_moe, name_or_path=str(tmp_path / "bf16"))
    saved = save_nf4(load_decoder(source, "bfloat16"), tmp_path / "nf4", str(tmp_path / "bf16"), None)
    meta = json.loads((saved / "kovicap_nf4.json").read_text())
    assert meta["format"] == "kovicap-nf4" and meta["source"] == str(tmp_path / "bf16")
    assert "quantization_config" in json.loads((saved / "config.json").read_text())
    live = load_decoder(source, "float32")  # quantized on the fly at float32

    def refuse(*a, **k):
        raise AssertionError("loading an NF4 checkpoint quantized something")

    monkeypatch.setattr(vlm.moe.nf4, "quantize_codes", refuse)
    monkeypatch.setattr(bnbf, "quantize_4bit", refuse)
    loaded = load_decoder(replace(tiny_moe, name_or_path=str(saved)), "float32")
    assert_same_state(loaded, live)
    with torch.no_grad():  # bitsandbytes states re-typed to fp32: de-quantized exactly as the live model
        torch.testing.assert_close(loaded(IDS).logits, live(IDS).logits, rtol=0, atol=0)


def test_nf4_checkpoint_refuses_16_bit_and_eager_requests(tiny_moe, tmp_path):
    saved = save_nf4(load_decoder(tiny_moe, "float32"), tmp_path / "nf4", decoder_source(tiny_moe), None)
    with pytest.raises(UsageError, match=r"model.quantize=none: .* is an NF4 checkpoint; for 16-bit weights"):
        load_decoder(replace(tiny_moe, name_or_path=str(saved), quantize="none"))
    with pytest.raises(UsageError, match=r"model.moe_kernel=eager: .* stores the experts in NF4"):
        load_decoder(replace(tiny_moe, name_or_path=str(saved), moe_kernel="eager"))


def test_export_quantize_writes_a_loadable_nf4_checkpoint(tiny_moe, tmp_path, run_cli):
    from vlm.export import ExportError, export

    code, _, err = run_cli(
        "vlm.export", "quantize=true", f"checkpoint={decoder_source(tiny_moe)}", f"output={tmp_path / 'q'}"
    )
    assert code == 0, err
    out = tmp_path / "q"
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "kovicap_nf4.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert (
        sum(
            isinstance(m, FusedMoeExperts)
            for m in load_decoder(replace(tiny_moe, name_or_path=str(out))).modules()
        )
        == 2
    )
    with pytest.raises(ExportError, match=r"already an NF4 checkpoint"):
        export(str(out), tmp_path / "q2", quantize=True)
    code, _, err = run_cli("vlm.export", "quantize=true", "merge=true", f"checkpoint={out}", "output=x")
    assert code != 0 and "merge= and metrics= do not apply" in err
