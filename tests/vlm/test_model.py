"""The VLM on tiny real classes: shapes, prompt/labels, placeholder checks, NF4, LoRA, generation."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from vlm.build import build_vlm
from vlm.model import VLM
from vlm.tokenizer import VIDEO_PAD_ID

CAPTIONS = ["빨간 원이 왼쪽에서 오른쪽으로 움직인다.", "파란 사각형이 위에서 아래로 이동한다."]


@pytest.fixture(scope="module")
def stage2(compose):
    torch.manual_seed(0)
    cfg = compose("train", ["train=stage2_lora", "train.lora_cfg.r=8"])
    return build_vlm(cfg)


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8, generator=g)  # (B, T, H, W, 3)


def test_shapes_through_every_stage(stage2, frames):
    feats = stage2.encode(frames)
    grid = stage2.vision.grid
    assert feats.shape == (2, 4, grid[0] * grid[1], stage2.vision.out_dim)  # (B, T, P, Dv)
    visual = stage2.projector(feats)
    k = stage2.projector.tokens_per_frame
    assert visual.shape == (2, 4 * k, stage2.decoder.config.hidden_size)  # (B, T*K, D)
    ids, mask, labels = stage2.training_batch(CAPTIONS, visual.shape[1])
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    assert int((ids[0] == VIDEO_PAD_ID).sum()) == 4 * k
    assert stage2.embed(ids, visual).shape == (*ids.shape, visual.shape[2])


def test_prompt_is_the_chat_template(stage2):
    ids = stage2.prompt_ids(3)
    text = stage2.tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\n당신은 비디오 캡셔닝 전문가입니다.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|video_pad|><|vision_end|>\n"
        "이 영상을 한국어로 자세히 묘사해 주세요.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_labels_are_caption_plus_im_end(stage2):
    ids, mask, labels = stage2.training_batch(CAPTIONS, 16)
    for i, cap in enumerate(CAPTIONS):
        labelled = labels[i][labels[i] != -100].tolist()
        assert stage2.tokenizer.decode(labelled) == cap + "<|im_end|>"
        # labels are the input ids at the same positions, and padding is neither attended nor labelled
        keep = labels[i] != -100
        assert torch.equal(labels[i][keep], ids[i][keep])
        assert bool((labels[i][mask[i] == 0] == -100).all())


def test_placeholder_mismatch_names_both_numbers(stage2):
    ids, _, _ = stage2.training_batch(CAPTIONS, 16)
    visual = torch.zeros(2, 12, stage2.decoder.config.hidden_size)
    with pytest.raises(ValueError, match="16 <\\|video_pad\\|> placeholders but the video gave 12"):
        stage2.embed(ids, visual)


def test_nf4_decoder_and_trainable_parameters(stage2):
    lin4 = [m for m in stage2.decoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(m.weight.quant_state.quant_type == "nf4" for m in lin4)
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or ".lora_" in n for n in trainable)
    lora = [n for n in trainable if ".lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B for each target in each layer
    n_proj = sum(p.numel() for p in stage2.projector.parameters())
    n_lora = sum(p.numel() for n, p in stage2.named_parameters() if n in lora)
    cfg = stage2.decoder.config
    per_layer = 8 * (  # r=8: A is (r, in), B is (out, r)
        (cfg.hidden_size + cfg.num_attention_heads * cfg.head_dim) * 2  # q, o
        + (cfg.hidden_size + cfg.num_key_value_heads * cfg.head_dim) * 2  # k, v
        + (cfg.hidden_size + cfg.intermediate_size) * 3  # gate, up, down
    )
    assert n_lora == cfg.num_hidden_layers * per_layer
    print(f"stage 2 trainable parameters: projector {n_proj} + LoRA {n_lora} = {n_proj + n_lora}")


def test_label_only_logits_equal_full_logits_loss(stage2, frames):
    """Applying the head only at labelled positions gives the same loss as the full logits."""
    feats = stage2.encode(frames)
    with torch.no_grad():
        ours = stage2.loss(feats, CAPTIONS)
        visual = stage2.projector(feats)
        ids, mask, labels = stage2.training_batch(CAPTIONS, visual.shape[1])
        logits = stage2.causal_lm(inputs_embeds=stage2.embed(ids, visual), attention_mask=mask).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
        )
    assert torch.allclose(ours, full, atol=1e-5)


def test_batched_greedy_equals_one_by_one(stage2, frames):
    feats = stage2.encode(frames)
    prompts = ["짧게 설명해 주세요.", "이 영상을 한국어로 자세히 묘사해 주세요. 색깔과 모양을 포함해서."]
    batched = stage2.generate(feats, prompts=prompts, max_new_tokens=8)
    single = [stage2.generate(feats[i : i + 1], prompts=[prompts[i]], max_new_tokens=8)[0] for i in range(2)]
    assert batched == single
    assert all(isinstance(c, str) and c for c in batched)


def test_think_blocks_are_dropped():
    assert VLM.clean("<think>\n음...\n</think>\n\n빨간 원") == "빨간 원"
    assert VLM.clean("빨간 원<think>끝나지 않은") == "빨간 원"
