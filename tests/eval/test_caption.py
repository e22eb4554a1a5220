"""Caption metrics: hand-computed BLEU / CIDEr-D values, Korean tokenization, attribute accuracy,
prediction-reference matching and the CLI's reports."""

from __future__ import annotations

import json
import math

import pytest

from eval.caption import attribute_accuracy, match_videos, run, score_captions, tokenize

CAPTIONS = {  # distinct captions of 4+ morphemes: every n-gram order has a rare n-gram
    "a": "빨간 원이 왼쪽에서 오른쪽으로 움직인다.",
    "b": "파란 사각형이 위에서 아래로 이동한다.",
    "c": "초록 삼각형은 화면을 가로지른다.",
}


def test_identical_captions_score_perfect():
    s = score_captions(CAPTIONS, {k: [v] for k, v in CAPTIONS.items()})
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert s[k] == pytest.approx(1.0, abs=1e-6), k
    # CIDEr-D of a caption equal to its only reference: cosine 1 for each n=1..4, times 10.
    assert s["CIDEr-D"] == pytest.approx(10.0)
    assert s["chrF"] == pytest.approx(100.0)
    assert (s["n"], s["tokenize"]) == (3, "morpheme")


def test_cider_d_hand_computed():
    """Two videos, N=2, idf(g) = log 2 - log df(g) (df 0 counts as 1); space tokens.
    1: hyp "x z" vs ref "x y": unigram cos = log2*log2 / (sqrt2*log2 * log2) = 1/sqrt2 (y has idf 0);
       bigrams share nothing; 3-/4-grams empty -> 10 * (1/sqrt2) / 4.
    2: hyp "y w w" vs ref "y w": unigram w has tf 2, clipped to the reference's weight:
       min(2log2, log2) * log2 / (2log2 * log2) = 1/2; bigrams {yw, ww} vs {yw}: 1/sqrt2;
       length penalty exp(-(2-1)^2 / (2 * 6^2)) on the bigram counts -> 10 * (1/2 + 1/sqrt2) / 4 * e^(-1/72).
    """
    s = score_captions({"1": "x z", "2": "y w w"}, {"1": ["x y"], "2": ["y w"]}, tokenize="space")
    want = (10 / (4 * math.sqrt(2)) + 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)) / 2
    assert s["CIDEr-D"] == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(2.37195509932820, rel=1e-12)


def test_particles_split_by_morphemes_not_by_spaces():
    assert tokenize("고양이가") == ["고양이", "가"] and tokenize("고양이는") == ["고양이", "는"]
    assert tokenize("고양이가", "space") == ["고양이가"]
    assert tokenize("고양이가 잔다.", "char") == ["고", "양", "이", "가", "잔", "다"]
    assert tokenize("고양이가 잔다.", "space") == ["고양이가", "잔다"]  # punctuation dropped in every mode
    pred, ref = {"v": "고양이가 잔다"}, {"v": ["고양이는 잔다"]}
    # morphemes 고양이 가 자 ㄴ다 vs 고양이 는 자 ㄴ다: 3 of 4 unigrams match; words: 1 of 2 (잔다).
    assert score_captions(pred, ref)["BLEU-1"] == pytest.approx(0.75, abs=1e-6)
    assert score_captions(pred, ref, "space")["BLEU-1"] == pytest.approx(0.5, abs=1e-6)
    chars = score_captions(pred, ref, "char")["BLEU-1"]
    assert chars == pytest.approx(5 / 6, abs=1e-6)  # 고 양 이 _ 잔 다: 5 of 6 syllables
    with pytest.raises(ValueError, match="tokenize='bpe'"):
        tokenize("x", "bpe")


def test_several_references_and_empty_prediction():
    refs = {"a": ["전혀 다른 문장이다", CAPTIONS["a"]], "b": [CAPTIONS["b"]]}
    s = score_captions({"a": CAPTIONS["a"], "b": CAPTIONS["b"]}, refs)
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # the matching reference counts
    empty = score_captions({"a": ""}, {"a": [CAPTIONS["a"]]})
    assert empty["BLEU-1"] < 1e-6 and empty["ROUGE-L"] == 0.0 and empty["chrF"] == 0.0
    with pytest.raises(ValueError, match="no reference"):
        score_captions({"z": "x"}, {"a": ["x"]})


def test_attribute_accuracy():
    gold = {"color": "빨간", "shape": "원", "motion": "왼쪽에서 오른쪽으로"}
    attrs = {k: gold for k in "pqrs"}
    preds = {
        "p": "빨간 원이 왼쪽에서 오른쪽으로 움직인다.",  # all right
        "q": "파란 원이 왼쪽에서 오른쪽으로 움직인다.",  # wrong colour
        "r": "빨간 파란 원이 왼쪽에서 오른쪽으로 이동한다.",  # two colours: vague, wrong
        "s": "빨간 원이 보인다.",  # no motion
    }
    assert attribute_accuracy(preds, attrs) == {
        "all": 0.25,
        "color": 0.5,
        "motion": 0.75,
        "shape": 1.0,
        "n": 4,
    }


def test_match_videos_by_path_suffix():
    refs = ["videos/val/000001.mp4", "videos/val/000002.mp4", "videos/train/000001.mp4"]
    pairs, unmatched, missing = match_videos(["val/000001.mp4", "000001.mp4", "val/000009.mp4"], refs)
    assert pairs == {"val/000001.mp4": "videos/val/000001.mp4"}
    assert unmatched == ["000001.mp4", "val/000009.mp4"]  # ambiguous tail; unknown video
    assert missing == ["videos/val/000002.mp4", "videos/train/000001.mp4"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_cli_writes_reports(compose, tmp_path):
    refs = tmp_path / "val.jsonl"
    _write_jsonl(
        refs,
        [
            {"video": "videos/val/000000.mp4", "caption": CAPTIONS["a"], "attributes": {"color": "빨간", "shape": "원", "motion": "왼쪽에서 오른쪽으로"}},
            {"video": "videos/val/000001.mp4", "caption": CAPTIONS["b"], "attributes": {"color": "파란", "shape": "사각형", "motion": "위에서 아래로"}},
            {"video": "videos/val/000002.mp4", "caption": CAPTIONS["c"], "attributes": {"color": "초록", "shape": "삼각형", "motion": "오른쪽에서 왼쪽으로"}},
        ],
    )  # fmt: skip
    preds = tmp_path / "pred.jsonl"
    _write_jsonl(
        preds,
        [
            {"video": "val/000000.mp4", "caption": CAPTIONS["a"], "error": None},
            {"video": "val/000001.mp4", "caption": None, "error": "decode failed"},
            {
                "video": "val/000002.mp4",
                "caption": "초록 삼각형이 오른쪽에서 왼쪽으로 움직인다.",
                "error": None,
            },
        ],
    )
    out = tmp_path / "e" / "caption.json"
    res = run(compose("caption_eval", [f"predictions={preds}", f"references={refs}", f"output={out}"]))
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D", "chrF", "n", "tokenize"} <= set(
        saved
    )
    assert saved["n"] == 3 and saved["tokenize"] == "morpheme" and saved["CIDEr-D"] == res["CIDEr-D"]
    assert saved["attributes"] == {"all": 2 / 3, "color": 2 / 3, "motion": 2 / 3, "shape": 2 / 3, "n": 3}
    assert saved["matching"]["matched"] == 3 and saved["matching"]["errors"] == 1
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| CIDEr-D |" in md and "| attributes: all | 0.6667 |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    space = run(
        compose(
            "caption_eval", [f"predictions={preds}", f"references={refs}", f"output={out}", "tokenize=space"]
        )
    )
    assert space["tokenize"] == "space" and space["BLEU-1"] != res["BLEU-1"]


def test_bad_line_is_named(tmp_path):
    from eval.caption import read_references

    bad = tmp_path / "refs.jsonl"
    bad.write_text('{"video": "a.mp4", "caption": "좋다"}\n{"video": "b.mp4"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"refs\.jsonl:2: not JSON"):
        read_references(bad)
