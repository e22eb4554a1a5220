"""Writing evaluation results: JSON for machines, a Markdown table for people, a bar chart PNG.

Every evaluator writes `FILE.json` and, beside it, `FILE.md` and `FILE.png` (same stem). Files are
written to a temporary name and renamed, so a crashed run never leaves half a report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    path = Path(path)
    _atomic_write(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats with 4 decimals, numbers right-aligned."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    _atomic_write(path, text.encode("utf-8"))
    return path


def bar_chart(
    path: str | os.PathLike,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    colors: Sequence[str] | None = None,
    hline: tuple[float, str] | None = None,
    legend: dict[str, str] | None = None,
) -> Path:
    """A vertical bar chart with the value over each bar; `hline` = (y, label) draws a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    width = max(6.0, 0.45 * len(labels) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=100)
    xs = range(len(labels))
    bars = ax.bar(xs, values, color=colors or "#4C72B0")
    for b, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
        )
    if hline is not None:
        ax.axhline(hline[0], color="k", ls="--", lw=1, label=hline[1])
    ax.set_xticks(list(xs))
    # Hangul subject names need a CJK font that may be absent; labels here are ASCII (subject ids).
    ax.set_xticklabels(
        labels, rotation=60 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center", fontsize=8
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles = [Patch(color=c, label=n) for n, c in (legend or {}).items()]
    if hline is not None or handles:
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=8, loc="upper right")
    ax.set_ylim(0, max([*values, hline[0] if hline else 0, 1e-9]) * 1.18)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """outputs/eval/kmmlu.json -> outputs/eval/kmmlu.md (suffix '.md')."""
    return Path(path).with_suffix(suffix)
