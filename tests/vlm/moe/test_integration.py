"""`use_fused_moe` on a tiny random Qwen3MoeForCausalLM: equal logits and gradients, loadable state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from vlm.moe import FusedMoeExperts, use_fused_moe


def tiny_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
    )  # fmt: skip
    cfg._experts_implementation = "eager"
    return Qwen3MoeForCausalLM(cfg).eval()


def eager_on_dequantized(fused_model: Qwen3MoeForCausalLM, eager_model: Qwen3MoeForCausalLM) -> None:
    """Put the fused model's de-quantized experts into the eager model (the exact comparison)."""
    for name, m in fused_model.named_modules():
        if isinstance(m, FusedMoeExperts):
            gu, dn = m.dequantized()
            ref = eager_model.get_submodule(name)
            with torch.no_grad():
                ref.gate_up_proj.copy_(gu)
                ref.down_proj.copy_(dn)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_logits_and_input_grads_equal_eager(backend):
    eager = tiny_model()
    fused = copy.deepcopy(eager)
    assert use_fused_moe(fused, backend=backend) == 2
    assert use_fused_moe(fused, backend=backend) == 0  # idempotent
    eager_on_dequantized(fused, eager)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 11), generator=gen)
    emb_f = fused.get_input_embeddings()(ids).detach().requires_grad_()
    emb_e = emb_f.detach().clone().requires_grad_()
    lf = fused(inputs_embeds=emb_f).logits
    le = eager(inputs_embeds=emb_e).logits
    # float32 sums in another order: differences of a few ulps of the largest value (logits ~0.6, input
    # gradients ~70), so the absolute tolerance is scaled to each tensor's magnitude.
    torch.testing.assert_close(lf, le, rtol=1e-4, atol=2e-6 * le.abs().max().item())
    g = torch.randn(lf.shape, generator=gen)
    lf.backward(g)
    le.backward(g)
    # Gradients reach the embeddings through attention, the router and the NF4 experts of both layers.
    torch.testing.assert_close(emb_f.grad, emb_e.grad, rtol=1e-4, atol=2e-6 * emb_e.grad.abs().max().item())


def test_dense_checkpoint_loads_into_swapped_model_and_nf4_state_dict_round_trips():
    source = tiny_model(seed=1)
    fused = tiny_model(seed=2)  # different random weights everywhere
    use_fused_moe(fused, backend="torch")
    missing, unexpected = fused.load_state_dict(source.state_dict(), strict=True)
    assert not missing and not unexpected
    expected = copy.deepcopy(source)
    use_fused_moe(expected, backend="torch")  # quantizing the source directly must give the same buffers
    sd, want = fused.state_dict(), expected.state_dict()
    assert sd.keys() == want.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj_q" in sd
    assert all(torch.equal(sd[k], want[k]) for k in sd)

    again = tiny_model(seed=3)
    use_fused_moe(again, quantize=False, backend="torch")  # empty NF4 buffers, filled by the load
    again.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(again(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_bf16_model_keeps_exact_nf4_statistics():
    model = tiny_model()
    use_fused_moe(model, backend="torch")
    experts = model.model.layers[0].mlp.experts
    before = experts.dequantized(torch.bfloat16)
    model.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(before, experts.dequantized(torch.bfloat16), strict=True))
    logits = model(torch.randint(0, 128, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_lora_swap_trains_only_adapters():
    model = tiny_model()
    model.requires_grad_(False)
    use_fused_moe(model, backend="torch", lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 and all(".experts.lora." in n for n in trainable)
