"""Agreement with lm-evaluation-harness run on its own: lm-eval loading the tiny Qwen3 checkpoint and
tokenizer from disk (tests/eval/lmeval_reference.py, its `kmmlu` task config pointed at the fixture)
and `eval.kmmlu` handing lm-eval our loaded decoder and generated task files build the same contexts,
the same log-likelihoods and so the same answers and accuracies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.kmmlu import aggregate, lm_eval_samples, load_model_and_tokenizer
from eval.kmmlu_tasks import category_of
from vlm.config import to_typed

SUBJECTS = ["Math", "Korean-History", "Geomatics", "Fashion"]


@pytest.mark.slow
def test_same_answers_as_lm_eval(compose, tiny_model_dir, tokenizer, kmmlu_dir, tmp_path):
    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1"}
    script = Path(__file__).with_name("lmeval_reference.py")
    cmd = [
        sys.executable,
        str(script),
        str(tiny_model_dir),
        str(tok_dir),
        str(kmmlu_dir),
        str(out),
        *SUBJECTS,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(out.read_text(encoding="utf-8"))

    # ours: the training loader (float32, no quantization, to compare log-likelihoods closely)
    cfg = to_typed(compose("kmmlu", [f"model.name_or_path={tiny_model_dir}", "model.quantize=none"]))
    model, tok = load_model_and_tokenizer(cfg)
    samples, _ = lm_eval_samples(model, tok, kmmlu_dir, SUBJECTS, num_fewshot=5, batch_size=3)
    ours = aggregate(samples, {s: category_of(s) for s in SUBJECTS})
    for subject in SUBJECTS:
        mine = sorted(samples[subject], key=lambda s: s["doc_id"])
        assert [s["arguments"][0][0] for s in mine] == ref[subject]["contexts"], subject  # prompts and shots
        assert all(c == [" A", " B", " C", " D"] for c in ref[subject]["continuations"])
        for q, (s, theirs) in enumerate(zip(mine, ref[subject]["lls"], strict=True)):
            assert [r[0] for r in s["filtered_resps"]] == pytest.approx(theirs, abs=1e-4), (subject, q)
        ref_pred = "".join("ABCD"[max(range(4), key=lambda j, r=r: (r[j], -j))] for r in ref[subject]["lls"])
        assert ours["per_subject"][subject]["pred"] == ref_pred, subject
        assert ours["per_subject"][subject]["acc"] == pytest.approx(ref[subject]["acc"], abs=1e-12)
    # the random tiny model answers C almost everywhere, so the log-likelihoods above are the sharp check:
    # they differ between questions, so scoring another prompt would not pass unnoticed
    lls = [tuple(round(x, 3) for x in r) for subject in SUBJECTS for r in ref[subject]["lls"]]
    assert len(set(lls)) == len(lls) == 29
