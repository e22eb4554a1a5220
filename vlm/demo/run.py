"""`make demo`: the whole job on CPU — corpus, warm-ups, stage 1, stage 2, export, captions, scores, report.

    python -m vlm.demo                 # writes outputs/demo/report.json
    python -m vlm.demo control=true    # blind control: adds blind_attribute_accuracy to the report

Everything after the warm-ups goes through the same code a GPU run uses: `vlm.train.run.train` on the
composed training config (NF4 decoder, frozen tower behind the feature cache, stage 1 then stage 2 from
the stage-1 checkpoint), `python -m vlm.export`'s export and `python -m vlm.caption`'s folder captioning,
then the caption metrics of `eval.caption`. The blind control feeds all-zero frames through the data
side (`BlindFrames`); the product's modules never know.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from data.annotations import read_annotations
from vlm.config import compose, to_typed
from vlm.config.entries import DemoEntry, TrainEntry
from vlm.util.jsonl import read_jsonl

log = logging.getLogger("vlm.demo")


class BlindFrames:
    """A video dataset whose every frame is zero: captions can then only come from the text prior."""

    cache_tag = "blind"  # the feature cache keeps these apart from the real features

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.records = dataset, dataset.records
        self.sample_kw = dataset.sample_kw

    def __len__(self) -> int:
        return len(self.dataset)

    def decode(self, i: int) -> torch.Tensor:
        return torch.zeros_like(self.dataset.decode(i))

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item["frames"] = torch.zeros_like(item["frames"])
        return item


def _corpus(cfg: DemoEntry, root: Path) -> None:
    from data.synth import generate

    if (root / "val.jsonl").exists() and (root / "train.jsonl").exists():
        return
    generate(str(root), n_train=cfg.corpus.n_train, n_val=cfg.corpus.n_val, seed=cfg.seed)


def _warmups(cfg: DemoEntry, root: Path, warm: Path, base: TrainEntry) -> dict[str, Any]:
    from data.video import sample_frames
    from vlm.model.build import build_processor
    from vlm.model.vision import build_clip

    w, out = cfg.warmup, {}
    records = read_annotations(root / "train.jsonl", root)
    if not (warm / "decoder" / "config.json").exists():
        from vlm.demo.warmup import warm_decoder

        processor = build_processor(base.model, base.prompt, base.data.max_caption_tokens)
        out["decoder"] = warm_decoder(
            base.model.arch, processor, records, warm / "decoder",
            steps=w.decoder_steps, batch_size=w.decoder_batch, lr=w.decoder_lr, seed=cfg.seed,
        )  # fmt: skip
    if not (warm / "vision.safetensors").exists():
        from vlm.demo.warmup import warm_vision

        size = base.vision.image_size
        frames = torch.stack(
            [sample_frames(r["video"], num_frames=base.data.num_frames, size=size).frames for r in records]
        )
        out["vision"] = warm_vision(
            build_clip(base.vision), frames, [r["captions"] for r in records], base.vision.mean, base.vision.std,
            warm / "vision.safetensors", steps=w.vision_steps, batch_size=w.vision_batch, lr=w.vision_lr, seed=cfg.seed,
        )  # fmt: skip
    return out


def _caption_blind(
    result: dict[str, Any], records: list[dict[str, Any]], batch: int, max_new_tokens: int
) -> dict[str, str]:
    """Captions of the val clips from the blind run's own cached (all-zero-frame) features."""
    from vlm.model.captioner import VideoCaptioner
    from vlm.train.feature_cache import CachedFeatureDataset

    module = result["module"].eval()
    data = CachedFeatureDataset(records, Path(result["cache"]["directory"]))
    captioner = VideoCaptioner(module.vlm, module.processor)
    preds: dict[str, str] = {}
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(start + batch, len(data)))]
        feats = torch.stack([it["feats"] for it in items])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            caps = captioner.caption_features(feats, prepared=True, max_new_tokens=max_new_tokens)
        preds.update({it["video"]: c for it, c in zip(items, caps, strict=True)})
    return preds


def _caption_from_export(cfg: DemoEntry, checkpoint: str, root: Path, out: Path, run: Path) -> dict[str, str]:
    """`python -m vlm.export` then `python -m vlm.caption` on the val folder, as a user would."""
    from vlm.export.write import export
    from vlm.infer.run import caption_folder

    export_dir = export(checkpoint, out / "export", overwrite=True)
    captions = run / "captions.jsonl"
    if captions.exists():  # an older model's captions: set aside (the demo's own output), not mixed in
        captions.rename(captions.with_name(f"captions.{int(time.time())}.jsonl"))
    summary = caption_folder(
        root / "videos" / "val", captions, export_dir, batch_size=cfg.caption.batch_size, num_workers=0, progress=False,
        **{"generation.max_new_tokens": cfg.caption.max_new_tokens, "trainer.precision": "bf16-mixed"},
    )  # fmt: skip
    if summary["failed"]:
        log.warning("%d val videos failed to caption; see %s", summary["failed"], captions)
    return {f"videos/val/{x['video']}": x["caption"] or "" for x in read_jsonl(captions).objects}


def run_demo(cfg: Any) -> dict[str, Any]:
    from eval.caption import attribute_accuracy, score_captions
    from vlm.train.run import train

    cfg: DemoEntry = to_typed(cfg)
    t0 = time.time()
    out = Path(cfg.output)
    root, warm = out / "synth", out / "warm"
    _corpus(cfg, root)
    common = [*cfg.train_overrides, f"data.root={root}", f"seed={cfg.seed}", f"progress={cfg.progress}"]
    base: TrainEntry = to_typed(compose("train", common))
    timings = {"warmups": _warmups(cfg, root, warm, base)}
    common += [f"model.name_or_path={warm / 'decoder'}", f"vision.weights={warm / 'vision.safetensors'}"]
    run = out / ("control" if cfg.control else "main")
    wrap = BlindFrames if cfg.control else None
    s1, s2 = cfg.stage1, cfg.stage2
    r1 = train(compose("train", [*common, "train=stage1_projector", f"output_dir={run / 'stage1'}",
        f"train.max_steps={s1.steps}", f"train.lr_projector={s1.lr_projector}", f"train.batch_size={s1.batch_size}"]),
        dataset_wrapper=wrap)  # fmt: skip
    r2 = train(compose("train", [*common, "train=stage2_lora", f"output_dir={run / 'stage2'}",
        f"train.init_from={r1['last_checkpoint']}", f"train.max_steps={s2.steps}", f"train.batch_size={s2.batch_size}",
        f"train.lr_projector={s2.lr_projector}", f"train.lr_lora={s2.lr_lora}", f"train.lora.r={s2.r}",
        f"train.lora.alpha={s2.alpha}"]), dataset_wrapper=wrap)  # fmt: skip
    t_cap = time.time()
    val = read_annotations(root / "val.jsonl", root)
    if cfg.control:  # the caption CLI reads real videos; the blind run captions its own zero-frame features
        preds = _caption_blind(r2, val, cfg.caption.batch_size, cfg.caption.max_new_tokens)
    else:  # the user's path: export the final model, caption the held-out folder from the export
        preds = _caption_from_export(cfg, r2["last_checkpoint"], root, out, run)
    caption_seconds = time.time() - t_cap
    refs = {r["rel"]: r["captions"] for r in val}
    attrs = {r["rel"]: r["attributes"] for r in val}
    acc = attribute_accuracy(preds, attrs)
    scores = score_captions(preds, refs, tokenize="morpheme")
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
        "warmups": {
            k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in timings["warmups"].items()
        },
        "n_val": len(preds),
        "settings": asdict(cfg),
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
    keys = (
        "attribute_accuracy",
        "blind_attribute_accuracy",
        "cider_d",
        "bleu4",
        "chrf",
        "train_seconds",
        "n_val",
    )
    print("\n| metric | value |\n| --- | --- |")
    for k in keys:
        v = r.get(k)
        if v is not None:
            print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    for ex in r.get("examples", [])[:3]:
        print(f"  {ex['video']}: {ex['caption']}   (ref: {ex['reference']})")
