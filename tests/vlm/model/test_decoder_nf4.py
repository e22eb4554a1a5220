"""NF4 checkpoints of a dense Qwen3 (`python -m vlm.export quantize=true`): loaded without quantizing, they
are bit for bit the decoder that loading the 16-bit weights quantizes on the fly. (MoE: tests/vlm/moe.)"""

from __future__ import annotations

import json
from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch

from vlm.model.decoder import decoder_source, load_decoder
from vlm.util.errors import UsageError

IDS = torch.tensor([[151644, 872, 198, 14990, 11, 1879, 0, 151645, 198]])  # a chat-template snippet


@pytest.fixture(scope="module")
def tiny(typed, tmp_path_factory):
    """The tiny decoder saved in bf16, as hub checkpoints are (quantizing starts from the saved dtype)."""
    from transformers import AutoModelForCausalLM

    from vlm.model.tokenizer import load_tokenizer

    model = typed("train", []).model
    where = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(decoder_source(model), dtype=torch.bfloat16).save_pretrained(where)
    load_tokenizer().save_pretrained(where)
    return replace(model, name_or_path=str(where))


@pytest.fixture(scope="module")
def nf4_dir(tiny, tmp_path_factory):
    """Quantized once for the module (`vlm.export`'s quantize=true; its CLI route: tests/vlm/moe)."""
    from vlm.export import export

    return export(decoder_source(tiny), tmp_path_factory.mktemp("q") / "nf4", quantize=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the compute dtype it is loaded for
def test_dense_nf4_checkpoint_equals_quantizing_on_load(tiny, nf4_dir, dtype):
    assert {"config.json", "kovicap_nf4.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in nf4_dir.iterdir()
    }
    meta = json.loads((nf4_dir / "kovicap_nf4.json").read_text())
    assert meta["source"] == decoder_source(tiny) and "experts" not in meta

    ref = load_decoder(tiny, dtype)  # 16-bit weights quantized while loading
    got = load_decoder(replace(tiny, name_or_path=str(nf4_dir)), dtype)
    lin4 = [m for m in got.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 7 * got.config.num_hidden_layers
    assert all(m.compute_dtype == getattr(torch, dtype) for m in lin4)
    sa, sb = ref.state_dict(), got.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, ref(IDS).logits, rtol=0, atol=0)


def test_dense_nf4_checkpoint_refuses_a_16_bit_request(tiny, nf4_dir):
    with pytest.raises(UsageError, match=r"model.quantize=none: .* is an NF4 checkpoint"):
        load_decoder(replace(tiny, name_or_path=str(nf4_dir), quantize="none"))


def test_quantize_refuses_a_decoder_that_is_not_qwen3(tmp_path):
    from transformers import AutoConfig

    from vlm.export import ExportError, export

    AutoConfig.for_model("llama", hidden_size=8, num_attention_heads=2, num_hidden_layers=1).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(ExportError, match=r"quantize=true saves Qwen3 decoders; this is llama"):
        export(tmp_path / "llama", tmp_path / "out", quantize=True)
    assert not (tmp_path / "out").exists()
