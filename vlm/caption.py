"""Batch captioning of a video folder from an export directory, through Lightning's `Trainer.predict`.

    python -m vlm.caption input=videos/ output=captions.jsonl checkpoint=outputs/demo/export
    python -m vlm.caption ... batch_size=16 num_workers=4 prompt=short segment_seconds=10
    python -m vlm.caption ... trainer.devices=2 trainer.strategy=ddp       # shard over 2 processes

One JSON line per video: video (relative to input), caption, error (null or one line), frames,
timestamps, duration_s, decoder, model (export id), prompt_sha, plus size and mtime_ns (resume key)
and, with segment_seconds, `segments` and an .srt per video in `<output stem>_srt/`.

Exit codes: 0 every video has a caption; 3 some videos failed (their lines carry the error; rerun
with retry_failed=true to try them again); 2 usage error (missing input folder, unreadable
checkpoint, output not writable, a bad setting, or an output written by another model/prompt).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm.caption_io import (
    CaptionUsageError,
    check_compatible,
    discover,
    read_lines,
    shard_paths,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("vlm.caption")

__all__ = ["CaptionUsageError", "caption_folder", "default_config", "prompt_sha", "run"]


def prompt_sha(system: str, user: str) -> str:
    return hashlib.sha256(f"{system}\n{user}".encode()).hexdigest()[:12]


def default_config(prompt: str | None = None) -> DictConfig:
    """conf/caption.yaml as `python -m vlm.caption` composes it (without Hydra's own keys)."""
    cfg = OmegaConf.load(CONF / "caption.yaml")
    for k in ("defaults", "hydra"):
        cfg.pop(k, None)
    cfg.prompt = OmegaConf.load(CONF / "prompt" / f"{prompt}.yaml") if prompt else None
    return cfg


def caption_folder(
    input: str | os.PathLike, output: str | os.PathLike, checkpoint: str | os.PathLike,
    prompt: str | None = None, **overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """Function form of the CLI: `overrides` are dotted keys, e.g. `**{"generation.max_new_tokens": 32}`."""
    cfg = default_config(prompt)
    cfg.merge_with_dotlist([f"{k}={v if v is not None else 'null'}" for k, v in overrides.items()])
    cfg.input, cfg.output, cfg.checkpoint = str(input), str(output), str(checkpoint)
    return run(cfg)


def _check_usage(cfg: DictConfig) -> tuple[Path, Path, Path]:
    from data.sampling import check_args

    for key in ("input", "output", "checkpoint"):
        if not cfg.get(key):
            raise CaptionUsageError(
                f"{key}= is required (python -m vlm.caption input=DIR output=FILE.jsonl checkpoint=EXPORT_DIR)"
            )
    src, out, ckpt = Path(cfg.input), Path(cfg.output).absolute(), Path(cfg.checkpoint)
    if not src.is_dir():
        raise CaptionUsageError(f"input={src}: no such directory")
    if not (ckpt / "vlm.json").is_file():
        raise CaptionUsageError(
            f"checkpoint={ckpt}: not an export directory (no vlm.json; make one with python -m vlm.export)"
        )
    if out.is_dir():
        raise CaptionUsageError(f"output={out}: is a directory; give a .jsonl file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise CaptionUsageError(f"output={out}: not writable ({e.strerror})") from None
    if int(cfg.batch_size) < 1 or int(cfg.num_workers) < 0:
        raise CaptionUsageError(
            f"batch_size={cfg.batch_size} must be >= 1 and num_workers={cfg.num_workers} >= 0"
        )
    if cfg.segment_seconds is not None and not float(cfg.segment_seconds) > 0:
        raise CaptionUsageError(f"segment_seconds={cfg.segment_seconds} must be a positive number of seconds")
    f = cfg.frames
    try:
        check_args(int(f.num_frames or 1), f.sample_mode or "uniform", f.fps, f.max_frames)
    except ValueError as e:
        raise CaptionUsageError(f"frames: {e}") from None
    return src, out, ckpt


def _load(cfg: DictConfig, ckpt: Path) -> Any:
    from vlm.export_load import ExportError, load_exported

    m = cfg.model
    try:
        return load_exported(
            ckpt, base=m.base, quantize=m.quantize, compute_dtype=m.compute_dtype, merged=bool(m.merged)
        )
    except ExportError as e:
        raise CaptionUsageError(f"checkpoint={ckpt}: {e}") from None
    except (OSError, ValueError, KeyError) as e:
        raise CaptionUsageError(
            f"checkpoint={ckpt}: cannot load ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Caption every video under cfg.input not yet in cfg.output; returns the run summary (on rank 0:
    ok / failed / skipped / earlier_failed counts, videos_per_s, exit_code)."""
    import lightning.pytorch as L

    from vlm.caption_predict import Captioner, FolderData, JsonlWriter
    from vlm.model import Prompt

    src, out, ckpt = _check_usage(cfg)
    vlm = _load(cfg, ckpt)
    meta = vlm.export_meta
    if cfg.get("prompt"):  # a style picked on the command line (prompt=short|detailed)
        vlm.prompt = Prompt(system=cfg.prompt.system, user=cfg.prompt.user)
    seg = float(cfg.segment_seconds) if cfg.segment_seconds is not None else None
    fixed = {
        "model": meta["id"],
        "prompt_sha": prompt_sha(vlm.prompt.system, vlm.prompt.user),
        "segment_seconds": seg,
    }
    earlier = read_lines(out)[0] + [r for s in shard_paths(out) for r in read_lines(s)[0]]
    check_compatible(earlier, out, fixed)  # before any process writes anything
    videos = discover(src)
    fr, trained = cfg.frames, meta["frames"]
    sampling = {
        "num_frames": int(fr.num_frames or trained["num_frames"]),
        "mode": fr.sample_mode or trained["sample_mode"],
        "fps": fr.fps if fr.sample_mode else trained["fps"],
        "max_frames": fr.max_frames if fr.sample_mode else trained["max_frames"],
        "size": int(trained["image_size"]),  # the encoder's input size: not a free choice
        "timeout_s": float(fr.decode_timeout_s),
    }
    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    data = FolderData(
        videos, out, bool(cfg.retry_failed), sampling, seg, int(cfg.batch_size), int(cfg.num_workers)
    )
    writer = JsonlWriter(out, show_progress=bool(cfg.progress))
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=int(t.num_nodes), strategy=t.strategy,
        precision=t.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer], inference_mode=True,
    )  # fmt: skip
    writer.started = time.perf_counter()
    trainer.predict(
        Captioner(vlm, gen, int(cfg.batch_size), fixed), datamodule=data, return_predictions=False
    )
    writer.finish(trainer)
    if not trainer.is_global_zero:
        return {"rank": trainer.global_rank, **writer.counts, "exit_code": 0}
    final = {r["video"]: r for r in read_lines(out)[0]}
    in_input = {v.rel for v in videos}
    failed_total = sum(1 for v, r in final.items() if v in in_input and r["error"] is not None)
    missing = sorted(in_input - set(final))
    if missing:  # cannot happen unless a process died; say so instead of exiting 0
        raise RuntimeError(f"{len(missing)} videos have no line in {out}, e.g. {missing[0]}; rerun to resume")
    counts = writer.all_counts
    seconds = max(writer.ended - writer.started, 1e-9)
    summary = {
        "ok": counts["ok"],
        "failed": counts["failed"],
        "skipped": len(data.done),
        "earlier_failed": failed_total - counts["failed"],  # failed before and not retried this time
        "videos": len(videos),
        "seconds": round(seconds, 3),
        "videos_per_s": round((counts["ok"] + counts["failed"]) / seconds, 3),
        "processes": trainer.world_size,
        "per_rank": writer.per_rank or [counts["ok"] + counts["failed"]],
        "output": str(out),
        "model": meta["id"],
        "exit_code": 3 if failed_total else 0,
    }
    print(
        f"captioned {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped (already in the output)"
        f" in {seconds:.1f}s: {summary['videos_per_s']:.2f} videos/s on {trainer.world_size} process(es) → {out}"
    )
    if trainer.world_size > 1:
        print(f"videos per process: {summary['per_rank']}")
    if summary["earlier_failed"]:
        print(
            f"{summary['earlier_failed']} videos failed in an earlier run (retry_failed=true tries them again)"
        )
    return summary


def _main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
    def main(cfg: DictConfig) -> None:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no accelerator banners
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
        try:
            summary = run(cfg)
        except CaptionUsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(summary["exit_code"])

    main()


if __name__ == "__main__":
    _main()
