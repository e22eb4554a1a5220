"""JSON lines: read a file that a killed writer may have left with a torn last line; append flushed lines.

A complete line ends in a newline. Bytes after the last newline are a torn tail (a writer died mid-line):
`read_jsonl` reports them apart from the records, and the caller decides what to do (the captioner sets
them aside in a sidecar file). A complete line that is not a JSON object is *damaged*: it is reported
with its line number and never dropped or rewritten by this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class JsonlContents:
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (1-based line, object)
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): complete, not an object
    torn: bytes = b""  # bytes after the last newline
    complete_bytes: int = 0  # length of the file up to and including its last newline

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [r for _, r in self.records]


def parse_jsonl(data: bytes) -> JsonlContents:
    out = JsonlContents()
    end = data.rfind(b"\n") + 1
    out.complete_bytes, out.torn = end, data[end:]
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            out.damaged.append((n, f"not JSON ({reason})"))
            continue
        if not isinstance(obj, dict):
            out.damaged.append((n, f"a JSON {type(obj).__name__}, not an object"))
            continue
        out.records.append((n, obj))
    return out


def read_jsonl(path: str | os.PathLike) -> JsonlContents:
    """The file's records, damaged lines and torn tail; an absent file reads as empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return JsonlContents()
    return parse_jsonl(data)


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def append_jsonl(f: IO[str], records: list[dict[str, Any]]) -> None:
    """Append whole lines to an open text file and push them to disk before returning."""
    f.write("".join(dumps(r) for r in records))
    f.flush()
    os.fsync(f.fileno())
