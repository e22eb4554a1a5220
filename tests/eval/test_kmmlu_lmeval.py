"""Agreement with lm-evaluation-harness itself: its `kmmlu` task config and HFLM, run on the same tiny
Qwen3 checkpoint, tokenizer and KMMLU-layout fixture, build the same contexts and choose the same answer
for every question (log-likelihoods equal to float32 noise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.kmmlu import choose_loglik, evaluate
from eval.kmmlu_data import fewshot_contexts, load_subject

SUBJECTS = ["Math", "Korean-History", "Geomatics", "Fashion"]


@pytest.mark.slow
def test_same_answers_as_lm_eval(tiny_model_dir, tokenizer, kmmlu_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval is pinned in requirements.txt; run `make venv`")
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

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = evaluate(model, tokenizer, kmmlu_dir, num_fewshot=5, batch_size=3)
    for subject in SUBJECTS:
        test, dev = load_subject(subject, kmmlu_dir)
        contexts = fewshot_contexts(test, dev, 5)
        assert contexts == ref[subject]["contexts"], subject  # prompt, shots, order, number formatting
        assert all(c == [" A", " B", " C", " D"] for c in ref[subject]["continuations"])
        picks, lls = choose_loglik(model, tokenizer, contexts, batch_size=3, max_length=None)
        for q, (mine, theirs) in enumerate(zip(lls, ref[subject]["lls"], strict=True)):
            assert mine == pytest.approx(theirs, abs=1e-4), (subject, q)
        ref_picks = [max(range(4), key=lambda j, r=r: (r[j], -j)) for r in ref[subject]["lls"]]
        assert picks == ref_picks, subject
        assert "".join("ABCD"[p] for p in picks) == ours["per_subject"][subject]["pred"]
        assert ours["per_subject"][subject]["acc"] == pytest.approx(ref[subject]["acc"])
