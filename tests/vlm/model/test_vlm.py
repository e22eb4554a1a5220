"""The VLM on tiny real classes: shapes, placeholder checks, NF4, LoRA, label-only loss, generation."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from vlm.model.build import build_vlm, embedding_rms, trainable_parameters
from vlm.model.captioner import VideoCaptioner
from vlm.model.tokenizer import VIDEO_PAD_ID, VOCAB_SIZE

CAPTIONS = ["빨간 원이 왼쪽에서 오른쪽으로 움직인다.", "파란 사각형이 위에서 아래로 이동한다."]


@pytest.fixture(scope="module")
def stage2(typed):
    torch.manual_seed(0)
    return build_vlm(typed("train", ["train=stage2_lora", "train.lora.r=8"]))  # (VLM, Processor)


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8, generator=g)  # (B, T, H, W, 3)


def test_shapes_through_every_stage(stage2, frames):
    vlm, proc = stage2
    feats = vlm.encode(frames)
    grid = vlm.vision.grid
    assert feats.shape == (2, 4, grid[0] * grid[1], vlm.vision.width)  # (B, T, P, Dv)
    visual = vlm.visual_tokens(feats)
    n = vlm.projector.num_tokens(4)
    assert visual.shape == (2, n, vlm.decoder.config.hidden_size)  # (B, T*K, D)
    prepared = vlm.projector.prepare(feats)
    assert prepared.shape == (2, 4, n // 4, vlm.vision.width)  # (B, T, K, Dv): what the cache stores
    torch.testing.assert_close(vlm.visual_tokens(prepared, prepared=True), visual)
    text = proc.train_batch(CAPTIONS, n)
    assert (
        text.input_ids.shape == text.attention_mask.shape == text.labels.shape
        and text.input_ids.shape[0] == 2
    )
    assert int((text.input_ids[0] == VIDEO_PAD_ID).sum()) == n
    assert vlm.embed(text.input_ids, visual).shape == (*text.input_ids.shape, visual.shape[2])


def test_placeholder_mismatch_names_both_numbers(stage2):
    vlm, proc = stage2
    text = proc.train_batch(CAPTIONS, 16)
    visual = torch.zeros(2, 12, vlm.decoder.config.hidden_size)
    with pytest.raises(ValueError, match="16 <\\|video_pad\\|> placeholders but the video gave 12"):
        vlm.embed(text.input_ids, visual)


def test_nf4_decoder_and_trainable_parameters(stage2):
    vlm, _ = stage2
    lin4 = [m for m in vlm.decoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(m.weight.quant_state.quant_type == "nf4" for m in lin4)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or ".lora_" in n for n in trainable)
    lora = [n for n in trainable if ".lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B for each target in each layer
    n_proj = sum(p.numel() for p in vlm.projector.parameters())
    n_lora = sum(p.numel() for n, p in vlm.named_parameters() if n in lora)
    c = vlm.decoder.config
    per_layer = 8 * (  # r=8: A is (r, in), B is (out, r)
        (c.hidden_size + c.num_attention_heads * c.head_dim) * 2  # q, o
        + (c.hidden_size + c.num_key_value_heads * c.head_dim) * 2  # k, v
        + (c.hidden_size + c.intermediate_size) * 3  # gate, up, down
    )
    assert n_lora == c.num_hidden_layers * per_layer
    assert trainable_parameters(vlm) == n_proj + n_lora
    assert not any(p.requires_grad for p in vlm.vision.parameters())  # the tower is frozen


def test_label_only_logits_equal_full_logits_loss(stage2, frames):
    """Applying the head only at labelled positions gives the same loss as the full logits."""
    vlm, proc = stage2
    feats = vlm.encode(frames)
    with torch.no_grad():
        text = proc.train_batch(CAPTIONS, vlm.projector.num_tokens(4))
        ours = vlm.loss(feats, text.input_ids, text.attention_mask, text.labels)
        visual = vlm.visual_tokens(feats)
        logits = vlm.causal_lm(
            inputs_embeds=vlm.embed(text.input_ids, visual), attention_mask=text.attention_mask
        ).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), text.labels[:, 1:].flatten()
        )
    # same sum over the same rows, in another order: float32 rounding of a ~12.0 mean
    assert float(ours) == pytest.approx(float(full), rel=1e-6)


def test_batched_greedy_equals_one_by_one(stage2, frames):
    vlm, proc = stage2
    cap = VideoCaptioner(vlm, proc)
    feats = vlm.encode(frames)
    users = ["짧게 설명해 주세요.", "이 영상을 한국어로 자세히 묘사해 주세요. 색깔과 모양을 포함해서."]
    batched = cap.caption_features(feats, users=users, max_new_tokens=8)
    single = [cap.caption_features(feats[i : i + 1], users=[users[i]], max_new_tokens=8)[0] for i in range(2)]
    assert batched == single
    assert all(isinstance(c, str) and c for c in batched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rms_is_over_the_used_rows(dtype):
    """fp64 reference over the 151,669 used rows only (the padded rows past them are left out)."""
    emb = torch.nn.Embedding(VOCAB_SIZE + 267, 64)
    with torch.no_grad():
        emb.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
        emb.weight[VOCAB_SIZE:] = 100.0  # unused rows: must not count
    emb.to(dtype)
    decoder = torch.nn.Module()
    decoder.get_input_embeddings = lambda: emb
    want = emb.weight[:VOCAB_SIZE].double().pow(2).mean().sqrt().item()
    assert embedding_rms(decoder) == pytest.approx(want, rel=1e-6)
