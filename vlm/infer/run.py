"""`run(cfg)`: caption every video of a folder not yet in the output, from an export directory.

Everything a user can get wrong is checked before the model loads (input folder, export, output file,
settings). The output is locked, repaired only where a killed run of ours left a torn line, and appended
to; the summary and the exit code (0 all captioned, 3 some failed, 2 usage error) come back to the CLI.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm.config import to_typed
from vlm.config.entries import CaptionEntry
from vlm.infer.discover import discover
from vlm.infer.output import CaptionOutput, check_compatible, is_record, latest, warn
from vlm.util.errors import UsageError
from vlm.util.jsonl import read_jsonl


def prompt_sha(system: str, user: str) -> str:
    return hashlib.sha256(f"{system}\n{user}".encode()).hexdigest()[:12]


def is_primary_process() -> bool:
    """The process a user started (DDP launchers set LOCAL_RANK / NODE_RANK in the ones they spawn)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def check_usage(cfg: CaptionEntry) -> tuple[Path, Path, dict[str, Any]]:
    """(input folder, output path, the export's vlm.json), or UsageError: before any model loads."""
    from data.sampling import check_args
    from vlm.export.format import read_export

    src, out = Path(cfg.input), Path(cfg.output).absolute()
    if not src.is_dir():
        raise UsageError(f"input={src}: no such directory")
    meta = read_export(cfg.export)
    if out.is_dir():
        raise UsageError(f"output={out}: is a directory; give a .jsonl file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UsageError(f"output={out}: not writable ({e.strerror})") from None
    for key, value, low in (("batch_size", cfg.batch_size, 1), ("num_workers", cfg.num_workers, 0),
                            ("generation.max_new_tokens", cfg.generation.max_new_tokens, 1),
                            ("generation.num_beams", cfg.generation.num_beams, 1),
                            ("trainer.devices", cfg.trainer.devices, 1), ("trainer.num_nodes", cfg.trainer.num_nodes, 1)):  # fmt: skip
        if value < low:
            raise UsageError(f"{key}={value}: must be >= {low}")
    if cfg.segment_seconds is not None and not cfg.segment_seconds > 0:
        raise UsageError(f"segment_seconds={cfg.segment_seconds}: must be a positive number of seconds")
    if cfg.frames.decode_timeout_s <= 0:
        raise UsageError(f"frames.decode_timeout_s={cfg.frames.decode_timeout_s}: must be > 0")
    s = sampling(cfg, meta)
    try:
        check_args(s["num_frames"], s["mode"], s["fps"], s["max_frames"])
    except ValueError as e:
        raise UsageError(f"frames: {e}") from None
    for key in ("model.quantize", "model.compute_dtype"):
        value = getattr(cfg.model, key.split(".")[1])
        allowed = ("nf4", "none") if key == "model.quantize" else ("float32", "bfloat16", "float16")
        if value is not None and value not in allowed:
            raise UsageError(f"{key}={value}: expected one of {', '.join(allowed)}")
    from vlm.train.preflight import check_accelerator, check_strategy

    check_strategy("trainer.strategy", cfg.trainer.strategy)
    check_accelerator("trainer.accelerator", cfg.trainer.accelerator)
    return src, out, meta


def sampling(cfg: CaptionEntry, meta: dict[str, Any]) -> dict[str, Any]:
    """Frame sampling: what the run asks for, else what the export was trained with."""
    fr, trained = cfg.frames, meta["frames"]
    chosen = fr.sample_mode is not None
    return {
        "num_frames": fr.num_frames if fr.num_frames is not None else trained["num_frames"],
        "mode": fr.sample_mode if chosen else trained["sample_mode"],
        "fps": fr.fps if chosen else trained["fps"],
        "max_frames": fr.max_frames if chosen else trained["max_frames"],
        "size": trained["image_size"],  # the tower's input size: not a free choice
        "timeout_s": fr.decode_timeout_s,
        "allow_partial": fr.allow_partial,
    }


def run(cfg: Any) -> dict[str, Any]:
    """Caption what is not yet captioned; returns the run summary (counts, videos/s, exit_code)."""
    cfg: CaptionEntry = to_typed(cfg)
    src, out, meta = check_usage(cfg)
    from vlm.util.signals import StopSignal

    output = CaptionOutput(out)
    primary = is_primary_process()
    stop = StopSignal()
    stop.install()  # a signal while the model loads is not lost
    if primary:
        output.lock()
    try:
        summary = _run(cfg, src, output, meta, primary, stop)
    finally:
        output.release()
        stop.restore()
    # The model sits in reference cycles (the Trainer and its callbacks, `stop` among them) that only the
    # collector frees: without this a process that captions folder after folder held one model per call
    # (9.0 GiB after captioning at 14B's shapes, 1.1 GiB once collected).
    del stop, output
    gc.collect()
    return summary


def _run(
    cfg: CaptionEntry, src: Path, output: CaptionOutput, meta: dict[str, Any], primary: bool, stop: Any
) -> dict[str, Any]:
    import lightning.pytorch as L

    from vlm.export.load import load_exported
    from vlm.infer.predict import CaptionPredictor, FolderData, JsonlWriter
    from vlm.util.errors import Interrupted
    from vlm.util.signals import signal_name

    prompt = cfg.prompt if cfg.prompt is not None else None
    system, user = (
        (prompt.system, prompt.user) if prompt else (meta["prompt"]["system"], meta["prompt"]["user"])
    )
    fixed = {
        "model": meta["id"],
        "prompt_sha": prompt_sha(system, user),
        "segment_seconds": cfg.segment_seconds,
    }
    if primary:
        records = output.open_for_run(cfg.overwrite)
        check_compatible(records, output.path, fixed)  # before any process writes anything
    videos, unreadable = discover(src)
    for line in unreadable:
        warn(f"input={src}: {line}")
    m = cfg.model
    captioner = load_exported(
        cfg.export, base=m.base, quantize=m.quantize, compute_dtype=m.compute_dtype, merged=m.merged
    )
    if prompt is not None:  # a style picked on the command line (prompt=short|detailed)
        captioner.processor = captioner.processor.with_prompt(prompt)
    if stop.signum is not None:
        raise Interrupted(
            stop.signum,
            f"stopped by {signal_name(stop.signum)} before captioning started; nothing was written",
        )
    gen = asdict(cfg.generation)
    data = FolderData(videos, output.path, cfg.retry_failed, sampling(cfg, meta), cfg.segment_seconds,
                      cfg.batch_size, cfg.num_workers)  # fmt: skip
    writer = JsonlWriter(output, stop, show_progress=cfg.progress)
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[stop, writer], inference_mode=True,
    )  # fmt: skip
    writer.started = time.perf_counter()
    trainer.predict(
        CaptionPredictor(captioner, gen, cfg.batch_size, fixed), datamodule=data, return_predictions=False
    )
    result = writer.finish(trainer)
    if not trainer.is_global_zero:
        return {"rank": trainer.global_rank, **writer.counts, "exit_code": 0}
    final = {r["video"]: r for r in latest([r for r in read_jsonl(output.path).objects if is_record(r)])}
    in_input = {v.rel for v in videos}
    failed_total = sum(1 for v, r in final.items() if v in in_input and r["error"] is not None)
    missing = sorted(in_input - set(final))
    if missing:  # cannot happen unless a process died; say so instead of exiting 0
        raise RuntimeError(
            f"{len(missing)} videos have no line in {output.path}, e.g. {missing[0]}; rerun to resume"
        )
    counts = result["counts"]
    seconds = max(writer.ended - writer.started, 1e-9)
    summary = {
        "ok": counts["ok"],
        "failed": counts["failed"],
        "skipped": len(data.done),
        "earlier_failed": failed_total - counts["failed"],  # failed before and not retried this time
        "unreadable_folders": len(unreadable),
        "videos": len(videos),
        "seconds": round(seconds, 3),
        "videos_per_s": round((counts["ok"] + counts["failed"]) / seconds, 3),
        "processes": trainer.world_size,
        "per_rank": result["per_rank"],
        "output": str(output.path),
        "model": meta["id"],
        "exit_code": 3 if failed_total or unreadable else 0,
    }
    print(
        f"captioned {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped (already in the output)"
        f" in {seconds:.1f}s: {summary['videos_per_s']:.2f} videos/s on {trainer.world_size} process(es) → {output.path}"
    )
    if trainer.world_size > 1:
        print(f"videos per process: {summary['per_rank']}")
    if summary["earlier_failed"]:
        print(
            f"{summary['earlier_failed']} videos failed in an earlier run (retry_failed=true tries them again)"
        )
    return summary


def caption_folder(input: str | os.PathLike, output: str | os.PathLike, export: str | os.PathLike,
                   prompt: str | None = None, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Function form of the CLI: `overrides` are dotted keys, e.g. `**{"generation.max_new_tokens": 32}`."""
    from vlm.config import compose

    args = [f"input={input}", f"output={output}", f"export={export}"]
    args += [f"prompt={prompt}"] if prompt else []
    args += [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
    return run(compose("caption", args))
