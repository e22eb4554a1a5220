"""Korean text of the synthetic corpus: attribute vocabulary, particles chosen by batchim, caption
templates, and `parse_attributes`, which recovers the attributes from a caption for scoring.

`VOCAB` is the single definition of the attribute values; the renderer (`data.synth`), the evaluator
and the demo import it from here (also re-exported as `data.synth.VOCAB`).
"""

from __future__ import annotations

import re

HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
RIEUL_FINAL = 8  # index of ㄹ among the 28 final-consonant slots


def final_consonant(word: str) -> int:
    """Index (1..27) of the last syllable's final consonant (batchim), 0 if it has none."""
    code = ord(word[-1])
    if not HANGUL_FIRST <= code <= HANGUL_LAST:
        raise ValueError(f"{word!r} does not end with a Hangul syllable")
    return (code - HANGUL_FIRST) % 28


def i_ga(word: str) -> str:
    """Subject particle: 이 after a batchim (원이), 가 after a vowel (하나가)."""
    return word + ("이" if final_consonant(word) else "가")


def eun_neun(word: str) -> str:
    """Topic particle: 은 after a batchim (원은), 는 after a vowel (하나는)."""
    return word + ("은" if final_consonant(word) else "는")


def euro(word: str) -> str:
    """Direction particle: 으로 after a batchim (오른쪽으로), 로 after a vowel or ㄹ (아래로, 위로)."""
    fc = final_consonant(word)
    return word + ("으로" if fc and fc != RIEUL_FINAL else "로")


# Colours are adjectives/nouns used before the shape noun; RGB is what the renderer paints. Hues are
# far apart so that they stay unambiguous after H.264 4:2:0 chroma subsampling at 64 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "빨간": (225, 40, 40),
    "파란": (50, 100, 240),
    "초록": (40, 190, 70),
    "노란": (240, 215, 40),
}
SHAPES: tuple[str, ...] = ("원", "사각형", "삼각형")
# (from, to) sides of the frame; the unit vector is the direction of motion in image coordinates (x, y).
_MOTION_SIDES: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("왼쪽", "오른쪽", (1, 0)),
    ("오른쪽", "왼쪽", (-1, 0)),
    ("위", "아래", (0, 1)),
    ("아래", "위", (0, -1)),
)
MOTIONS: dict[str, tuple[int, int]] = {f"{a}에서 {euro(b)}": d for a, b, d in _MOTION_SIDES}

VOCAB: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "motion": tuple(MOTIONS),
}

# Paraphrases of one meaning. {S_i_ga} etc. are the shape noun with its particle, picked by batchim.
# None of the fixed words contains a vocabulary word (e.g. no "위에서" outside the motion phrase).
TEMPLATES: tuple[str, ...] = (
    "{c} {S_i_ga} {m} 움직인다.",
    "{c} {S_i_ga} 화면을 {m} 가로지른다.",
    "{c} {S_eun_neun} {m} 이동한다.",
    "{m} 움직이는 {c} {S_i_ga} 보인다.",
    "어두운 배경에서 {c} {S} 하나가 {m} 움직이고 있다.",
    "영상 속 {c} {S_i_ga} {m} 이동하고 있다.",
)


def make_caption(color: str, shape: str, motion: str, template: int) -> str:
    """Caption for one attribute triple with paraphrase `template` (index into TEMPLATES)."""
    for key, value in (("color", color), ("shape", shape), ("motion", motion)):
        if value not in VOCAB[key]:
            raise ValueError(f"unknown {key} {value!r}; known: {VOCAB[key]}")
    return TEMPLATES[template].format(
        c=color, m=motion, S=shape, S_i_ga=i_ga(shape), S_eun_neun=eun_neun(shape)
    )


_PARTICLES = "(?:이|가|은|는|을|를|의|도|만)?"
_COLOR_RE = re.compile(r"(?<![가-힣])(" + "|".join(COLORS) + r")(?:색(?:의|인)?)?(?![가-힣])")
_SHAPE_RE = re.compile(
    r"(?<![가-힣])(" + "|".join(sorted(SHAPES, key=len, reverse=True)) + ")" + _PARTICLES + r"(?![가-힣])"
)
_SIDES = "|".join(sorted({s for a, b, _ in _MOTION_SIDES for s in (a, b)}, key=len, reverse=True))
_MOTION_RE = re.compile(rf"(?<![가-힣])({_SIDES})에서\s+({_SIDES})(?:으로|로)(?![가-힣])")


def _only(values: list[str]) -> str | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None  # none found, or contradictory


def parse_attributes(caption: str) -> dict[str, str | None]:
    """{"color", "shape", "motion"} named in a caption (any template, or model output).

    A value is None when the caption names none or several different ones, so a vague or
    contradictory caption never scores as correct.
    """
    import unicodedata

    text = unicodedata.normalize("NFC", caption)
    motions = [f"{a}에서 {euro(b)}" for a, b in _MOTION_RE.findall(text)]
    return {
        "color": _only(_COLOR_RE.findall(text)),
        "shape": _only(_SHAPE_RE.findall(text)),
        "motion": _only([m for m in motions if m in MOTIONS]),
    }
