"""Caption metrics for Korean: BLEU-1..4, ROUGE-L, CIDEr-D, chrF, and attribute accuracy (synthetic corpus).

    python -m eval.caption predictions=outputs/captions/val.jsonl references=outputs/synth/val.jsonl

BLEU, ROUGE-L and CIDEr-D are pycocoevalcap's own scorers (`Bleu(4)`, `Rouge()`, `Cider()`), fed text that
is already tokenized for Korean and joined by spaces. pycocoevalcap's `Cider` is CIDEr-D: tf-idf n-gram
vectors (n=1..4) with the hypothesis counts clipped to the reference's (`min(vec_hyp, vec_ref)`), a Gaussian
length penalty (sigma 6) and x10, averaged over references. Its PTB tokenizer, METEOR and SPICE are English-
only and need Java, so they are not used. Tokenization (`tokenize=`):
- `morpheme` (default): kiwipiepy morphemes, so particles and endings are their own tokens
  (고양이가 -> 고양이 가; 고양이가 and 고양이는 share 고양이);
- `space`: whitespace words (고양이가 and 고양이는 are different words);
- `char`: Hangul syllables / characters.
Punctuation tokens are dropped in every mode, as pycocoevalcap's PTB tokenizer drops them. chrF (sacrebleu,
character 6-grams, beta 2) needs no tokenization and sees the NFC text. Scales: BLEU, ROUGE-L in [0, 1],
CIDEr-D in [0, 10] (papers print x100), chrF in [0, 100].
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval import report
from vlm.util.errors import UsageError
from vlm.util.jsonl import read_jsonl

log = logging.getLogger(__name__)
TOKENIZERS = ("morpheme", "space", "char")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D", "chrF")
_PUNCT_TAGS = {"SF", "SP", "SS", "SSO", "SSC", "SE", "SO", "SW"}  # kiwi's punctuation / symbol tags


@functools.lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi()  # ~1 s to load its model; one per process


def _is_punct(s: str) -> bool:
    return all(unicodedata.category(c).startswith(("P", "S")) for c in s)


def tokenize(text: str, mode: str = "morpheme") -> list[str]:
    """Tokens of one caption (NFC) for the n-gram metrics; punctuation dropped."""
    text = unicodedata.normalize("NFC", text).strip()
    if mode == "morpheme":
        return [t.form for t in _kiwi().tokenize(text) if t.tag not in _PUNCT_TAGS] if text else []
    if mode == "space":
        words = [w.strip("".join(c for c in w if _is_punct(c))) for w in text.split()]
        return [w for w in words if w]
    if mode == "char":
        return [c for c in text if not c.isspace() and not _is_punct(c)]
    raise ValueError(f"tokenize={mode!r}: expected one of {TOKENIZERS}")


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    tokenize: str = "morpheme",
) -> dict[str, Any]:
    """Corpus BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap) and chrF (sacrebleu) of predictions[k] against
    references[k] (one or more each). Every prediction needs references; an empty caption scores 0."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from sacrebleu.metrics import CHRF

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no reference, e.g. {missing[:3]}")
    mode = tokenize
    keys = list(predictions)
    res = {k: [" ".join(_tokenize(predictions[k], mode))] for k in keys}
    gts = {k: [" ".join(_tokenize(r, mode)) for r in references[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)

    hyps = [unicodedata.normalize("NFC", predictions[k]).strip() for k in keys]
    n_refs = max(len(references[k]) for k in keys)
    streams = [
        [
            unicodedata.normalize("NFC", references[k][i]).strip() if i < len(references[k]) else None
            for k in keys
        ]
        for i in range(n_refs)
    ]  # sacrebleu: one stream per reference slot; None where a video has fewer references
    chrf = CHRF().corpus_score(hyps, streams).score
    scores = dict(zip(METRICS, [*map(float, bleu), float(rouge), float(cider), float(chrf)], strict=True))
    return {**scores, "n": len(keys), "tokenize": mode}


_tokenize = tokenize  # score_captions' argument shadows the function's name


def attribute_accuracy(
    predictions: Mapping[str, str], attributes: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """Share of predictions naming the right colour, shape, motion (each, and all three) per
    `data.synth.parse_attributes`; a caption naming none or several values of an attribute is wrong."""
    from data.synth import parse_attributes

    keys = [k for k in predictions if k in attributes]
    if not keys:
        raise ValueError("no prediction has attributes to compare with")
    names = sorted({a for k in keys for a in attributes[k]})
    right = dict.fromkeys(names, 0)
    all_right = 0
    for k in keys:
        got = parse_attributes(predictions[k])
        ok = [got.get(a) == attributes[k].get(a) for a in names]
        for a, o in zip(names, ok, strict=True):
            right[a] += o
        all_right += all(ok)
    return {"all": all_right / len(keys), **{a: right[a] / len(keys) for a in names}, "n": len(keys)}


# --- files -------------------------------------------------------------------------------------------


def _jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL file; a damaged line or a missing file is a UsageError naming it."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    contents = read_jsonl(path)
    if contents.damaged:
        n, why = contents.damaged[0]
        raise UsageError(f"{path}:{n}: {why}")
    if contents.torn:
        log.warning("%s: ignoring a torn last line (a writer was killed mid-line)", path)
    for n, obj in contents.records:
        if not isinstance(obj.get("video"), str):
            raise UsageError(f'{path}:{n}: expected an object with a "video" path')
    return contents.records


def _norm(p: str) -> str:
    p = p.replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def read_predictions(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """({video: caption}, {video: error}) from the captioner's JSONL; a failed video scores as empty."""
    preds, errors = {}, {}
    for line_no, obj in _jsonl(path):
        video = _norm(obj["video"])
        if obj.get("error"):
            errors[video] = str(obj["error"])
        caption = obj.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise UsageError(f'{path}:{line_no}: "caption" must be a string')
        preds[video] = caption or ""  # reruns append: the last line for a video wins
    return preds, errors


def read_references(path: str | Path) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """({video: [captions]}, {video: attributes}) from the dataset's JSONL; lines of one video merge."""
    refs: dict[str, list[str]] = {}
    attrs: dict[str, dict[str, str]] = {}
    for line_no, obj in _jsonl(path):
        caps = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UsageError(f'{path}:{line_no}: needs a non-empty "caption" or "captions"')
        video = _norm(obj["video"])
        refs.setdefault(video, []).extend(caps)
        if isinstance(obj.get("attributes"), dict):
            attrs[video] = obj["attributes"]
    return refs, attrs


def match_videos(
    pred_keys: Sequence[str], ref_keys: Sequence[str]
) -> tuple[dict[str, str], list[str], list[str]]:
    """Pair prediction paths with reference paths: equal, or one a path suffix of the other
    (`val/000001.mp4` ~ `videos/val/000001.mp4`). Returns (pred -> ref, unmatched preds, refs without pred)."""
    refs = set(ref_keys)
    by_tail: dict[str, list[str]] = {}
    for r in ref_keys:
        parts = r.split("/")
        for i in range(len(parts)):
            by_tail.setdefault("/".join(parts[i:]), []).append(r)
    pairs: dict[str, str] = {}
    unmatched = []
    for p in pred_keys:
        if p in refs:
            pairs[p] = p
            continue
        parts = p.split("/")
        # the longest tail of the prediction path that names exactly one reference
        cands = next((by_tail[t] for i in range(len(parts)) if (t := "/".join(parts[i:])) in by_tail), [])
        if len(cands) == 1:
            pairs[p] = cands[0]
        else:
            unmatched.append(p)
    used = set(pairs.values())
    return pairs, unmatched, [r for r in ref_keys if r not in used]


def evaluate_files(
    predictions: str | Path,
    references: str | Path,
    tokenize: str = "morpheme",
    attributes: str | bool = "auto",
) -> dict[str, Any]:
    """Metrics of a captioner's JSONL against a dataset JSONL, with the matching reported."""
    preds, errors = read_predictions(predictions)
    refs, attrs = read_references(references)
    pairs, unmatched, missing = match_videos(list(preds), list(refs))
    if unmatched:
        log.warning("%d prediction(s) match no reference, e.g. %s", len(unmatched), unmatched[:3])
    if missing:
        log.warning("%d reference video(s) have no prediction, e.g. %s", len(missing), missing[:3])
    if not pairs:
        raise UsageError(f"no prediction in {predictions} matches a video in {references}")
    matched = {r: preds[p] for p, r in pairs.items()}
    result = score_captions(matched, refs, tokenize)
    use_attrs = bool(attrs) if attributes == "auto" else bool(attributes)
    if use_attrs:
        result["attributes"] = attribute_accuracy(matched, attrs)
    result["matching"] = {
        "matched": len(pairs),
        "errors": len([p for p in pairs if p in errors]),  # scored as empty captions
        "unmatched_predictions": len(unmatched),
        "missing_predictions": len(missing),
        "examples_unmatched": unmatched[:5],
        "examples_missing": missing[:5],
    }
    result["settings"] = {"predictions": str(predictions), "references": str(references)}
    return result


def write_report(result: dict[str, Any], output: str | Path) -> dict[str, Path]:
    m = result["matching"]
    md = f"# Caption metrics (tokenize={result['tokenize']}, n={result['n']})\n\n"
    md += f"`{result['settings']['predictions']}` vs `{result['settings']['references']}`: {m['matched']} matched, "
    md += (
        f"{m['errors']} failed captions scored as empty, {m['unmatched_predictions']} predictions without a "
    )
    md += f"reference, {m['missing_predictions']} references without a prediction.\n\n"
    rows = [[k, result[k]] for k in METRICS]
    if "attributes" in result:
        a = result["attributes"]
        rows += [[f"attributes: {k}", a[k]] for k in a if k != "n"]
    md += report.markdown_table(["metric", "value"], rows)
    md += "\nScales: BLEU, ROUGE-L, attribute accuracy in [0, 1]; CIDEr-D in [0, 10]; chrF in [0, 100].\n"
    labels = list(METRICS) + (
        [f"attr {k}" for k in result["attributes"] if k != "n"] if "attributes" in result else []
    )
    values = [
        result[k] * (1 if k == "chrF" else 100) for k in METRICS
    ]  # one axis: everything as a percentage
    if "attributes" in result:
        values += [100 * v for k, v in result["attributes"].items() if k != "n"]
    return {
        "json": report.write_json(output, result),
        "md": report.write_text(report.sibling(output, ".md"), md),
        "png": report.bar_chart(
            report.sibling(output, ".png"),
            labels,
            values,
            title=f"captions, tokenize={result['tokenize']}, n={result['n']}",
            ylabel="x100 (chrF as is)",
            colors=["#4C72B0"] * len(METRICS) + ["#DD8452"] * (len(labels) - len(METRICS)),
        ),
    }


def run(cfg: Any) -> dict[str, Any]:
    from vlm.config import to_typed

    cfg = to_typed(cfg)
    if cfg.tokenize not in TOKENIZERS:
        raise UsageError(f"tokenize={cfg.tokenize}: expected one of {', '.join(TOKENIZERS)}")
    if cfg.attributes not in ("auto", "true", "false"):
        raise UsageError(f"attributes={cfg.attributes}: expected auto, true or false")
    attributes = cfg.attributes if cfg.attributes == "auto" else cfg.attributes == "true"
    result = evaluate_files(cfg.predictions, cfg.references, cfg.tokenize, attributes)
    result["files"] = {k: str(v) for k, v in write_report(result, cfg.output).items()}
    return result


def main(cfg: Any) -> int:
    result = run(cfg)
    print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    from vlm.util.cli import hydra_cli

    hydra_cli("caption_eval", main, "python -m eval.caption predictions=CAPTIONS.jsonl references=REFS.jsonl")
