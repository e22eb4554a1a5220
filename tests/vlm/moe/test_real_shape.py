"""Qwen3-30B-A3B's real shapes (2 of its 48 layers, random weights) through the MoE tier on CPU.

Loading straight into NF4 (peak RSS within the plan; the transient stays one chunk of experts, never a
layer's 16-bit experts) and the NF4 checkpoint; `python -m bench.moe --load` measures the same at 2 and
4 layers (the peak grows by one layer's NF4 experts per layer, the transient stays flat).

Then the chain `python -m bench.moe_real` reports (`run_chain`): one stage-2 step of `gpu=h100
train=stage2_lora` on the NF4 checkpoint (CPU settings: fp32, tiny tower, r=8) trains LoRA on attention
and on every routed expert, exactly the planner's count; `python -m vlm.export`'s merge streams in a fresh
process; stock transformers with stock peft on `adapter/`, on the vLLM-layout `adapter_vllm/`, and the
merged model through stock `AutoModelForCausalLM` give our float32 logits (first decoder layer, final
norm and head: both layers of a float32 stock model need 7.3 GB).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoConfig

from bench.moe_real import ATOL, check, run_chain
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


@pytest.fixture(scope="module")
def chain(real_moe_dir, real_nf4, tmp_path_factory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("moe_chain")
    result = run_chain(real_moe_dir, real_nf4[0], work)
    print("\n" + json.dumps(result))
    yield result
    shutil.rmtree(work, ignore_errors=True)  # 7.4 GB: not left for pytest's kept basetemps


def test_stage2_trains_lora_on_every_routed_expert_at_the_planned_count(chain):
    t = chain["trainable"]
    assert chain["layers"] == REAL_LAYERS == 2
    assert t["lora_in_checkpoint"] == t["expected_lora"] > 10 * t["expected_attention_only"]
    assert t["expert_B_factors_moved"] == 2 * REAL_LAYERS  # gate_up and down of every layer
    assert t["total"] > t["lora_in_checkpoint"]  # + the projector


def test_stock_peft_the_vllm_layout_and_the_merge_give_our_logits(chain):
    diff = chain["logit_max_abs_diff"]
    assert diff["adapter_effect"] > 1e-2  # the comparisons below would hold for an untrained adapter too
    for name in ("stock_peft", "vllm_layout_via_peft", "merged"):
        assert diff[name] <= ATOL, (name, diff)
    assert check(chain) == []


def test_merge_streams_one_layer_at_a_time(chain):
    """The export's anonymous memory over its imports: at most one layer's experts in fp32 plus the
    largest shard being written (the merge keeps one layer's output and one chunk of experts)."""
    mem = chain["export_merge_anon_gib"]
    one_layer, shard = chain["one_layer_experts_fp32_gib"], chain["largest_merged_shard_gib"]
    assert mem["peak"] - mem["baseline"] <= one_layer + shard, chain


def test_merged_directory_is_complete_for_stock_transformers(chain):
    """Tokenizer and chat template next to the weights (its logits: test above)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(chain["export_dir"]) / "merged")
    assert tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == 151645
