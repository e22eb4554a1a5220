"""The tiny VLM on CUDA: a training step and batched generation in bf16 and fp16 (the T4 tier's dtype).

The tiny parts (cpu tier: tiny random Qwen3 in NF4 with LoRA r=64, tiny open_clip ViT) are built once in
fp32 on the CPU, where the loss is the reference; then moved to the GPU and run under autocast, as
Lightning's `bf16-mixed` / `16-mixed` do.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def build(typed):
    from vlm.model.build import build_vlm

    torch.manual_seed(0)
    cfg = typed("train", ["train=stage2_lora", "train.lora.dropout=0.0", "data.num_frames=2"])
    return cfg, *build_vlm(cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_on_cuda(typed, dtype):
    cfg, vlm, proc = build(typed)
    s = cfg.vision.image_size
    frames = torch.randint(
        0, 256, (3, 2, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    text = proc.train_batch(
        ["빨간 원이 오른쪽으로 움직인다.", "파란 사각형", "초록 삼각형이 회전한다."],
        vlm.projector.num_tokens(2),
    )
    args = (text.input_ids, text.attention_mask, text.labels)
    with torch.no_grad():
        ref = vlm.loss(vlm.encode(frames), *args).item()  # fp32 on the CPU
    vlm = vlm.cuda()
    params = [p for p in vlm.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        loss = vlm.loss(vlm.encode(frames.cuda()), *args)
    scaler.scale(loss).backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().abs().sum()) for g in grads) > 0
    scaler.step(opt)
    scaler.update()
    assert loss.is_cuda and abs(loss.item() - ref) <= 0.05 * abs(ref), (loss.item(), ref)
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_generation_on_cuda(typed, dtype):
    from vlm.model.captioner import VideoCaptioner

    _, vlm, proc = build(typed)
    vlm = vlm.cuda()
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, 2, vlm.vision.grid[0] * vlm.vision.grid[1], vlm.vision.width, generator=g)
    feats = torch.cat([one, one, torch.randn(one.shape, generator=g)]).cuda()  # rows 0 and 1 identical
    text = proc.generation_batch(vlm.projector.num_tokens(2), 3)
    with torch.autocast("cuda", dtype=dtype):
        ids = vlm.generate(
            feats, text.input_ids, text.attention_mask, proc.stop_ids, proc.pad_id, max_new_tokens=6
        )
        caps = VideoCaptioner(vlm, proc).caption_features(feats, max_new_tokens=6)
    assert ids.is_cuda and ids.shape[0] == 3 and 1 <= ids.shape[1] <= 6
    assert int(ids.max()) < vlm.causal_lm.config.vocab_size
    assert torch.equal(ids[0], ids[1])  # a row's output does not depend on the other rows
    assert len(caps) == 3 and caps[0] == caps[1] and all(isinstance(c, str) for c in caps)
