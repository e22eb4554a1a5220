"""`make demo`: the whole job on CPU — corpus, warm-ups, stage 1, stage 2, captions, scores, report.

    python -m vlm.demo                 # writes outputs/demo/report.json
    python -m vlm.demo control=true    # blind control: adds blind_attribute_accuracy to the report

Everything after the warm-ups goes through the same code a GPU run uses: `vlm.training.train` on
the composed `train` config (NF4 decoder, frozen encoder with a feature cache, stage 1 then stage 2
from the stage-1 checkpoint), then batched generation and the caption metrics of `eval.caption`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from data.annotations import read_annotations
from vlm.model import Prompt

log = logging.getLogger("vlm.demo")


def _corpus(cfg: DictConfig, root: Path) -> None:
    from data.synth import generate

    if (root / "val.jsonl").exists() and (root / "train.jsonl").exists():
        return
    generate(str(root), n_train=int(cfg.corpus.n_train), n_val=int(cfg.corpus.n_val), seed=int(cfg.seed))


def _train_frames(records: list[dict[str, Any]], num_frames: int, size: int) -> torch.Tensor:
    from data.video import sample_frames

    return torch.stack([sample_frames(r["video"], num_frames=num_frames, size=size).frames for r in records])


def _warmups(cfg: DictConfig, root: Path, warm: Path, base: DictConfig) -> dict[str, Any]:
    from vlm.tokenizer import load_tokenizer
    from vlm.vision import build_clip
    from vlm.warmup import warm_decoder, warm_vision

    w, out = cfg.warmup, {}
    records = read_annotations(root / "train.jsonl", root)
    prompt = Prompt(base.prompt.system, base.prompt.user)
    if not (warm / "decoder" / "config.json").exists():
        out["decoder"] = warm_decoder(
            base.model, load_tokenizer(), prompt, records, warm / "decoder",
            steps=int(w.decoder_steps), batch_size=int(w.decoder_batch), lr=float(w.decoder_lr), seed=int(cfg.seed),
        )  # fmt: skip
    if not (warm / "vision.safetensors").exists():
        frames = _train_frames(records, int(base.data.num_frames), int(base.vision.image_size))
        out["vision"] = warm_vision(
            build_clip(base.vision), frames, [r["captions"] for r in records], list(base.vision.mean),
            list(base.vision.std), warm / "vision.safetensors",
            steps=int(w.vision_steps), batch_size=int(w.vision_batch), lr=float(w.vision_lr), seed=int(cfg.seed),
        )  # fmt: skip
    return out


@torch.no_grad()
def _caption(module: Any, val_set: Any, batch_size: int, max_new_tokens: int) -> dict[str, str]:
    from vlm.datamodule import collate

    module.eval()
    preds: dict[str, str] = {}
    for start in range(0, len(val_set), batch_size):
        batch = collate([val_set[i] for i in range(start, min(start + batch_size, len(val_set)))])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            caps = module.vlm.generate(module._feats(batch), max_new_tokens=max_new_tokens)
        preds.update(zip(batch["video"], caps, strict=True))
    return preds


def _caption_from_export(
    cfg: DictConfig, checkpoint: str, root: Path, out: Path, run: Path
) -> dict[str, str]:
    """`python -m vlm.export` then `python -m vlm.caption` on the val folder, as a user would."""
    from vlm.caption import caption_folder
    from vlm.export import export

    export_dir = export(checkpoint, out / "export", overwrite=True)
    captions = run / "captions.jsonl"
    captions.unlink(missing_ok=True)  # a fresh model: no resume from an older run's lines
    summary = caption_folder(
        root / "videos" / "val", captions, export_dir, batch_size=int(cfg.caption.batch_size),
        num_workers=0, progress=False,
        **{"generation.max_new_tokens": int(cfg.caption.max_new_tokens), "trainer.precision": "bf16-mixed"},
    )  # fmt: skip
    if summary["failed"]:
        log.warning("%d val videos failed to caption; see %s", summary["failed"], captions)
    lines = [json.loads(x) for x in captions.read_text().splitlines() if x.strip()]
    return {f"videos/val/{x['video']}": x["caption"] or "" for x in lines}


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from eval.caption import attribute_accuracy, score_captions
    from vlm.training import datasets, train

    t0 = time.time()
    out = Path(cfg.out)
    root, warm = out / "synth", out / "warm"
    _corpus(cfg, root)
    common = [
        *cfg.train_overrides,
        f"data.root={root}",
        f"seed={cfg.seed}",
        f"data.blind={bool(cfg.control)}",
    ]
    common.append(f"trainer.enable_progress_bar={bool(cfg.progress_bar)}")
    base = compose("train", common)
    timings = {"warmups": _warmups(cfg, root, warm, base)}
    common += [f"model.name_or_path={warm / 'decoder'}", f"vision.weights={warm / 'vision.safetensors'}"]
    run = out / ("control" if cfg.control else "main")
    s1, s2 = cfg.stage1, cfg.stage2
    r1 = train(compose("train", [*common, "train=stage1_projector", f"output_dir={run / 'stage1'}",
        f"train.max_steps={s1.steps}", f"train.lr_projector={s1.lr_projector}", f"train.batch_size={s1.batch_size}"]))  # fmt: skip
    cfg2 = compose("train", [*common, "train=stage2_lora", f"output_dir={run / 'stage2'}",
        f"train.init_from={r1['last_checkpoint']}", f"train.max_steps={s2.steps}", f"train.batch_size={s2.batch_size}",
        f"train.lr_projector={s2.lr_projector}", f"train.lr_lora={s2.lr_lora}", f"train.lora_cfg.r={s2.r}",
        f"train.lora_cfg.alpha={s2.alpha}"])  # fmt: skip
    r2 = train(cfg2)
    t_cap = time.time()
    if cfg.control:  # blind: captions from all-zero frames, which the caption CLI cannot feed
        module = r2["module"]
        _, val_set = datasets(cfg2, module)
        preds = _caption(module, val_set, int(cfg.caption.batch_size), int(cfg.caption.max_new_tokens))
    else:  # the user's path: export the final model, caption the held-out folder from the export
        preds = _caption_from_export(cfg, r2["last_checkpoint"], root, out, run)
    caption_seconds = time.time() - t_cap
    val = read_annotations(root / "val.jsonl", root)
    refs = {r["rel"]: r["captions"] for r in val}
    attrs = {r["rel"]: r["attributes"] for r in val}
    acc = attribute_accuracy(preds, attrs)
    scores = score_captions(preds, refs, tokenize="morpheme")
    if cfg.control:
        (run / "captions.jsonl").write_text(
            "".join(
                json.dumps({"video": v, "caption": c}, ensure_ascii=False) + "\n" for v, c in preds.items()
            )
        )
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    result = {
        "attribute_accuracy": acc["all"],  # colour, shape and motion all right
        "per_attribute": {k: acc[k] for k in ("color", "shape", "motion")},
        "cider_d": scores["CIDEr-D"],
        "bleu4": scores["BLEU-4"],
        "rouge_l": scores["ROUGE-L"],
        "chrf": scores["chrF"],
        "train_seconds": r1["train_seconds"] + r2["train_seconds"],
        "caption_seconds": caption_seconds,
        "total_seconds": time.time() - t0,
        "warmups": timings["warmups"],
        "n_val": len(preds),
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "examples": [{"video": v, "caption": c, "reference": refs[v][0]} for v, c in list(preds.items())[:5]],
    }
    if cfg.control:
        report["blind_attribute_accuracy"] = result["attribute_accuracy"]
        report["blind"] = result
    else:
        report.update(result)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2))
    _print_table(report)
    return report


def _print_table(r: dict[str, Any]) -> None:
    rows = [
        (k, r.get(k))
        for k in (
            "attribute_accuracy",
            "blind_attribute_accuracy",
            "cider_d",
            "bleu4",
            "chrf",
            "train_seconds",
            "n_val",
        )
    ]
    print("\n| metric | value |\n| --- | --- |")
    for k, v in rows:
        if v is not None:
            print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    for ex in r.get("examples", [])[:3]:
        print(f"  {ex['video']}: {ex['caption']}   (ref: {ex['reference']})")


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(logging.INFO)
    run_demo(cfg)


if __name__ == "__main__":
    main()
