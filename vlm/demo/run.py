"""`make demo`: the whole job on CPU — corpus, warm-ups, stage 1, stage 2, export, captions, scores, plots.

    python -m vlm.demo                 # outputs/demo/{report.json, curves.png, confusion.png}
    python -m vlm.demo seed=1          # outputs/demo/seed1/: its own corpus, warm-ups and runs
    python -m vlm.demo control=true    # blind control: adds blind_attribute_accuracy to the report

Everything after the warm-ups goes through the same code a GPU run uses: `vlm.train.run.train` on the
composed training config (NF4 decoder, frozen tower behind the feature cache, stage 1 then stage 2 from
the stage-1 checkpoint), `python -m vlm.export`'s export and `python -m vlm.caption`'s folder captioning,
then the caption metrics of `eval.caption`. The blind control feeds all-zero frames through the data
side (`BlindFrames`); the product's modules never know. Warm-ups are kept under `warm/` keyed by their
settings, so a rerun with other stage settings reuses them and a changed warm-up setting retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from data.annotations import read_annotations
from vlm.config import compose, to_typed
from vlm.config.entries import DemoEntry, TrainEntry
from vlm.demo.report import finish_report
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


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: only then is bf16 faster than fp32 on a CPU (without, 8x slower, measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "32-true", "bf16-mixed")


def resolve_precision(setting: str) -> str:
    """The Lightning precision the demo trains and captions in: `auto` is bf16 only where it is faster."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision={setting!r}: expected one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        return "bf16-mixed" if cpu_has_bf16() else "32-true"
    return setting


def output_dir(cfg: DemoEntry) -> Path:
    """`output` for the default seed, `output/seed<N>` for the others: each seed its own corpus and runs."""
    return Path(cfg.output) if cfg.seed == 0 else Path(cfg.output) / f"seed{cfg.seed}"


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def step_bar(total: int, desc: str, enabled: bool) -> tuple[Any, Any]:
    """(on_step(step, loss), close()) around a tqdm bar with ETA; no-ops when progress is off."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    return on_step, bar.close


def _corpus(cfg: DemoEntry, root: Path) -> None:
    from data.synth import generate

    if (root / "val.jsonl").exists() and (root / "train.jsonl").exists():
        return
    n = cfg.corpus.n_train + cfg.corpus.n_val
    print(f"[demo] writing the synthetic corpus: {n} clips (about {n // 25} s on 2 cores) …", flush=True)
    generate(str(root), n_train=cfg.corpus.n_train, n_val=cfg.corpus.n_val, seed=cfg.seed)


def _frames(records: list[dict[str, Any]], base: TrainEntry, desc: str, progress: bool) -> torch.Tensor:
    """(N, T, H, W, 3) uint8: the frames training will sample, for the vision warm-up and its probe."""
    from tqdm import tqdm

    from data.video import sample_frames

    d = base.data
    it = tqdm(records, desc=desc, unit="clip", dynamic_ncols=True, disable=not progress)
    return torch.stack(
        [sample_frames(r["video"], num_frames=d.num_frames, size=d.image_size).frames for r in it]
    )


def _warm_decoder(cfg: DemoEntry, root: Path, warm: Path, base: TrainEntry, bf16: bool) -> tuple[Path, dict]:
    from vlm.demo.warm_decoder import warm_decoder
    from vlm.model.build import build_processor

    w = cfg.warmup
    settings = {"arch": asdict(base.model.arch), "steps": w.decoder_steps, "lr": w.decoder_lr, "seed": cfg.seed,
                "batch": w.decoder_batch, "text": w.decoder_text, "frames": base.data.num_frames}  # fmt: skip
    out = warm / f"decoder-{_key(settings)}"
    if (out / "warmup.json").exists():
        return out, json.loads((out / "warmup.json").read_text())
    processor = build_processor(base.model, base.prompt, base.data.max_caption_tokens)
    on_step, close = step_bar(w.decoder_steps, "decoder warm-up (text)", cfg.progress)
    stats = warm_decoder(
        base.model.arch, processor, read_annotations(root / "train.jsonl", root), out,
        steps=w.decoder_steps, batch_size=w.decoder_batch, lr=w.decoder_lr, text=w.decoder_text,
        num_frames=base.data.num_frames, seed=cfg.seed, bf16=bf16, on_step=on_step,
    )  # fmt: skip
    close()
    (out / "warmup.json").write_text(json.dumps({**stats, "settings": settings}))
    return out, stats


def _warm_vision(cfg: DemoEntry, root: Path, warm: Path, base: TrainEntry, bf16: bool) -> tuple[Path, dict]:
    """The tower's warm-up, then linear probes of the random and the warmed tower's pooled
    tokens on the held-out clips (what the tower knows before stage 1)."""
    from vlm.demo.probe import probe_features, probe_tokens
    from vlm.demo.warm_vision import encode_pooled, trainable_tower, warm_vision

    w, pool = cfg.warmup, base.projector.pool
    settings = {"vision": asdict(base.vision), "pool": pool, "steps": w.vision_steps, "lr": w.vision_lr,
                "batch": w.vision_batch, "seed": cfg.seed, "frames": base.data.num_frames,
                "heads": "clip+token"}  # fmt: skip
    out = warm / f"vision-{_key(settings)}.safetensors"
    meta = out.with_suffix(".json")
    if meta.exists() and out.exists():
        return out, json.loads(meta.read_text())
    train, val = (read_annotations(root / f"{s}.jsonl", root) for s in ("train", "val"))
    frames = _frames(train, base, "decode train clips", cfg.progress)
    on_step, close = step_bar(w.vision_steps, "vision warm-up", cfg.progress)
    stats, tower = warm_vision(
        base.vision, frames, [r["attributes"] for r in train], out, pool=pool, steps=w.vision_steps,
        batch_size=w.vision_batch, lr=w.vision_lr, seed=cfg.seed, bf16=bf16, on_step=on_step,
    )  # fmt: skip
    close()
    t0 = time.time()
    val_frames = _frames(val, base, "decode val clips", cfg.progress)
    attrs = [r["attributes"] for r in train], [r["attributes"] for r in val]
    stats["probe"], stats["token_probe"] = {}, {}
    for name, tw in (("random tower", trainable_tower(base.vision)), ("warmed tower", tower)):
        feats = encode_pooled(tw, frames, pool), encode_pooled(tw, val_frames, pool)
        stats["probe"][name] = probe_features(feats[0], attrs[0], feats[1], attrs[1])
        stats["token_probe"][name] = probe_tokens(feats[0], attrs[0], feats[1], attrs[1])
    stats["probe_seconds"] = time.time() - t0
    meta.write_text(json.dumps({**stats, "settings": settings}))
    return out, stats


def caption_cached(
    module: Any, records: list[dict[str, Any]], cache: Path, batch: int, max_new: int
) -> dict[str, str]:
    """Captions of `records` from a training run's own feature cache (no export): the stage-1 check and
    the blind run, whose zero frames the caption CLI cannot be given."""
    from vlm.model.captioner import VideoCaptioner
    from vlm.train.feature_cache import CachedFeatureDataset

    module = module.eval()
    data = CachedFeatureDataset(records, cache)
    captioner = VideoCaptioner(module.vlm, module.processor)
    preds: dict[str, str] = {}
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(start + batch, len(data)))]
        feats = torch.stack([it["feats"] for it in items])
        caps = captioner.caption_features(feats, prepared=True, max_new_tokens=max_new)
        preds.update({it["video"]: c for it, c in zip(items, caps, strict=True)})
    return preds


def _caption_from_export(
    cfg: DemoEntry, checkpoint: str, root: Path, run: Path, precision: str
) -> dict[str, str]:
    """`python -m vlm.export` then `python -m vlm.caption` on the val folder, as a user would."""
    from vlm.export.write import export
    from vlm.infer.run import caption_folder

    export_dir = export(checkpoint, run / "export", overwrite=True)
    captions = run / "captions.jsonl"
    if captions.exists():  # an older model's captions: set aside (the demo's own output), not mixed in
        captions.rename(captions.with_name(f"captions.{int(time.time())}.jsonl"))
    summary = caption_folder(
        root / "videos" / "val", captions, export_dir, batch_size=cfg.caption.batch_size, num_workers=0,
        progress=cfg.progress,
        **{"generation.max_new_tokens": cfg.caption.max_new_tokens, "trainer.precision": precision},
    )  # fmt: skip
    if summary["failed"]:
        log.warning("%d val videos failed to caption; see %s", summary["failed"], captions)
    return {f"videos/val/{x['video']}": x["caption"] or "" for x in read_jsonl(captions).objects}


def _stage_overrides(cfg: DemoEntry, run: Path) -> tuple[list[str], list[str]]:
    s1, s2 = cfg.stage1, cfg.stage2
    one = ["train=stage1_projector", f"output_dir={run / 'stage1'}", f"train.max_steps={s1.steps}",
           f"train.lr_projector={s1.lr_projector}", f"train.batch_size={s1.batch_size}"]  # fmt: skip
    two = ["train=stage2_lora", f"output_dir={run / 'stage2'}", f"train.max_steps={s2.steps}",
           f"train.batch_size={s2.batch_size}", f"train.lr_projector={s2.lr_projector}", f"train.lr_lora={s2.lr_lora}",
           f"train.lora.r={s2.r}", f"train.lora.alpha={s2.alpha}"]  # fmt: skip
    return one, two


def warm_up(cfg: DemoEntry, precision: str, times: dict[str, float]) -> tuple[Path, list[str], dict]:
    """The corpus and both warm-ups, each reused when its settings match (so a rerun with other stage
    settings skips them). Returns (output folder, the training overrides that use them, their stats)."""
    t0 = time.time()
    bf16 = precision.startswith("bf16")
    out = output_dir(cfg)
    root, warm = out / "synth", out / "warm"
    _corpus(cfg, root)
    times["corpus"] = time.time() - t0
    common = [*cfg.train_overrides, f"data.root={root}", f"seed={cfg.seed}", f"progress={cfg.progress}",
              f"trainer.precision={precision}"]  # fmt: skip
    base: TrainEntry = to_typed(compose("train", common))
    t = time.time()
    decoder, dec_stats = _warm_decoder(cfg, root, warm, base, bf16)
    times["decoder_warmup"] = time.time() - t
    t = time.time()
    vision, vis_stats = _warm_vision(cfg, root, warm, base, bf16)
    times["vision_warmup"] = time.time() - t
    _print_probe("all tokens of a clip, flattened", vis_stats["probe"])
    if "token_probe" in vis_stats:
        _print_probe("each token alone, one probe shared by all (what a per-token projector can pass on)",
                     vis_stats["token_probe"])  # fmt: skip
    common += [f"model.name_or_path={decoder}", f"vision.weights={vision}"]
    return out, common, {"decoder": dec_stats, "vision": vis_stats}


def run_demo(cfg: Any) -> dict[str, Any]:
    from vlm.train.run import train

    cfg: DemoEntry = to_typed(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0, load0 = time.time(), os.getloadavg()
    precision = resolve_precision(cfg.precision)
    times: dict[str, float] = {}
    out, common, warmups = warm_up(cfg, precision, times)
    root = out / "synth"
    run = out / ("control" if cfg.control else "main")
    wrap = BlindFrames if cfg.control else None
    one, two = _stage_overrides(cfg, run)
    val = read_annotations(root / "val.jsonl", root)
    t = time.time()
    r1 = train(compose("train", [*common, *one]), dataset_wrapper=wrap)
    times["stage1"] = time.time() - t
    stage1_preds = None
    if cfg.eval_stage1:  # captions of the held-out clips by the stage-1 model: what stage 1 alone achieved
        t = time.time()
        cache = Path(r1["cache"]["directory"])
        stage1_preds = caption_cached(
            r1["module"], val, cache, cfg.caption.batch_size, cfg.caption.max_new_tokens
        )
        times["stage1_eval"] = time.time() - t
    t = time.time()
    r2 = train(
        compose("train", [*common, *two, f"train.init_from={r1['last_checkpoint']}"]), dataset_wrapper=wrap
    )
    times["stage2"] = time.time() - t
    t = time.time()
    if cfg.control:  # the caption CLI reads real videos; the blind run captions its own zero-frame features
        cache = Path(r2["cache"]["directory"])
        preds = caption_cached(r2["module"], val, cache, cfg.caption.batch_size, cfg.caption.max_new_tokens)
    else:  # the user's path: export the final model, caption the held-out folder from the export
        preds = _caption_from_export(cfg, r2["last_checkpoint"], root, run, precision)
    times["caption"] = time.time() - t
    facts = {"precision": precision, "threads": torch.get_num_threads(), "load_average_start": load0,
             "train_seconds": r1["train_seconds"] + r2["train_seconds"], "times": times}  # fmt: skip
    return finish_report(cfg, out, run, val, preds, stage1_preds, warmups, facts, t0)


def _print_probe(what: str, probe: dict[str, dict[str, float]]) -> None:
    print(f"\n[demo] linear probe of the tower's pooled tokens on held-out clips; {what}:")
    print("| tower | " + " | ".join(next(iter(probe.values()))) + " |")
    print("| --- |" + " ---: |" * len(next(iter(probe.values()))))
    for name, accs in probe.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in accs.values()) + " |")
