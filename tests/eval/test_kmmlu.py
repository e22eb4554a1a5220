"""KMMLU: lm-eval's prompt, few-shot draws and column typing; log-likelihoods against a full-logits
reference; a tiny Qwen3 rigged to always answer " B" scores exactly the share of B answers; the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from eval.kmmlu import choose_loglik, encode_pair, evaluate, load_model_and_tokenizer, loglikelihoods, run
from eval.kmmlu_data import CATEGORIES, SUBJECT_CATEGORY, fewshot_contexts, load_subject

GOLD_B = {"Math": (2, 10), "Korean-History": (3, 8), "Geomatics": (3, 6), "Fashion": (2, 5)}  # (B answers, n)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_subject_groups_match_lm_eval():
    assert len(SUBJECT_CATEGORY) == 45
    counts = {c: sum(v == c for v in SUBJECT_CATEGORY.values()) for c in CATEGORIES}
    assert counts == {"STEM": 11, "Applied Science": 12, "HUMSS": 11, "Other": 11}
    assert SUBJECT_CATEGORY["Korean-History"] == "HUMSS" and SUBJECT_CATEGORY["Math"] == "STEM"
    assert SUBJECT_CATEGORY["Geomatics"] == "Applied Science" and SUBJECT_CATEGORY["Fashion"] == "Other"


def test_prompt_is_lm_eval_template(kmmlu_dir):
    test, _ = load_subject("Fashion", kmmlu_dir)
    assert (
        test[0].prompt() == "땀 흡수가 가장 좋은 소재는?\nA. 폴리에스터\nB. 면 \nC. 나일론\nD. 아크릴\n정답："
    )
    assert test[2].prompt().endswith("C. 미니\nD. None\n정답：")  # empty cell: null, printed by Jinja as None
    history, _ = load_subject("Korean-History", kmmlu_dir)
    assert history[1].prompt().startswith("거북선과 관련이 깊은 인물은?\nA. 강감찬\n")  # question stripped
    assert [q.answer for q in history] == [0, 1, 1, 2, 1, 2, 0, 3]


def test_option_types_follow_first_split(kmmlu_dir):
    """Math-train fixes A as text and B-D as decimals: dev's "3.00" in A prints "3", test's 9 in B "9.0"."""
    test, dev = load_subject("Math", kmmlu_dir)
    assert [str(o) for o in test[0].options] == ["8", "9.0", "11.0", "7.0"]
    assert dev[0].prompt().split("\n")[1:5] == [
        "A. 3",
        "B. 2.75",
        "C. 3.25",
        "D. 3.5",
    ]  # A: Arrow's 3.0 -> "3"
    assert dev[2].prompt().split("\n")[1:5] == [
        "A. 4.75",
        "B. 5.0",
        "C. 5.5",
        "D. 4.5",
    ]  # floats: Python repr
    _, fashion_dev = load_subject("Fashion", kmmlu_dir)  # no train file: dev is the first split
    assert fashion_dev[0].options == ("고름", "깃", "동정", "섶")


def test_fewshot_draws_follow_lm_eval_sampler(kmmlu_dir):
    """One Random(1234) per subject, `sample(dev, k)` once per test question in order; shots are
    `prompt + " " + letter + "\\n\\n"` before the question."""
    test, dev = load_subject("Korean-History", kmmlu_dir)
    contexts = fewshot_contexts(test, dev, 3)
    rnd = random.Random(1234)
    for q, ctx in zip(test, contexts, strict=True):
        idx = rnd.sample(range(len(dev)), 3)  # same draws on indices as on the documents
        shots = "".join(dev[i].prompt() + " " + "ABCD"[dev[i].answer] + "\n\n" for i in idx)
        assert ctx == shots + q.prompt()
    assert len({c.split("\n\n")[0] for c in contexts}) > 1  # the draw differs between questions
    assert fewshot_contexts(test, dev, 0) == [q.prompt() for q in test]
    with pytest.raises(ValueError, match="dev split has only 5"):
        fewshot_contexts(test, dev, 6)


def test_encode_pair_splits_like_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "문제\n정답：", " B")
    assert cont == tokenizer.encode(" B") and len(cont) == 1
    assert ctx == tokenizer.encode("문제\n정답：")
    ctx2, cont2 = encode_pair(tokenizer, "문제\n정답： ", "B")  # a trailing space moves to the continuation
    assert (ctx2, cont2) == (ctx, cont)


def _reference_loglik(model, tokenizer, context, continuation, max_length):
    """Straightforward: full logits over context+continuation, log_softmax everywhere."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = (ctx + cont)[-(max_length + 1) :]
    logits = model(torch.tensor([ids[:-1]])).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1)[-len(cont) :]
    return sum(logp[i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihoods_match_full_logits_reference(tiny, tokenizer, batch_size):
    long_ctx = "다음 중 옳은 것은?\n" * 12 + "정답："
    reqs = [
        ("빨간 원이 왼쪽에서", " 오른쪽으로 움직인다"),
        ("질문\n정답：", " A"),
        ("질문\n정답：", " B"),
        ("다른 질문입니다\n정답：", " 정답은 C입니다"),
        (long_ctx, " D"),
    ]
    with torch.no_grad():
        want = [_reference_loglik(tiny, tokenizer, c, x, 4096) for c, x in reqs]
        got = loglikelihoods(tiny, tokenizer, reqs, batch_size=batch_size)
        assert got == pytest.approx(want, abs=1e-4)
        # left truncation to max_length, as lm-eval: the long context loses its start
        want_t = _reference_loglik(tiny, tokenizer, long_ctx, " D", 20)
        assert loglikelihoods(tiny, tokenizer, [(long_ctx, " D")], max_length=20)[0] == pytest.approx(
            want_t, abs=1e-4
        )
        assert want_t != pytest.approx(want[-1], abs=1e-3)


@pytest.fixture(scope="module")
def always_b(tiny_model_dir, tokenizer):
    """A real tiny Qwen3 whose weights make " B" the most likely next token at every position:
    attention and MLP outputs zeroed (the residual stream is the embedding), every embedding row the
    same vector, and an lm_head whose only non-zero row is " B"."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (b_id,) = tokenizer.encode(" B")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.linspace(-1, 1, model.config.hidden_size))
        h = model.model.norm(model.model.embed_tokens.weight[:1])[0]  # the constant final hidden state
        model.lm_head.weight.zero_()
        model.lm_head.weight[b_id] = 5.0 * h / h.dot(h)  # logit(" B") = 5, every other logit 0
    return model


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_always_b_scores_share_of_b(always_b, tokenizer, kmmlu_dir, mode):
    res = evaluate(always_b, tokenizer, kmmlu_dir, num_fewshot=2, mode=mode, batch_size=4, max_new_tokens=3)
    for subject, (n_b, n) in GOLD_B.items():
        r = res["per_subject"][subject]
        assert r["pred"] == "B" * n
        assert (r["correct"], r["n"], r["acc"]) == (n_b, n, n_b / n)
    assert res["n"] == 29
    assert res["acc_micro"] == pytest.approx(10 / 29)
    assert res["acc_macro"] == pytest.approx((2 / 10 + 3 / 8 + 3 / 6 + 2 / 5) / 4)
    assert res["per_category"]["HUMSS"] == {"acc_macro": 3 / 8, "acc_micro": 3 / 8, "n": 8, "subjects": 1}
    assert set(res["per_category"]) == set(CATEGORIES)


def test_choose_loglik_picks_highest_first_on_ties(always_b, tokenizer):
    picks, lls = choose_loglik(always_b, tokenizer, ["질문\n정답："], batch_size=2, max_length=None)
    assert picks == [1] and lls[0][1] > max(lls[0][0], lls[0][2], lls[0][3])
    assert lls[0][0] == pytest.approx(lls[0][2]) and lls[0][0] == pytest.approx(lls[0][3])


def test_kmmlu_config_composes_with_tiers(compose):
    cfg = compose("kmmlu", ["gpu=l4"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-8B" and cfg.gpu.compute_dtype == "bfloat16"
    cfg = compose("kmmlu", ["model=qwen3_4b", "mode=generate"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-4B" and cfg.mode == "generate"
    cfg = compose("kmmlu")
    assert (cfg.num_fewshot, cfg.fewshot_seed, cfg.output) == (5, 1234, "outputs/eval/kmmlu.json")


def test_cli_run_nf4_writes_reports(compose, kmmlu_dir, tmp_path):
    """The default config: the tiny decoder through the NF4 (bitsandbytes) path, as the VLM loads it."""
    out = tmp_path / "k" / "kmmlu.json"
    cfg = compose("kmmlu", [f"data_dir={kmmlu_dir}", f"output={out}", "limit=3", "subjects=[Math,Fashion]"])
    res = run(cfg)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert {"acc_macro", "acc_micro", "per_subject", "per_category", "n", "settings"} <= set(saved)
    assert saved["n"] == 6 and list(saved["per_subject"]) == ["Math", "Fashion"]
    assert saved["settings"]["model"]["quantize"] == "nf4" and saved["settings"]["num_fewshot"] == 5
    assert (
        saved["acc_micro"] == res["acc_micro"] == sum(r["correct"] for r in saved["per_subject"].values()) / 6
    )
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| **overall** | 2 | 6 |" in md and "| Math | STEM | 3 |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_is_applied(compose, tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    over = [f"model.name_or_path={tiny_model_dir}", "model.quantize=none"]
    plain, _ = load_model_and_tokenizer(compose("kmmlu", over))
    adapted, _ = load_model_and_tokenizer(compose("kmmlu", [*over, f"adapter={tmp_path / 'lora'}"]))
    req = [("질문\n정답：", " A")]
    with torch.no_grad():
        assert loglikelihoods(adapted, tokenizer, req)[0] == pytest.approx(
            loglikelihoods(lora, tokenizer, req)[0]
        )
        assert loglikelihoods(adapted, tokenizer, req)[0] != pytest.approx(
            loglikelihoods(plain, tokenizer, req)[0]
        )
    with pytest.raises(ValueError, match=r"adapter .*missing"):
        load_model_and_tokenizer(compose("kmmlu", [*over, f"adapter={tmp_path / 'missing'}"]))
