"""KMMLU (Korean MMLU) on the decoder alone, run by lm-evaluation-harness itself.

    python -m eval.kmmlu gpu=l4 data_dir=DIR
    python -m eval.kmmlu model.name_or_path=DIR model.quantize=none adapter=LORA_DIR data_dir=DIR mode=generate

The decoder is loaded as training loads it (NF4 included, plus an optional LoRA adapter) and handed to
lm-eval's `HFLM`; `lm_eval.simple_evaluate` runs lm-eval's own `kmmlu` task (`mode=loglik`: best of
A-D by log-likelihood) or `kmmlu_direct` (`mode=generate`: greedy, exact match), so prompt, few-shot
draws, tokenization and scoring are lm-eval's (task files: eval/kmmlu_tasks.py). From lm-eval's
per-sample records we report accuracy per subject, per category and overall, macro (mean of subject
accuracies, the KMMLU paper's) and micro (pooled questions, lm-eval's group aggregation), as JSON,
Markdown and a PNG.
"""

from __future__ import annotations

import logging
import string
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from eval import report
from eval.kmmlu_tasks import CATEGORIES, FAMILIES, category_of, check_subjects, lm_eval_tasks
from vlm.config import to_typed
from vlm.config.entries import KmmluEntry
from vlm.util.errors import UsageError

CHOICES = ("A", "B", "C", "D")
CATEGORY_COLORS = {"STEM": "#4C72B0", "Applied Science": "#55A868", "HUMSS": "#C44E52", "Other": "#8172B2"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # never a pickled adapter_model.bin


def _letter(sample: Mapping[str, Any]) -> tuple[str, str]:
    """(predicted, gold) letter of one lm-eval record; "-" when a generation is not one letter."""
    target = sample["target"]
    gold = CHOICES[target] if isinstance(target, int) else str(target)
    resps = sample["filtered_resps"]
    if "acc" in sample:  # multiple_choice: [(loglik, is_greedy)] per choice; np.argmax keeps the first tie
        lls = [r[0] for r in resps]
        return CHOICES[max(range(len(lls)), key=lambda j: (lls[j], -j))], gold
    # generate_until: normalized as kmmlu_direct's exact_match is (spaces, case, punctuation ignored)
    text = resps[0].replace(" ", "").translate(str.maketrans("", "", string.punctuation)).upper()
    return (text if text in CHOICES else "-"), gold


def aggregate(
    samples_by_subject: Mapping[str, Sequence[Mapping[str, Any]]], categories: Mapping[str, str]
) -> dict[str, Any]:
    """Per-subject n/correct/acc from lm-eval's per-sample records (`acc` or `exact_match` per record),
    then macro (mean of subject accuracies) and micro (pooled questions) per category and overall.
    A subject missing from `categories` counts as Other."""
    per_subject: dict[str, dict[str, Any]] = {}
    for subject, samples in samples_by_subject.items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        correct = round(sum(s["acc"] if "acc" in s else s["exact_match"] for s in samples))
        letters = [_letter(s) for s in samples]
        per_subject[subject] = {
            "category": categories.get(subject, "Other"),
            "n": len(samples),
            "correct": correct,
            "acc": correct / len(samples),
            "pred": "".join(p for p, _ in letters),
            "gold": "".join(g for _, g in letters),
        }

    def agg(names: list[str]) -> dict[str, Any]:
        n = sum(per_subject[s]["n"] for s in names)
        correct = sum(per_subject[s]["correct"] for s in names)
        macro = sum(per_subject[s]["acc"] for s in names) / len(names)
        return {"acc_macro": macro, "acc_micro": correct / n, "n": n, "subjects": len(names)}

    order = list(CATEGORIES.values()) + [r["category"] for r in per_subject.values()]
    cats = {c: [s for s, r in per_subject.items() if r["category"] == c] for c in dict.fromkeys(order)}
    overall = agg(list(per_subject))
    return {
        "acc_macro": overall["acc_macro"],
        "acc_micro": overall["acc_micro"],
        "n": overall["n"],
        "per_category": {c: agg(names) for c, names in cats.items() if names},
        "per_subject": per_subject,
    }


def lm_eval_samples(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path | None,
    subjects: Sequence[str] | None = None,
    mode: str = "loglik",
    num_fewshot: int = 5,
    fewshot_seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    hub_repo: str | None = None,
    hub_revision: str | None = None,
    verbose: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """lm-eval's per-sample records per subject (in `subjects` order), and the context length HFLM
    used. `hub_repo=None`: the dataset lm-eval's own task files name."""
    import lm_eval  # pulls datasets and pandas: only once a run is under way
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.kmmlu_tasks import shipped_hub_repo

    data = None if data_dir is None else str(data_dir)
    chosen = check_subjects(data, list(subjects) if subjects else None, num_fewshot, mode)
    lm_log = logging.getLogger("lm_eval")
    lm_log.setLevel(logging.INFO if verbose else max(lm_log.getEffectiveLevel(), logging.WARNING))
    if not verbose:  # one "Generating split" bar per CSV: 135 lines for the 45 subjects
        import datasets

        datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="kmmlu-") as tmp:
        request, subject_of, include = lm_eval_tasks(
            Path(tmp) / "tasks",
            chosen,
            mode,
            data,
            hub_repo or shipped_hub_repo(mode),
            hub_revision,
            Path(tmp) / "datasets",  # Arrow files of the local CSVs, removed with the folder
        )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=request,
            num_fewshot=num_fewshot,
            fewshot_random_seed=fewshot_seed,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,  # stderr bootstraps are lm-eval's table; we report our own numbers
            # our YAMLs include the base file by path; hub tasks live in include: no 15k-task index
            task_manager=TaskManager(include_path=include, include_defaults=False),
        )
    by_subject = {subject_of[task]: list(samples) for task, samples in res["samples"].items()}
    return {s: by_subject[s] for s in chosen}, lm.max_length


def evaluate(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path | None,
    subjects: Sequence[str] | None = None,
    mode: str = "loglik",
    num_fewshot: int = 5,
    fewshot_seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    hub_repo: str | None = None,
    hub_revision: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """KMMLU accuracy of a causal LM through lm-eval (data_dir=None: the hub dataset)."""
    import lm_eval

    from eval.kmmlu_tasks import shipped_hub_repo

    t0 = time.perf_counter()
    samples, used_length = lm_eval_samples(
        model, tokenizer, data_dir, subjects, mode, num_fewshot, fewshot_seed, limit, batch_size,
        max_length, hub_repo, hub_revision, verbose,
    )  # fmt: skip
    result = aggregate(samples, {s: category_of(s) for s in samples})
    result["settings"] = {
        "mode": mode,
        "task": FAMILIES[mode].group,
        "lm_eval": lm_eval.__version__,
        "num_fewshot": num_fewshot,
        "fewshot_split": "dev",
        "fewshot_seed": fewshot_seed,
        "limit": limit,
        "max_length": used_length,
        "batch_size": batch_size,
        "data": str(data_dir)
        if data_dir is not None
        else f"hf://datasets/{hub_repo or shipped_hub_repo(mode)}",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return result


def write_report(result: dict[str, Any], output: str | Path, title: str) -> dict[str, Path]:
    """outputs/eval/kmmlu.json + .md (tables) + .png (per-subject bars coloured by category)."""
    s = result["settings"]
    rows = [
        [c, r["subjects"], r["n"], r["acc_macro"], r["acc_micro"]] for c, r in result["per_category"].items()
    ]
    rows.append(
        ["**overall**", len(result["per_subject"]), result["n"], result["acc_macro"], result["acc_micro"]]
    )
    md = f"# KMMLU: {title}\n\n"
    md += f"lm-eval {s['lm_eval']} `{s['task']}` ({s['mode']}), {s['num_fewshot']}-shot "
    md += f"(dev, seed {s['fewshot_seed']}), data `{s['data']}`"
    md += f"{', limit ' + str(s['limit']) if s['limit'] else ''}. Macro = mean of subjects (KMMLU paper); "
    md += "micro = pooled questions (lm-eval groups).\n\n"
    md += report.markdown_table(["category", "subjects", "n", "acc (macro)", "acc (micro)"], rows)
    md += "\n" + report.markdown_table(
        ["subject", "category", "n", "acc"],
        [[k, r["category"], r["n"], r["acc"]] for k, r in result["per_subject"].items()],
    )
    subj = list(result["per_subject"].items())
    return {
        "json": report.write_json(output, result),
        "md": report.write_text(report.sibling(output, ".md"), md),
        "png": report.bar_chart(
            report.sibling(output, ".png"),
            [k for k, _ in subj],
            [r["acc"] for _, r in subj],
            title=f"KMMLU {s['mode']} {s['num_fewshot']}-shot: {title}",
            ylabel="accuracy",
            colors=[CATEGORY_COLORS.get(r["category"], "#999999") for _, r in subj],
            hline=(result["acc_macro"], f"macro {result['acc_macro']:.3f}"),
            legend={c: CATEGORY_COLORS.get(c, "#999999") for c in result["per_category"]},
        ),
    }


def check_adapter(adapter: str) -> Path:
    """A PEFT adapter folder with safetensors weights, or a UsageError (checked before any load)."""
    path = Path(adapter)
    if not path.is_dir():
        raise UsageError(f"adapter={adapter}: no such folder")
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise UsageError(
            f"adapter={adapter}: missing {', '.join(missing)} (a PEFT adapter saved as safetensors)"
        )
    return path


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device}: no CUDA device is visible")
    return device


def load_model_and_tokenizer(cfg: KmmluEntry) -> tuple[Any, Any]:
    """The decoder exactly as training loads it (NF4 when model.quantize=nf4), plus an optional LoRA."""
    from vlm.model.build import tokenizer_source
    from vlm.model.decoder import load_decoder
    from vlm.model.tokenizer import load_tokenizer

    adapter = check_adapter(cfg.adapter) if cfg.adapter is not None else None
    device = _device(cfg.device)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model))
    model = load_decoder(
        cfg.model,
        compute_dtype=cfg.gpu.compute_dtype,
        attn_implementation=cfg.gpu.attn_implementation,
        device_map={"": device} if device != "cpu" else None,
    )
    if adapter is not None:
        from vlm.model.lora import load_adapter  # the LoRA policy's loader: routed-expert LoRA too

        try:
            model = load_adapter(model, adapter)
        except Exception as e:  # a LoRA of another base: shapes or module names do not fit
            base = cfg.model.name_or_path or "the tiny decoder"
            raise UsageError(f"adapter={cfg.adapter}: cannot be applied to {base}: {e}") from e
    return model.eval(), tokenizer


def run(cfg: KmmluEntry | DictConfig) -> dict[str, Any]:
    """Check the settings, load, evaluate, write the report: everything the CLI does."""
    cfg = to_typed(cfg)
    subjects = check_subjects(cfg.data_dir, cfg.subjects, cfg.num_fewshot, cfg.mode)
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"limit={cfg.limit}: must be 1 or more (null: every question)")
    if cfg.batch_size < 1:
        raise UsageError(f"batch_size={cfg.batch_size}: must be 1 or more")
    if cfg.adapter is not None:
        check_adapter(cfg.adapter)
    _device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg)
    result = evaluate(
        model,
        tokenizer,
        cfg.data_dir,
        subjects=subjects,
        mode=cfg.mode,
        num_fewshot=cfg.num_fewshot,
        fewshot_seed=cfg.fewshot_seed,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        hub_repo=cfg.hub_repo,
        hub_revision=cfg.hub_revision,
        verbose=cfg.verbose,
    )
    name = cfg.model.name_or_path or "tiny random Qwen3"
    result["settings"]["model"] = {
        "name_or_path": name,
        "quantize": cfg.model.quantize,
        "adapter": cfg.adapter,
        "compute_dtype": cfg.gpu.compute_dtype,
    }
    title = Path(name).name + (" + LoRA" if cfg.adapter else "")
    result["files"] = {k: str(v) for k, v in write_report(result, cfg.output, title).items()}
    return result


def main_fn(cfg: DictConfig) -> int:
    result = run(cfg)
    print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    from vlm.util.cli import hydra_cli

    hydra_cli("kmmlu", main_fn)
