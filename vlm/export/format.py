"""The export directory's format: what it may contain, vlm.json's version, and the boundary rule.

An export holds only safetensors, JSON, the tokenizer's chat template (.jinja) and markdown. Every path
vlm.json names is relative and must resolve (symlinks followed) inside the export directory; anything
else is refused naming the key. Nothing here ever reads a pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from vlm.util.errors import UsageError

FORMAT = "kovicap-export"
FORMAT_VERSION = 2  # 2: typed projector/vision configs, tokenizer/ inside the export
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".md")


class ExportError(UsageError):
    """A usage problem (bad checkpoint, occupied output, mismatched base, a file outside the export)."""


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """vlm.json of an export directory, checked for format and version."""
    p = Path(path) / "vlm.json"
    if not Path(path).is_dir():
        raise ExportError(f"{path}: no such export directory")
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{path}: not a kovicap export (no vlm.json; make one with python -m vlm.export)"
        ) from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{p}: unreadable ({' '.join(str(e).split())})") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("format_version"), int)
    ):
        raise ExportError(f"{p}: not a kovicap export")
    if meta["format_version"] != FORMAT_VERSION:
        raise ExportError(
            f"{p}: export format {meta['format_version']}, this code reads {FORMAT_VERSION}"
            " (export the training checkpoint again with python -m vlm.export)"
        )
    return meta


def inside(root: Path, rel: Any, key: str) -> Path:
    """`root / rel`, refused unless it is a relative path that resolves inside `root`."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise ExportError(f"{root / 'vlm.json'}: {key}={rel!r} must be a path relative to the export")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ExportError(f"{root / 'vlm.json'}: {key}={rel!r} points outside the export directory")
    return path


def checked_safetensors(path: Path, key: str) -> Path:
    """A complete safetensors file, or an ExportError naming it and why (missing, truncated, corrupt)."""
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: {key} must be a .safetensors file")
    if not path.is_file():
        raise ExportError(f"{path}: {key} is missing")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ExportError(f"{path}: truncated ({size} bytes; its header describes {8 + n + end})")
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    return path
