"""Caption annotations: JSONL or CSV files -> records, with every problem tied to its line number.

JSONL, one object per line:
    {"video": "rel/path.mp4", "caption": "...", "start": 0.0, "end": 5.0, "attributes": {...}}
    {"video": "rel/path.mp4", "captions": ["...", "..."]}
CSV: a header row with `video` and `caption` columns, optional `start`, `end`, `attributes` (JSON text).
Several lines for the same (video, start, end) are merged into one record with all their captions.

Record: {"video": absolute path, "rel": path as written, "captions": [NFC str, ...], "start": float | None,
"end": float | None, "attributes": dict (only if given), "lines": [line numbers it came from]}.
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = (".jsonl", ".csv")


@dataclass
class Problem:
    """One thing wrong with an annotation file."""

    line: int  # 1-based line number in the annotation file (CSV: the header is line 1)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class AnnotationError(ValueError):
    """An annotation file has problems; `problems` lists all of them."""

    def __init__(self, path: str | os.PathLike, problems: list[Problem]) -> None:
        self.path = str(path)
        self.problems = problems
        shown = "; ".join(map(str, problems[:5])) + (
            f"; … ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        super().__init__(f"{self.path}: {shown}")


def nfc(text: str) -> str:
    """Korean text may arrive decomposed (NFD, e.g. from macOS); compose it so tokens and metrics agree."""
    return unicodedata.normalize("NFC", text).strip()


def resolve_video(root: Path, rel: str) -> Path:
    """root / rel, refusing absolute paths and anything that resolves outside root (.., symlinks)."""
    if not rel or os.path.isabs(rel) or rel.startswith("~"):
        raise ValueError(f"video path {rel!r} must be relative to the root")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"video path {rel!r} escapes the root {root}")
    return path


def _time(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):  # bool is an int in Python; `"start": true` is a mistake
        raise ValueError(f"{key} must be a number of seconds, got {value!r}")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number of seconds, got {value!r}") from None
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return t


def parse_row(row: Any, root: Path) -> dict[str, Any]:
    """Validate one decoded line (a dict) into a record; raise ValueError with a one-line reason."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    rel = row.get("video")
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(
            "missing key 'video'" if rel is None else f"'video' must be a path string, got {rel!r}"
        )
    if "captions" in row and row["captions"] not in (None, ""):
        raw = row["captions"]
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise ValueError("'captions' must be a list of strings")
    elif row.get("caption") is not None:
        raw = [row["caption"]]
        if not isinstance(raw[0], str):
            raise ValueError(f"'caption' must be a string, got {type(raw[0]).__name__}")
    else:
        raise ValueError("missing key 'caption' (or 'captions')")
    captions = [nfc(c) for c in raw]
    if not captions or any(not c for c in captions):
        raise ValueError("empty caption")
    start, end = _time(row, "start"), _time(row, "end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end {end:g} is not after start {start:g}")
    rec: dict[str, Any] = {
        "video": str(resolve_video(root, rel.strip())),
        "rel": rel.strip(),
        "captions": captions,
        "start": start,
        "end": end,
    }
    attrs = row.get("attributes")
    if attrs not in (None, ""):
        if not isinstance(attrs, dict):
            raise ValueError("'attributes' must be an object")
        rec["attributes"] = {k: nfc(v) if isinstance(v, str) else v for k, v in attrs.items()}
    return rec


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, ValueError(f"bad JSON ({e.msg} at column {e.colno})")


def _csv_rows(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "video" not in reader.fieldnames:
            yield 1, ValueError(f"CSV header must name a 'video' column, got {reader.fieldnames}")
            return
        for row in reader:
            n = reader.line_num  # the line where this row ends (quoted captions may span lines)
            if None in row:
                yield n, ValueError("more fields than header columns")
                continue
            attrs = row.get("attributes")
            if attrs:
                try:
                    row["attributes"] = json.loads(attrs)
                except json.JSONDecodeError as e:
                    yield n, ValueError(f"'attributes' column is not JSON ({e.msg})")
                    continue
            yield n, row


def scan_annotations(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Read every line; return (records, problems). root defaults to the annotation file's folder."""
    path = Path(path)
    root_dir = Path(root) if root is not None else path.parent
    if path.suffix.lower() not in FORMATS:
        return [], [Problem(0, f"unknown annotation format {path.suffix!r} (use {' or '.join(FORMATS)})")]
    if not path.is_file():
        return [], [Problem(0, "annotation file not found")]
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    merged: dict[tuple, dict[str, Any]] = {}
    problems: list[Problem] = []
    try:
        for n, row in rows:
            try:
                if isinstance(row, Exception):
                    raise row
                rec = parse_row(row, root_dir)
            except ValueError as e:
                problems.append(Problem(n, str(e)))
                continue
            key = (rec["video"], rec["start"], rec["end"])
            if key in merged:  # another caption for the same clip
                merged[key]["captions"] += rec["captions"]
                merged[key]["lines"].append(n)
            else:
                merged[key] = {**rec, "lines": [n]}
    except UnicodeDecodeError as e:
        problems.append(Problem(0, f"not UTF-8 text ({e.reason} at byte {e.start})"))
    return list(merged.values()), problems


def read_annotations(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Records of an annotation file; raise AnnotationError listing every problem if there is any."""
    records, problems = scan_annotations(path, root)
    if problems:
        raise AnnotationError(path, problems)
    if not records:
        raise AnnotationError(path, [Problem(0, "no annotations")])
    return records
