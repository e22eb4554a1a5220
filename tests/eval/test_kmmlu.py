"""KMMLU through lm-eval: subjects and categories read from lm-eval's task files, task YAMLs that swap
only the data source, macro/micro aggregation on a hand-computed case, a tiny Qwen3 rigged to answer
" B" scoring exactly the share of B answers in both modes, usage errors before any load, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from eval.kmmlu import aggregate, evaluate, load_model_and_tokenizer, run
from eval.kmmlu_tasks import category_of, lm_eval_tasks, shipped_subjects, tasks_dir, write_task_yamls
from vlm.config import to_typed
from vlm.util.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
GOLD = {  # the fixture's answers as letters, in file order (tests/eval/conftest.py)
    "Math": "ADCBADCBAD",
    "Korean-History": "ABBCBCAD",
    "Geomatics": "BADBCB",
    "Fashion": "BACAB",
}


def test_subjects_and_categories_come_from_lm_eval():
    subjects = shipped_subjects()
    assert len(subjects) == 45 and set(shipped_subjects("generate")) == set(subjects)
    counts = {
        c: sum(cat == c for _, cat in subjects.values())
        for c in ("STEM", "Applied Science", "HUMSS", "Other")
    }
    assert counts == {"STEM": 11, "Applied Science": 12, "HUMSS": 11, "Other": 11}
    assert subjects["Korean-History"] == ("kmmlu_korean_history", "HUMSS")
    assert shipped_subjects("generate")["Geomatics"] == ("kmmlu_direct_geomatics", "Applied Science")
    assert (category_of("Math"), category_of("Fashion"), category_of("My-Own-Subject")) == (
        "STEM",
        "Other",
        "Other",
    )


def _mc(doc_id: int, gold: str, pred: str, tie: bool = False) -> dict:
    """An lm-eval multiple_choice record: log-likelihood per choice, `pred` the highest (with `tie`, the
    next letter scores the same and loses, as with numpy.argmax)."""
    lls = [-3.0, -3.0, -3.0, -3.0]
    lls["ABCD".index(pred)] = -1.0
    if tie:
        lls["ABCD".index(pred) + 1] = -1.0
    return {"doc_id": doc_id, "target": "ABCD".index(gold), "filtered_resps": [[x, False] for x in lls],
            "acc": float(pred == gold)}  # fmt: skip


def test_aggregate_hand_computed():
    """Math 3/4 and Biology 1/2 (STEM), Law 1/5 (HUMSS): macro averages subjects, micro pools questions."""
    math = [_mc(0, "A", "A", tie=True), _mc(1, "B", "B"), _mc(2, "C", "D"), _mc(3, "D", "D")]
    samples = {
        "Math": math[::-1],  # lm-eval's order is not doc order
        "Biology": [_mc(0, "A", "C"), _mc(1, "C", "C")],
        "Law": [_mc(i, g, p) for i, (g, p) in enumerate(zip("ABCDA", "AAAAB", strict=True))],
    }
    res = aggregate(samples, {"Math": "STEM", "Biology": "STEM", "Law": "HUMSS"})
    assert res["per_subject"]["Math"] == {
        "category": "STEM", "n": 4, "correct": 3, "acc": 0.75, "pred": "ABDD", "gold": "ABCD"
    }  # fmt: skip
    assert (res["per_subject"]["Law"]["correct"], res["per_subject"]["Law"]["pred"]) == (1, "AAAAB")
    assert res["per_category"]["STEM"] == {"acc_macro": 0.625, "acc_micro": 4 / 6, "n": 6, "subjects": 2}
    assert res["per_category"]["HUMSS"] == {"acc_macro": 0.2, "acc_micro": 0.2, "n": 5, "subjects": 1}
    assert list(res["per_category"]) == ["STEM", "HUMSS"]
    assert res["acc_macro"] == pytest.approx((0.75 + 0.5 + 0.2) / 3, abs=1e-12)
    assert (res["acc_micro"], res["n"]) == (5 / 11, 11)


def test_aggregate_generate_records_and_unknown_category():
    """kmmlu_direct records: the response normalized like its exact_match; a subject without a
    category counts as Other."""
    resps = [" B", "c.", "B\n", "정답은 A", "D"]
    samples = [
        {"doc_id": i, "target": t, "filtered_resps": [r], "exact_match": float(m)}
        for i, (r, t, m) in enumerate(zip(resps, "BCBAA", [1, 1, 0, 0, 0], strict=True))
    ]
    res = aggregate({"Custom": samples}, {})
    r = res["per_subject"]["Custom"]
    assert (r["pred"], r["gold"], r["correct"], r["category"]) == ("BC--D", "BCBAA", 2, "Other")
    assert list(res["per_category"]) == ["Other"]


def test_task_yamls_swap_only_the_data_source(kmmlu_dir, tmp_path):
    names = write_task_yamls(
        tmp_path, ["Math", "Fashion"], "loglik", str(kmmlu_dir), "unused", None, tmp_path / "c"
    )
    assert names == {"Math": "kovicap_kmmlu_math", "Fashion": "kovicap_kmmlu_fashion"}
    spec = yaml.safe_load((tmp_path / "kovicap_kmmlu_math.yaml").read_text(encoding="utf-8"))
    assert spec["include"] == str(tasks_dir("loglik") / "_default_kmmlu_yaml")
    assert (spec["task"], spec["dataset_path"], spec["dataset_name"]) == ("kovicap_kmmlu_math", "csv", None)
    files = spec["dataset_kwargs"]["data_files"]
    assert list(files) == ["train", "dev", "test"]  # the hub config's order: train fixes the column types
    assert files["dev"] == str((kmmlu_dir / "Math-dev.csv").resolve())
    assert set(spec) == {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs"}
    fashion = yaml.safe_load((tmp_path / "kovicap_kmmlu_fashion.yaml").read_text(encoding="utf-8"))
    assert list(fashion["dataset_kwargs"]["data_files"]) == ["dev", "test"]  # no train file: dev comes first
    direct = write_task_yamls(tmp_path / "d", ["Math"], "generate", str(kmmlu_dir), "unused", None, tmp_path)
    spec = yaml.safe_load((tmp_path / "d" / f"{direct['Math']}.yaml").read_text(encoding="utf-8"))
    assert spec["include"].endswith("direct/_direct_kmmlu_yaml")


def test_hub_uses_lm_eval_task_names(tmp_path):
    from lm_eval.tasks import TaskManager

    every = list(shipped_subjects())
    request, by_task, include = lm_eval_tasks(
        tmp_path, every, "loglik", None, "HAERAE-HUB/KMMLU", None, tmp_path
    )
    assert request == ["kmmlu"] and len(by_task) == 45 and by_task["kmmlu_korean_history"] == "Korean-History"
    request, _, include = lm_eval_tasks(
        tmp_path, ["Law"], "generate", None, "HAERAE-HUB/KMMLU", None, tmp_path
    )
    assert request == ["kmmlu_direct_law"]
    assert {"kmmlu_direct", "kmmlu_direct_law"} <= set(
        TaskManager(include_path=include, include_defaults=False).all_tasks
    )
    # a pinned revision: lm-eval's base task, the hub source with the revision
    request, by_task, include = lm_eval_tasks(
        tmp_path, ["Law"], "loglik", None, "HAERAE-HUB/KMMLU", "abc123", tmp_path
    )
    spec = yaml.safe_load((Path(include) / f"{request[0]}.yaml").read_text(encoding="utf-8"))
    assert (spec["dataset_path"], spec["dataset_name"], spec["dataset_kwargs"]) == (
        "HAERAE-HUB/KMMLU", "Law", {"revision": "abc123"}
    )  # fmt: skip


@pytest.fixture(scope="module")
def always_b(tiny_model_dir, tokenizer):
    """A real tiny Qwen3 that answers " B" and then ".": attention and MLP outputs are zeroed, so the
    final hidden state depends on the current token only; " B" embeds as +v and every other token as -v
    (RMSNorm is odd, so their hidden states are h and -h), and the head maps -h to " B", h to "."."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ((b_id,), (dot_id,)) = tokenizer.encode(" B"), tokenizer.encode(".")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        v = torch.linspace(-1, 1, model.config.hidden_size)
        model.model.embed_tokens.weight.copy_(-v)
        model.model.embed_tokens.weight[b_id] = v
        h = model.model.norm(v[None])[0]
        model.lm_head.weight.zero_()
        model.lm_head.weight[b_id] = -5.0 * h / h.dot(h)  # after any other token: logit(" B") = 5
        model.lm_head.weight[dot_id] = 5.0 * h / h.dot(h)  # after " B": logit(".") = 5, a stop string
    return model


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_always_b_scores_share_of_b(always_b, tokenizer, kmmlu_dir, mode):
    res = evaluate(always_b, tokenizer, kmmlu_dir, mode=mode, num_fewshot=2, batch_size=8)
    for subject, gold in GOLD.items():
        r = res["per_subject"][subject]
        assert (r["pred"], r["gold"]) == ("B" * len(gold), gold)
        assert (r["correct"], r["n"]) == (gold.count("B"), len(gold))
    assert list(res["per_subject"]) == sorted(GOLD)  # every *-test.csv, sorted
    assert (res["n"], res["acc_micro"]) == (29, 10 / 29)
    assert res["acc_macro"] == pytest.approx((2 / 10 + 3 / 8 + 3 / 6 + 2 / 5) / 4, abs=1e-12)
    assert res["per_category"]["HUMSS"] == {"acc_macro": 3 / 8, "acc_micro": 3 / 8, "n": 8, "subjects": 1}
    assert res["settings"]["task"] == {"loglik": "kmmlu", "generate": "kmmlu_direct"}[mode]


def test_kmmlu_config_composes_with_tiers(compose):
    cfg = to_typed(compose("kmmlu", ["gpu=l4"]))
    assert cfg.model.name_or_path == "Qwen/Qwen3-8B" and cfg.gpu.compute_dtype == "bfloat16"
    cfg = to_typed(compose("kmmlu", ["model=qwen3_4b", "mode=generate"]))
    assert cfg.model.name_or_path == "Qwen/Qwen3-4B" and cfg.mode == "generate"
    cfg = to_typed(compose("kmmlu"))
    assert (cfg.num_fewshot, cfg.fewshot_seed, cfg.output) == (5, 1234, "outputs/eval/kmmlu.json")


def _bad_adapter(root: Path) -> str:
    root.mkdir()
    (root / "adapter_config.json").write_text("{}", encoding="utf-8")
    (root / "adapter_model.bin").write_bytes(b"pickle")
    return str(root)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data_dir=/nonexistent", r"^data_dir=/nonexistent: no such folder$"),
        ("data_dir={empty}", r"^data_dir=.*: no \{Subject\}-test.csv files"),
        ("data_dir={no_dev}", r"^data_dir=.*: X-dev.csv missing"),
        ("subjects=[Math,Nope]", r"^subjects: no Nope-test.csv in "),
        ("data_dir=null subjects=[Nope]", r"^subjects: Nope not among lm-eval's 45"),
        ("num_fewshot=6", r"^num_fewshot=6: Fashion-dev.csv has only 5 examples$"),
        ("mode=chat", r"^mode=chat: expected loglik or generate$"),
        ("limit=0", r"^limit=0: must be 1 or more"),
        ("adapter=/nonexistent", r"^adapter=/nonexistent: no such folder$"),
        ("adapter={bin_adapter}", r"^adapter=.*: missing adapter_model.safetensors"),
    ],
)
def test_usage_errors_come_before_loading(compose, kmmlu_dir, tmp_path, override, message):
    """A model path that does not exist: had anything been loaded first, the error would be another."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_dev").mkdir()
    (tmp_path / "no_dev" / "X-test.csv").write_text("question,answer,A,B,C,D\n", encoding="utf-8")
    paths = {"empty": tmp_path / "empty", "no_dev": tmp_path / "no_dev"}
    if "bin_adapter" in override:
        paths["bin_adapter"] = _bad_adapter(tmp_path / "lora")
    over = ["model.name_or_path=/nonexistent/model", "model.quantize=none", *override.format(**paths).split()]
    if "data_dir=" not in override:
        over.append(f"data_dir={kmmlu_dir}")
    cfg = compose("kmmlu", over)
    with pytest.raises(UsageError, match=message):
        run(cfg)


def test_cli_usage_error_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "eval.kmmlu", "data_dir=/nonexistent", f"output={tmp_path / 'k.json'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: data_dir=/nonexistent: no such folder"
    assert not (tmp_path / "k.json").exists()


def test_cli_run_nf4_writes_reports(compose, kmmlu_dir, tmp_path):
    """The default config: the tiny decoder through the NF4 (bitsandbytes) path, as training loads it."""
    out = tmp_path / "k" / "kmmlu.json"
    cfg = compose("kmmlu", [f"data_dir={kmmlu_dir}", f"output={out}", "limit=3", "subjects=[Math,Fashion]"])
    res = run(cfg)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert {"acc_macro", "acc_micro", "per_subject", "per_category", "n", "settings"} <= set(saved)
    assert saved["n"] == 6 and list(saved["per_subject"]) == ["Math", "Fashion"]
    assert saved["settings"]["model"]["quantize"] == "nf4" and saved["settings"]["num_fewshot"] == 5
    assert (saved["settings"]["task"], saved["settings"]["max_length"]) == ("kmmlu", 4096)
    for subject, r in saved["per_subject"].items():
        assert r["gold"] == GOLD[subject][:3] and len(r["pred"]) == 3
        assert r["correct"] == sum(p == g for p, g in zip(r["pred"], r["gold"], strict=True))  # lm-eval's acc
    correct = sum(r["correct"] for r in saved["per_subject"].values())
    assert saved["acc_micro"] == res["acc_micro"] == correct / 6
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| **overall** | 2 | 6 |" in md and "| Math | STEM | 3 |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_is_applied(compose, tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    over = [f"model.name_or_path={tiny_model_dir}", "model.quantize=none"]
    plain, _ = load_model_and_tokenizer(to_typed(compose("kmmlu", over)))
    adapted, _ = load_model_and_tokenizer(to_typed(compose("kmmlu", [*over, f"adapter={tmp_path / 'lora'}"])))
    ids = torch.tensor([tokenizer.encode("질문\n정답：")])
    with torch.no_grad():
        want, got, before = lora(ids).logits, adapted(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - before).abs().max() > 1e-2
    # a LoRA for modules this decoder does not have: one line naming the adapter
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text(encoding="utf-8"))
    config["target_modules"] = ["nope_proj"]
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UsageError, match=r"^adapter=.*lora: cannot be applied to "):
        load_model_and_tokenizer(to_typed(compose("kmmlu", [*over, f"adapter={tmp_path / 'lora'}"])))
