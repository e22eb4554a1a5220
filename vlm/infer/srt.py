"""SRT subtitles of segment captioning: one file per video beside the output, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.util.files import atomic_write


def srt_time(seconds: float) -> str:
    ms = round(max(0.0, seconds) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_text(segments: list[dict[str, Any]]) -> str:
    """Numbered cues; a caption's line breaks become spaces (a blank line would end the cue)."""
    blocks = [
        f"{i}\n{srt_time(s['start'])} --> {srt_time(s['end'])}\n{' '.join((s['caption'] or '').split()) or '…'}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def srt_dir(output: Path) -> Path:
    """Subtitles go beside the output: captions.jsonl → captions_srt/<relative path>.srt."""
    return output.with_name(f"{output.stem}_srt")


def write_srt(output: Path, rel: str, segments: list[dict[str, Any]]) -> Path:
    path = srt_dir(output) / Path(rel).with_suffix(".srt")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, srt_text(segments))


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue; strict enough to catch a malformed file."""

    def sec(t: str) -> float:
        hms, ms = t.split(",")
        h, m, s = (int(x) for x in hms.split(":"))
        return h * 3600 + m * 60 + s + int(ms) / 1000

    cues = []
    for i, block in enumerate(text.strip().split("\n\n"), 1):
        lines = block.split("\n")
        if len(lines) < 3 or lines[0] != str(i) or " --> " not in lines[1]:
            raise ValueError(f"SRT cue {i} is malformed: {block!r}")
        a, b = lines[1].split(" --> ")
        cues.append((sec(a), sec(b), "\n".join(lines[2:])))
    return cues
