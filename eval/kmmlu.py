"""KMMLU (Korean MMLU) on the decoder alone, agreeing with lm-evaluation-harness's `kmmlu` task.

    python -m eval.kmmlu data_dir=DIR model=qwen3_4b num_fewshot=5 mode=loglik
    python -m eval.kmmlu data_dir=DIR model.name_or_path=DIR model.quantize=none adapter=LORA_DIR

`loglik`: the answer is the continuation among " A", " B", " C", " D" with the highest log-likelihood,
tokenized as lm-eval's HFLM does (`_encode_pair`: encode context+continuation, split at the length of the
encoded context; left-truncate to the model's max length). `generate`: greedy decoding, the first A-D
letter of the output. Reports accuracy per subject, per category and overall, macro (mean of subjects,
as the KMMLU paper) and micro (pooled questions, as lm-eval's groups), in JSON, Markdown and a PNG.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eval import report
from eval.kmmlu_data import (
    CATEGORIES,
    CHOICES,
    FEWSHOT_SEED,
    HUB_REPO,
    TARGET_DELIMITER,
    category_of,
    fewshot_contexts,
    load_subject,
    subjects_in,
)

log = logging.getLogger(__name__)
CATEGORY_COLORS = {"STEM": "#4C72B0", "Applied Science": "#55A868", "HUMSS": "#C44E52", "Other": "#8172B2"}


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM `_encode_pair` for causal models: trailing context spaces move to the continuation,
    the continuation's ids are the tail of encode(context + continuation) after len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def default_max_length(model: Any, tokenizer: Any) -> int:
    """lm-eval HFLM's max_length: the model config's context size, else the tokenizer's, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, attr, None):
            return int(getattr(model.config, attr))
    ml = getattr(tokenizer, "model_max_length", None)
    return int(ml) if ml and ml < 10**12 else 2048


def _backbone_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer body returning hidden states, lm_head); through a PEFT wrapper when there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


@torch.no_grad()
def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation), as lm-eval computes it.

    Requests whose model input is identical (one-token continuations of one context: the four answer
    letters) share one row. The transformer body runs over padded rows; the 151,936-wide head is
    applied only at the positions that predict continuation tokens.
    """
    max_length = max_length or default_max_length(model, tokenizer)
    rows: dict[tuple[int, ...], int] = {}
    reqs: list[tuple[int, list[int], list[int]]] = []  # (row, positions in row, target ids)
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont or len(cont) > max_length:
            raise ValueError(
                f"continuation {continuation!r} encodes to {len(cont)} tokens (max {max_length})"
            )
        inp = tuple((ctx + cont)[-(max_length + 1) :][:-1])  # lm-eval: left-truncate, drop the last token
        row = rows.setdefault(inp, len(rows))
        reqs.append((row, list(range(len(inp) - len(cont), len(inp))), cont))
    inputs = list(rows)
    by_row: dict[int, list[int]] = {}
    for i, (row, _, _) in enumerate(reqs):
        by_row.setdefault(row, []).append(i)

    backbone, head = _backbone_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(reqs)
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(inputs[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):  # right padding: causal attention never sees the pad
            ids[b, : len(inputs[r])] = torch.tensor(inputs[r])
            mask[b, : len(inputs[r])] = 1
        hidden = backbone(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state  # (B, T, D)
        b_idx, t_idx, targets, owner = [], [], [], []
        for b, r in enumerate(batch):
            for i in by_row[r]:
                _, pos, cont = reqs[i]
                b_idx += [b] * len(pos)
                t_idx += pos
                targets += cont
                owner += [i] * len(pos)
        h = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]  # (M, D)
        logp = F.log_softmax(head(h).float(), dim=-1)  # (M, V): the head only where it is needed
        picked = logp.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].tolist()
        for i, lp in zip(owner, picked, strict=True):
            out[i] += lp
    return out


def choose_loglik(
    model: Any, tokenizer: Any, contexts: Sequence[str], batch_size: int, max_length: int | None
):
    """Index of the best of " A".." D" per context (first on ties, as numpy.argmax in lm-eval), and the
    four log-likelihoods."""
    reqs = [(c, TARGET_DELIMITER + letter) for c in contexts for letter in CHOICES]
    lls = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, max_length=max_length)
    per_q = [lls[4 * i : 4 * i + 4] for i in range(len(contexts))]
    return [max(range(4), key=lambda j, q=q: (q[j], -j)) for q in per_q], per_q


_LETTER = re.compile(r"[ABCD]")


@torch.no_grad()
def choose_generate(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    batch_size: int,
    max_length: int | None,
    max_new_tokens: int = 16,
) -> tuple[list[int | None], list[str]]:
    """Greedy continuation of each context; the answer is its first A-D letter (None if there is none)."""
    max_length = max_length or default_max_length(model, tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts: list[str] = []
    for start in range(0, len(contexts), batch_size):
        enc = [
            tokenizer.encode(c)[-(max_length - max_new_tokens) :]
            for c in contexts[start : start + batch_size]
        ]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for b, e in enumerate(enc):  # left padding, so every row continues from its last token
            ids[b, width - len(e) :] = torch.tensor(e)
            mask[b, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    letters = [_LETTER.search(t) for t in texts]
    return [CHOICES.index(m.group()) if m else None for m in letters], texts


def summarize(per_subject: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Macro (mean of subject accuracies) and micro (pooled) accuracy, overall and per category."""

    def agg(names: list[str]) -> dict[str, Any]:
        n = sum(per_subject[s]["n"] for s in names)
        correct = sum(per_subject[s]["correct"] for s in names)
        macro = sum(per_subject[s]["acc"] for s in names) / len(names)
        return {"acc_macro": macro, "acc_micro": correct / n, "n": n, "subjects": len(names)}

    cats = {c: [s for s, r in per_subject.items() if r["category"] == c] for c in CATEGORIES}
    overall = agg(list(per_subject))
    return {
        "acc_macro": overall["acc_macro"],
        "acc_micro": overall["acc_micro"],
        "n": overall["n"],
        "per_category": {c: agg(names) for c, names in cats.items() if names},
        "per_subject": per_subject,
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path | None,
    num_fewshot: int = 5,
    mode: str = "loglik",
    subjects: Sequence[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int = 16,
    fewshot_seed: int = FEWSHOT_SEED,
    hub_repo: str = HUB_REPO,
    revision: str | None = None,
) -> dict[str, Any]:
    """KMMLU accuracy of a causal LM. data_dir=None reads the hub dataset (subjects then required or all 45)."""
    if mode not in ("loglik", "generate"):
        raise ValueError(f"mode={mode!r}: expected 'loglik' or 'generate'")
    if subjects is None:
        from eval.kmmlu_data import SUBJECT_CATEGORY

        subjects = subjects_in(data_dir) if data_dir is not None else sorted(SUBJECT_CATEGORY)
        if not subjects:
            raise FileNotFoundError(f"no {{Subject}}-test.csv files in {data_dir}")
    model.eval()
    t0 = time.perf_counter()
    per_subject: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        test, dev = load_subject(subject, data_dir, hub_repo, revision, with_dev=num_fewshot > 0)
        test = test[:limit]
        contexts = fewshot_contexts(test, dev, num_fewshot, fewshot_seed)
        if mode == "loglik":
            picks, _ = choose_loglik(model, tokenizer, contexts, batch_size, max_length)
        else:
            picks, _ = choose_generate(model, tokenizer, contexts, batch_size, max_length, max_new_tokens)
        correct = sum(p == q.answer for p, q in zip(picks, test, strict=True))
        per_subject[subject] = {
            "category": category_of(subject),
            "n": len(test),
            "correct": correct,
            "acc": correct / len(test),
            "pred": "".join("-" if p is None else CHOICES[p] for p in picks),  # "-": no letter generated
            "gold": "".join(CHOICES[q.answer] for q in test),
        }
        log.info("%s: %d/%d = %.4f", subject, correct, len(test), correct / len(test))
    result = summarize(per_subject)
    result["settings"] = {
        "mode": mode,
        "num_fewshot": num_fewshot,
        "fewshot_split": "dev",
        "fewshot_seed": fewshot_seed,
        "limit": limit,
        "max_length": max_length or default_max_length(model, tokenizer),
        "max_new_tokens": max_new_tokens if mode == "generate" else None,
        "batch_size": batch_size,
        "data": str(data_dir) if data_dir is not None else f"hf://datasets/{hub_repo}",
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
    md += f"{s['mode']}, {s['num_fewshot']}-shot (dev, seed {s['fewshot_seed']}), data `{s['data']}`"
    md += f"{', limit ' + str(s['limit']) if s['limit'] else ''}. Macro = mean of subjects (KMMLU paper); "
    md += "micro = pooled questions (lm-eval groups).\n\n"
    md += report.markdown_table(["category", "subjects", "n", "acc (macro)", "acc (micro)"], rows)
    md += "\n" + report.markdown_table(
        ["subject", "category", "n", "acc"],
        [[k, r["category"], r["n"], r["acc"]] for k, r in result["per_subject"].items()],
    )
    subj = list(result["per_subject"].items())
    paths = {
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
            legend={c: CATEGORY_COLORS[c] for c in result["per_category"]},
        ),
    }
    return paths


def load_model_and_tokenizer(cfg: Any) -> tuple[Any, Any]:
    """The decoder exactly as the VLM loads it (NF4 when model.quantize=nf4), plus an optional LoRA."""
    from vlm.decoder import load_decoder
    from vlm.tokenizer import load_tokenizer

    mcfg = cfg.model
    src = cfg.get("tokenizer")
    nop = mcfg.get("name_or_path")
    if src is None and nop and (not Path(nop).exists() or (Path(nop) / "tokenizer_config.json").exists()):
        src = nop  # a hub id, or a local checkpoint that carries its tokenizer
    tokenizer = load_tokenizer(src)
    device = cfg.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_decoder(
        mcfg,
        compute_dtype=cfg.gpu.compute_dtype,
        attn_implementation=cfg.gpu.attn_implementation,
        device_map={"": device} if device != "cpu" else None,
    )
    if cfg.get("adapter"):
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(cfg.adapter), is_trainable=False)
        except Exception as e:  # wrong base, missing files: one line naming the adapter
            raise ValueError(
                f"adapter {cfg.adapter}: cannot be applied to {nop or 'the tiny decoder'}: {e}"
            ) from e
    return model, tokenizer


def run(cfg: Any) -> dict[str, Any]:
    """Everything the CLI does, callable from tests with a composed config."""
    model, tokenizer = load_model_and_tokenizer(cfg)
    result = evaluate(
        model,
        tokenizer,
        cfg.data_dir,
        num_fewshot=cfg.num_fewshot,
        mode=cfg.mode,
        subjects=list(cfg.subjects) if cfg.subjects else None,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
        fewshot_seed=cfg.fewshot_seed,
        hub_repo=cfg.hub_repo,
        revision=cfg.hub_revision,
    )
    name = cfg.model.get("name_or_path") or "tiny random Qwen3"
    result["settings"]["model"] = {
        "name_or_path": name,
        "quantize": cfg.model.get("quantize"),
        "adapter": cfg.get("adapter"),
        "compute_dtype": cfg.gpu.compute_dtype,
    }
    title = Path(str(name)).name + (" + LoRA" if cfg.get("adapter") else "")
    result["files"] = {k: str(v) for k, v in write_report(result, cfg.output, title).items()}
    return result


def _main() -> None:
    import hydra

    @hydra.main(
        config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="kmmlu", version_base="1.3"
    )
    def main(cfg: Any) -> None:
        result = run(cfg)
        print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
        print("wrote " + ", ".join(result["files"].values()))

    main()


if __name__ == "__main__":
    _main()
