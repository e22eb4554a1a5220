"""`python -m data.check annotations=FILE [root=DIR]`: list every problem in an annotation file.

Problems: bad JSON / CSV rows, missing keys, empty captions, paths escaping the root (from
`data.annotations`), and, per record, a missing, undecodable or truncated video or a start/end window
outside it (by sampling the video through `data.video`, with its timeout). Each is printed as
`FILE:LINE: message`. Exit status: 1 if there is any problem, 0 if none, 2 (one line on stderr) when
the annotation file or the root folder does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from data.annotations import Problem, scan_annotations
from data.video import VideoDecodeError, sample_frames
from vlm.util.cli import hydra_cli
from vlm.util.errors import UsageError

USAGE = "python -m data.check annotations=FILE.jsonl|FILE.csv [root=DIR]"


def check_annotations(
    annotations: str | os.PathLike,
    root: str | os.PathLike | None = None,
    decode: bool = True,
    num_frames: int = 2,
    image_size: int | None = 32,
    decode_timeout_s: float = 30.0,
) -> tuple[int, list[Problem]]:
    """Return (number of records, problems sorted by line)."""
    records, problems = scan_annotations(annotations, root)
    for rec in records:
        line = rec["lines"][0]
        if not os.path.isfile(rec["video"]):
            what = "is not a file" if os.path.exists(rec["video"]) else "not found"
            problems.append(Problem(line, f"video {rec['rel']} {what}"))
            continue
        if decode:
            try:
                sample_frames(
                    rec["video"],
                    num_frames,
                    start=rec["start"],
                    end=rec["end"],
                    size=image_size,
                    timeout_s=decode_timeout_s,
                )
            except VideoDecodeError as e:
                problems.append(Problem(line, f"video {rec['rel']} undecodable: {e.reason}"))
    problems.sort(key=lambda p: p.line)
    return len(records), problems


def main_fn(cfg) -> int:
    """The CLI: print each problem as FILE:LINE: message and a summary; 1 if any problem, else 0."""
    from vlm.config import to_typed

    cfg = to_typed(cfg)
    # A wrong path is the user's slip, not a problem of the data: say so in one line (exit 2).
    if not Path(cfg.annotations).is_file():
        raise UsageError(f"annotations={cfg.annotations}: no such file (usage: {USAGE})")
    if cfg.root is not None and not Path(cfg.root).is_dir():
        raise UsageError(f"root={cfg.root}: no such folder")
    n, problems = check_annotations(
        cfg.annotations, cfg.root, cfg.decode, cfg.num_frames, cfg.image_size, cfg.decode_timeout_s
    )
    for p in problems:
        print(f"{cfg.annotations}:{p.line}: {p.message}")
    print(f"{n} records, {len(problems)} problem(s) in {cfg.annotations}")
    return 1 if problems else 0


if __name__ == "__main__":
    hydra_cli("check", main_fn, USAGE)
