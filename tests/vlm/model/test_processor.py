"""The processor owns the text: Qwen3 chat prompt, labels, caption cap, padding sides, decoding."""

from __future__ import annotations

import pytest
import torch

from vlm.config.schema import PromptConfig
from vlm.model.processor import IGNORE, Processor
from vlm.model.tokenizer import VIDEO_PAD_ID, load_tokenizer

CAPTIONS = ["빨간 원.", "파란 사각형이 위에서 아래로 천천히 이동한다."]
PROMPT = PromptConfig(
    style="detailed",
    system="당신은 비디오 캡셔닝 전문가입니다.",
    user="이 영상을 한국어로 자세히 묘사해 주세요.",
)


@pytest.fixture(scope="module")
def proc():
    return Processor(load_tokenizer(), PROMPT, max_caption_tokens=128)


def test_prompt_is_the_chat_template(proc):
    assert proc.tokenizer.decode(proc.prompt_ids(3)) == (
        "<|im_start|>system\n당신은 비디오 캡셔닝 전문가입니다.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|video_pad|><|vision_end|>\n"
        "이 영상을 한국어로 자세히 묘사해 주세요.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert proc.prompt_length() == len(proc.prompt_ids(3)) - 3


def test_labels_are_caption_plus_im_end_right_padded(proc):
    text = proc.train_batch(CAPTIONS, 16)
    ids, mask, labels = text.input_ids, text.attention_mask, text.labels
    for i, cap in enumerate(CAPTIONS):
        labelled = labels[i][labels[i] != IGNORE].tolist()
        assert proc.tokenizer.decode(labelled) == cap + "<|im_end|>"
        keep = labels[i] != IGNORE
        assert torch.equal(labels[i][keep], ids[i][keep])  # labels are the input ids at the same positions
        assert bool((labels[i][mask[i] == 0] == IGNORE).all())  # padding is neither attended nor labelled
        assert int((ids[i] == VIDEO_PAD_ID).sum()) == 16
    assert mask[:, 0].tolist() == [1, 1] and mask[0, -1] == 0 and mask[1, -1] == 1  # right padding


def test_caption_cap_is_a_setting(proc):
    short = Processor(proc.tokenizer, PROMPT, max_caption_tokens=3)
    text = short.train_batch(CAPTIONS, 4)
    assert [int((row != IGNORE).sum()) for row in text.labels] == [4, 4]  # 3 tokens + <|im_end|>
    full = proc.train_batch(CAPTIONS, 4)
    assert all(int((row != IGNORE).sum()) > 4 for row in full.labels)


def test_generation_batch_is_left_padded(proc):
    text = proc.generation_batch(
        8, 2, users=["짧게.", "이 영상을 한국어로 자세히 묘사해 주세요. 색깔과 모양을 포함해서."]
    )
    assert text.labels is None
    assert bool(text.attention_mask[:, -1].all())  # every row ends at the assistant header
    assert (
        text.attention_mask[0, 0] == 0 and text.attention_mask[1, 0] == 1
    )  # the shorter row is padded on the left
    assert proc.tokenizer.decode(text.input_ids[0][text.attention_mask[0] == 1].tolist()).endswith(
        "</think>\n\n"
    )


def test_vision_text_replaces_the_video_run(proc):
    ids = proc.prompt_ids(0, vision_text="빨간 원 오른쪽")
    assert "<|vision_start|>빨간 원 오른쪽<|vision_end|>" in proc.tokenizer.decode(ids)
    assert VIDEO_PAD_ID not in ids


def test_decode_stops_at_im_end_and_drops_think_blocks(proc):
    tok = proc.tokenizer
    row = tok("<think>\n음...\n</think>\n\n빨간 원<|im_end|>쓰레기", add_special_tokens=False).input_ids
    assert proc.decode([row]) == ["빨간 원"]
    assert Processor.clean("빨간 원<think>끝나지 않은") == "빨간 원"
