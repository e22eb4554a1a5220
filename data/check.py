"""`python -m data.check annotations=FILE root=DIR`: list every problem in an annotation file.

Problems: bad JSON / CSV rows, missing keys, empty captions, paths escaping the root (from
`data.annotations`), and, per record, a missing or undecodable video or a start/end window outside it
(by sampling the video through `data.video`, with its timeout). Each is printed as
`FILE:LINE: message`; the exit status is 1 if there is any, else 0.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from data.annotations import Problem, scan_annotations
from data.video import VideoDecodeError, sample_frames


def check_annotations(
    annotations: str | os.PathLike,
    root: str | os.PathLike | None = None,
    decode: bool = True,
    num_frames: int = 2,
    size: int | None = 32,
    timeout_s: float = 30.0,
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
                    size=size,
                    timeout_s=timeout_s,
                )
            except VideoDecodeError as e:
                problems.append(Problem(line, f"video {rec['rel']} undecodable: {e.reason}"))
    problems.sort(key=lambda p: p.line)
    return len(records), problems


@hydra.main(config_path="../conf", config_name="check", version_base=None)
def main(cfg: DictConfig) -> None:
    n, problems = check_annotations(
        cfg.annotations, cfg.root, cfg.decode, cfg.num_frames, cfg.size, float(cfg.timeout_s)
    )
    for p in problems:
        print(f"{cfg.annotations}:{p.line}: {p.message}")
    print(f"{n} records, {len(problems)} problem(s) in {cfg.annotations}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
